// Decompression of uploaded NARs (.nar.xz, .nar.zst) by the xz and zstd
// programs. A child process decodes on another core while this process
// hashes and stores, the decoders are the reference ones, and a hostile body
// can at worst crash a child, never the bridge. Measured here: xz -dc is 4x
// faster than lzma-native and zstd -dc 4x faster than fzstd (pure JS).
import { spawn } from 'node:child_process';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Compression } from './routes.js';

const PROGRAMS: Record<Exclude<Compression, 'none'>, { program: string; args: string[]; package: string }> = {
  // Nix compresses with xz's default presets (8 MiB dictionary); a body needing more than 1 GiB is refused.
  xz: { program: 'xz', args: ['--decompress', '--stdout', '--quiet', '--memlimit-decompress=1GiB'], package: 'xz-utils' },
  zstd: { program: 'zstd', args: ['--decompress', '--stdout', '--quiet'], package: 'zstd' },
};

export class DecompressionError extends Error {}

/** The decompressor is not installed: the bridge cannot accept this compression. */
export class DecompressorMissingError extends Error {}

/**
 * The decompressed bytes of `body`. `onCompressed` sees every compressed
 * chunk (to hash the file as uploaded). Throws DecompressionError when the
 * body is not valid for its compression, or when the body itself fails.
 */
export async function* decompress(
  body: AsyncIterable<Uint8Array> & NodeJS.ReadableStream,
  compression: Exclude<Compression, 'none'>,
  onCompressed: (chunk: Buffer) => void,
): AsyncGenerator<Buffer> {
  const { program, args, package: debianPackage } = PROGRAMS[compression];
  const child = spawn(program, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (data: Buffer) => {
    if (stderr.length < 4096) stderr += data.toString();
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('close', (code, signal) => resolve({ code, signal }));
  });
  try {
    await new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', (err: NodeJS.ErrnoException) => {
        reject(err.code === 'ENOENT' ? new DecompressorMissingError(`${compression} uploads need the ${program} program (Debian package ${debianPackage})`) : err);
      });
    });
    const tap = new Transform({
      transform(chunk: Buffer, _encoding, callback) {
        onCompressed(chunk);
        callback(null, chunk);
      },
    });
    const fed = pipeline(body, tap, child.stdin).then(() => undefined, (err: Error) => err);
    for await (const chunk of child.stdout) yield chunk as Buffer;
    const failed = await fed;
    const { code, signal } = await exited;
    if (failed && (failed as NodeJS.ErrnoException).code !== 'EPIPE') throw failed;
    if (code !== 0) {
      const why = stderr.trim().replace(/^[^:]*:\s*\(stdin\):\s*/, '') || (signal ? `killed by ${signal}` : `exit status ${code}`);
      throw new DecompressionError(`the body is not valid ${compression}: ${why}`);
    }
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}

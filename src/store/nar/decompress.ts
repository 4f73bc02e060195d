// Decompression of NARs as binary caches store them: uploads to nar-bridge
// (.nar.xz, .nar.zst) and NARs fetched from substituters (whatever their
// narinfo's Compression says). xz, zstd and bzip2 run as child processes: a
// child decodes on another core while this process hashes and stores, the
// decoders are the reference ones, and a hostile body can at worst crash a
// child, never the server. Measured here: xz -dc is 4x faster than
// lzma-native and zstd -dc 4x faster than fzstd (pure JS). gzip and brotli,
// which Nix can also write, use Node's zlib; zstd is decoded in this process
// by libzstd where the addon was built with it (src/native/zstd.c): a
// substituted closure is many NARs, and a child per NAR plus two pipe copies
// per byte cost more than the decoding.
import { spawn } from 'node:child_process';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createBrotliDecompress, createGunzip } from 'node:zlib';
import { zstdAddon } from '../../native/zstd.js';
import { type LentSlab, decodedSlabs } from '../../castore/lent-slabs.js';

/** The Compression values of a narinfo this store can read. */
export const COMPRESSIONS = ['none', 'xz', 'zstd', 'bzip2', 'gzip', 'br'] as const;
export type NarCompression = (typeof COMPRESSIONS)[number];

export function isNarCompression(value: string): value is NarCompression {
  return (COMPRESSIONS as readonly string[]).includes(value);
}

const PROGRAMS: Record<'xz' | 'zstd' | 'bzip2', { program: string; args: string[]; package: string }> = {
  // Nix compresses with xz's default presets (8 MiB dictionary); a body needing more than 1 GiB is refused.
  xz: { program: 'xz', args: ['--decompress', '--stdout', '--quiet', '--memlimit-decompress=1GiB'], package: 'xz-utils' },
  zstd: { program: 'zstd', args: ['--decompress', '--stdout', '--quiet'], package: 'zstd' },
  bzip2: { program: 'bzip2', args: ['--decompress', '--stdout', '--quiet'], package: 'bzip2' },
};

export class DecompressionError extends Error {}

/** The decompressor is not installed: this compression cannot be read here. */
export class DecompressorMissingError extends Error {}

/**
 * The decompressed bytes of `body`. `onCompressed` sees every compressed
 * chunk (to hash the file as stored). Throws DecompressionError when the
 * body is not valid for its compression, or when the body itself fails.
 */
export async function* decompress(
  body: AsyncIterable<Uint8Array>,
  compression: Exclude<NarCompression, 'none'>,
  onCompressed: (chunk: Buffer) => void,
): AsyncGenerator<Buffer> {
  const tap = new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      onCompressed(chunk);
      callback(null, chunk);
    },
  });
  if (compression === 'gzip' || compression === 'br') {
    yield* decompressInProcess(body, tap, compression);
    return;
  }
  const zstd = compression === 'zstd' ? zstdAddon() : undefined;
  if (zstd) {
    // Into lent slabs (castore/lent-slabs.ts): no allocation per output step, and the blob
    // writers keep only what they hold or copy, so memory stays bounded without waiting for GC.
    const decoder = zstd.decoder();
    let slab: LentSlab | undefined;
    let filled = 0;
    try {
      for await (const chunk of body) {
        onCompressed(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length));
        for (let consumed = 0; ; ) {
          if (!slab || filled === slab.bytes.length) {
            slab?.release();
            slab = decodedSlabs.take();
            filled = 0;
          }
          const from = filled;
          try {
            [consumed, filled] = zstd.decodeInto(decoder, chunk, consumed, slab.bytes, filled);
          } catch (err) {
            throw new DecompressionError(`the body is not valid zstd: ${(err as Error).message}`);
          }
          if (filled > from) yield slab.bytes.subarray(from, filled);
          if (consumed === chunk.length && filled < slab.bytes.length) break;
        }
      }
      if (!zstd.finished(decoder)) throw new DecompressionError('the body is not valid zstd: it ends inside a frame');
    } finally {
      slab?.release();
      zstd.release(decoder);
    }
    return;
  }
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
        reject(err.code === 'ENOENT' ? new DecompressorMissingError(`${compression} NARs need the ${program} program (Debian package ${debianPackage})`) : err);
      });
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

async function* decompressInProcess(body: AsyncIterable<Uint8Array>, tap: Transform, compression: 'gzip' | 'br'): AsyncGenerator<Buffer> {
  const decoder = compression === 'gzip' ? createGunzip() : createBrotliDecompress();
  const fed = pipeline(body, tap, decoder).then(() => undefined, (err: Error) => err);
  try {
    for await (const chunk of decoder) yield chunk as Buffer;
  } catch (err) {
    throw new DecompressionError(`the body is not valid ${compression}: ${(err as Error).message}`);
  }
  const failed = await fed;
  if (failed) throw (failed as NodeJS.ErrnoException).code?.startsWith('Z_') ? new DecompressionError(`the body is not valid ${compression}: ${failed.message}`) : failed;
}

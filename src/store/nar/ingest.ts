// Reads a NAR stream into castore while computing its SHA-256 and size. The
// format is enforced strictly (Nix's own reader rules); on any error the
// tree is not registered: blobs already written stay unreferenced, no
// directory is stored.
import { createHash } from 'node:crypto';
import type { BlobService } from '../../castore/blobservice.js';
import type { DirectoryService } from '../../castore/directoryservice.js';
import { InvalidInputError } from '../../castore/errors.js';
import { displayName, type Node } from '../../castore/model.js';
import { BlobWriteWindow, type PendingNode, finishTree } from '../../castore/tree-builder.js';
import { nameProblem, symlinkTargetProblem, MAX_NAME_LENGTH, MAX_SYMLINK_TARGET_LENGTH } from '../../castore/validate.js';
import { NAR_MAGIC, padding } from './encoder.js';

export class NarFormatError extends InvalidInputError {}

/** Deeper nesting than any real filesystem allows (PATH_MAX is 4096). */
const MAX_DEPTH = 2048;
const MAX_TOKEN_LENGTH = 16;
const EMPTY = Buffer.alloc(0);

/** Pulls exact byte counts out of a chunked stream, hashing everything it pulls. */
class NarSource {
  private chunk: Buffer = EMPTY;
  private offset = 0;
  /** Bytes handed out so far. */
  position = 0;
  private readonly hash = createHash('sha256');
  private readonly iterator: AsyncIterator<Uint8Array>;

  constructor(stream: AsyncIterable<Uint8Array> | Iterable<Uint8Array>) {
    this.iterator = Symbol.asyncIterator in stream ? stream[Symbol.asyncIterator]() : (async function* () { yield* stream; })();
  }

  /** Makes at least one unread byte available; false at the end of the stream. */
  private async fill(): Promise<boolean> {
    while (this.offset >= this.chunk.length) {
      const next = await this.iterator.next();
      if (next.done) return false;
      const bytes = next.value;
      this.chunk = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
      this.offset = 0;
      this.hash.update(this.chunk);
    }
    return true;
  }

  private truncated(what: string): never {
    throw new NarFormatError(`NAR is truncated: it ends at byte ${this.position} inside ${what}`);
  }

  async read(length: number, what: string): Promise<Buffer> {
    if (!(await this.fill()) && length > 0) this.truncated(what);
    if (this.chunk.length - this.offset >= length) {
      const out = this.chunk.subarray(this.offset, this.offset + length);
      this.offset += length;
      this.position += length;
      return out;
    }
    const out = Buffer.allocUnsafe(length);
    let filled = 0;
    while (filled < length) {
      if (!(await this.fill())) this.truncated(what);
      const n = Math.min(length - filled, this.chunk.length - this.offset);
      this.chunk.copy(out, filled, this.offset, this.offset + n);
      this.offset += n;
      this.position += n;
      filled += n;
    }
    return out;
  }

  /** `length` bytes as the chunks they arrive in (never copied or joined). */
  async *stream(length: number, what: string): AsyncGenerator<Buffer> {
    let remaining = length;
    while (remaining > 0) {
      if (!(await this.fill())) this.truncated(what);
      const n = Math.min(remaining, this.chunk.length - this.offset);
      const out = this.chunk.subarray(this.offset, this.offset + n);
      this.offset += n;
      this.position += n;
      remaining -= n;
      yield out;
    }
  }

  async atEnd(): Promise<boolean> {
    return !(await this.fill());
  }

  digest(): Buffer {
    return this.hash.digest();
  }

  async close(): Promise<void> {
    await this.iterator.return?.();
  }
}

export interface IngestedNar {
  /** The root node, with an empty name. */
  root: Node;
  narSize: number;
  narSha256: Buffer;
}

export interface IngestOptions {
  /** Called with the byte count as the NAR is read (progress). */
  onProgress?: (bytes: number) => void;
}

export async function ingestNar(
  stream: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
  services: { blobs: BlobService; directories: DirectoryService },
  options: IngestOptions = {},
): Promise<IngestedNar> {
  const source = new NarSource(stream);
  const window = new BlobWriteWindow();
  const where: Buffer[] = []; // names from the root down, formatted only for errors
  const at = () => (where.length ? `at /${where.map((name) => displayName(name).slice(1, -1)).join('/')}` : 'at the root');
  const fail = (message: string): never => {
    throw new NarFormatError(`malformed NAR ${at()} (byte ${source.position}): ${message}`);
  };

  async function u64(what: string): Promise<number> {
    const value = (await source.read(8, what)).readBigUInt64LE();
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) fail(`${what} length ${value} is too large`);
    return Number(value);
  }

  async function skipPadding(length: number, what: string): Promise<void> {
    const pad = padding(length);
    if (pad === 0) return;
    const bytes = await source.read(pad, what);
    if (bytes.some((b) => b !== 0)) fail(`non-zero padding after ${what}`);
  }

  async function string(maxLength: number, what: string): Promise<Buffer> {
    const length = await u64(what);
    if (length > maxLength) fail(`${what} is ${length} bytes, more than ${maxLength}`);
    const bytes = Buffer.from(await source.read(length, what)); // copied: it outlives the chunk
    await skipPadding(length, what);
    return bytes;
  }

  async function token(): Promise<string> {
    return (await string(MAX_TOKEN_LENGTH, 'a token')).toString('latin1');
  }

  async function expect(expected: string): Promise<void> {
    const got = await token();
    if (got !== expected) fail(`expected ${JSON.stringify(expected)}, found ${JSON.stringify(got)}`);
  }

  async function node(name: Buffer, depth: number): Promise<PendingNode> {
    if (depth > MAX_DEPTH) fail(`directories nested deeper than ${MAX_DEPTH}`);
    await expect('(');
    await expect('type');
    const type = await token();
    switch (type) {
      case 'regular': {
        let next = await token();
        let executable = false;
        if (next === 'executable') {
          await expect('');
          executable = true;
          next = await token();
        }
        if (next !== 'contents') fail(`expected "contents"${executable ? '' : ' or "executable"'}, found ${JSON.stringify(next)}`);
        const size = await u64('file contents');
        const writer = services.blobs.openWriter();
        try {
          for await (const chunk of source.stream(size, 'file contents')) {
            await writer.write(chunk);
            options.onProgress?.(source.position);
          }
          await skipPadding(size, 'file contents');
        } catch (err) {
          await writer.abort();
          throw err;
        }
        const { digest } = await window.finish(writer, size);
        await expect(')');
        return { kind: 'file', name, size, executable, digest };
      }
      case 'symlink': {
        await expect('target');
        const target = await string(MAX_SYMLINK_TARGET_LENGTH, 'symlink target');
        const problem = symlinkTargetProblem(target);
        if (problem) fail(`symlink target ${problem}`);
        await expect(')');
        return { kind: 'symlink', name, target };
      }
      case 'directory': {
        const entries: PendingNode[] = [];
        let previous: Buffer | undefined;
        for (;;) {
          const next = await token();
          if (next === ')') break;
          if (next !== 'entry') fail(`expected "entry" or ")", found ${JSON.stringify(next)}`);
          await expect('(');
          await expect('name');
          const childName = await string(MAX_NAME_LENGTH, 'entry name');
          const problem = nameProblem(childName);
          if (problem) fail(`entry name ${displayName(childName)}: ${problem}`);
          if (previous && Buffer.compare(previous, childName) >= 0) {
            fail(`entry ${displayName(childName)} ${previous.equals(childName) ? 'appears twice' : `comes after ${displayName(previous)}: entries must be sorted`}`);
          }
          previous = childName;
          await expect('node');
          where.push(childName);
          entries.push(await node(childName, depth + 1));
          where.pop();
          await expect(')');
        }
        return { kind: 'directory', name, entries };
      }
      default:
        return fail(`unknown node type ${JSON.stringify(type)}`);
    }
  }

  try {
    const magic = await string(MAX_TOKEN_LENGTH, 'the NAR header');
    if (magic.toString('latin1') !== NAR_MAGIC) throw new NarFormatError('not a NAR: it does not start with "nix-archive-1"');
    const pending = await node(EMPTY, 0);
    if (!(await source.atEnd())) throw new NarFormatError(`NAR has trailing data after byte ${source.position}`);
    await window.drain();
    const root = await finishTree(pending, services.directories);
    return { root, narSize: source.position, narSha256: source.digest() };
  } catch (err) {
    await window.drain().catch(() => {});
    await source.close().catch(() => {});
    throw err;
  }
}

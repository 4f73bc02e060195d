// Reads a NAR stream into castore while computing its SHA-256 and size. The
// format is enforced strictly (Nix's own reader rules); on any error the
// tree is not registered: blobs already written stay unreferenced, no
// directory is stored.
//
// The parser is synchronous over the bytes it has been given: a generator
// that yields only when it needs more input or must wait for a blob write.
// A NAR is mostly small files, and a promise per token (what an async reader
// costs) made a file of a few bytes cost ~80 µs; see docs/design-notes.md.
import { createHash } from 'node:crypto';
import { type BlobService, putBlob } from '../../castore/blobservice.js';
import type { B3Digest } from '../../castore/digest.js';
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
/** Files up to this size are gathered whole and stored with one put (the local store keeps them in LMDB). */
const WHOLE_FILE_MAX = 64 * 1024;
const EMPTY = Buffer.alloc(0);

/** What the parser yields: a request for the next chunk, or a write to wait for (its result is sent back). */
const NEED_INPUT = Symbol('more input');
type Step = typeof NEED_INPUT | Promise<unknown>;
type Parse<T> = Generator<Step, T, unknown>;

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

/** A directory whose entries are being read: those read so far, and the last one's name. */
interface DirectoryBeingRead {
  name: Buffer;
  entries: PendingNode[];
  previous?: Buffer;
}

/** The chunk being parsed and how far into the NAR the parser is. */
class NarInput {
  chunk: Buffer = EMPTY;
  offset = 0;
  /** Bytes the parser has taken so far. */
  position = 0;
  /** What the parser was reading when it asked for more (for the error if there is none). */
  wanted = '';

  get available(): number {
    return this.chunk.length - this.offset;
  }

  /** `length` bytes, all available: a view into the chunk. */
  take(length: number): Buffer {
    const out = this.chunk.subarray(this.offset, this.offset + length);
    this.offset += length;
    this.position += length;
    return out;
  }
}

class NarReader {
  readonly input = new NarInput();
  readonly window = new BlobWriteWindow();
  /** The writer of a large file being read, aborted if the NAR fails inside it. */
  private writer?: ReturnType<BlobService['openWriter']>;
  /** Names from the root down, formatted only for errors. */
  private readonly where: Buffer[] = [];

  constructor(
    private readonly blobs: BlobService,
    private readonly onProgress: ((bytes: number) => void) | undefined,
  ) {}

  private fail(message: string): never {
    const at = this.where.length ? `at /${this.where.map((name) => displayName(name).slice(1, -1)).join('/')}` : 'at the root';
    throw new NarFormatError(`malformed NAR ${at} (byte ${this.input.position}): ${message}`);
  }

  /** Exactly `length` bytes: a view into the chunk when it holds them all, otherwise a copy gathered across chunks. */
  private *bytes(length: number, what: string): Parse<Buffer> {
    const input = this.input;
    if (input.available >= length) return input.take(length);
    const out = Buffer.allocUnsafe(length);
    for (let filled = 0; filled < length; ) {
      if (input.available === 0) {
        input.wanted = what;
        yield NEED_INPUT;
        continue;
      }
      const piece = input.take(Math.min(length - filled, input.available));
      piece.copy(out, filled);
      filled += piece.length;
    }
    return out;
  }

  private *u64(what: string): Parse<number> {
    const value = (yield* this.bytes(8, what)).readBigUInt64LE();
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) this.fail(`${what} length ${value} is too large`);
    return Number(value);
  }

  private *skipPadding(length: number, what: string): Parse<void> {
    const pad = padding(length);
    if (pad === 0) return;
    const bytes = yield* this.bytes(pad, what);
    for (const b of bytes) if (b !== 0) this.fail(`non-zero padding after ${what}`);
  }

  /** A string of at most `maxLength` bytes; a view valid only until the parser next yields. */
  private *string(maxLength: number, what: string): Parse<Buffer> {
    const length = yield* this.u64(what);
    if (length > maxLength) this.fail(`${what} is ${length} bytes, more than ${maxLength}`);
    const bytes = yield* this.bytes(length, what);
    if (padding(length) === 0) return bytes;
    const kept = this.input.available >= padding(length) ? bytes : Buffer.from(bytes); // padding may need the next chunk
    yield* this.skipPadding(length, what);
    return kept;
  }

  private *token(): Parse<string> {
    return (yield* this.string(MAX_TOKEN_LENGTH, 'a token')).toString('latin1');
  }

  private *expect(expected: string): Parse<void> {
    const got = yield* this.token();
    if (got !== expected) this.fail(`expected ${JSON.stringify(expected)}, found ${JSON.stringify(got)}`);
  }

  *nar(): Parse<PendingNode> {
    const magic = yield* this.string(MAX_TOKEN_LENGTH, 'the NAR header');
    if (magic.toString('latin1') !== NAR_MAGIC) throw new NarFormatError('not a NAR: it does not start with "nix-archive-1"');
    // The directories being read, innermost last: an explicit stack rather than a generator per
    // level, so that resuming the parser costs the same at any depth.
    const open: DirectoryBeingRead[] = [];
    let done = yield* this.node(EMPTY, 0);
    for (;;) {
      if (!('kind' in done)) {
        open.push(done);
      } else {
        if (open.length === 0) return done;
        open[open.length - 1]!.entries.push(done);
        this.where.pop();
        yield* this.expect(')');
      }
      const directory = open[open.length - 1]!;
      const next = yield* this.token();
      if (next === ')') {
        open.pop();
        done = { kind: 'directory', name: directory.name, entries: directory.entries };
        continue;
      }
      if (next !== 'entry') this.fail(`expected "entry" or ")", found ${JSON.stringify(next)}`);
      yield* this.expect('(');
      yield* this.expect('name');
      const childName = Buffer.from(yield* this.string(MAX_NAME_LENGTH, 'entry name'));
      const problem = nameProblem(childName);
      if (problem) this.fail(`entry name ${displayName(childName)}: ${problem}`);
      const previous = directory.previous;
      if (previous && Buffer.compare(previous, childName) >= 0) {
        this.fail(`entry ${displayName(childName)} ${previous.equals(childName) ? 'appears twice' : `comes after ${displayName(previous)}: entries must be sorted`}`);
      }
      directory.previous = childName;
      yield* this.expect('node');
      this.where.push(childName);
      done = yield* this.node(childName, open.length);
    }
  }

  /** A file or symlink read whole, or a directory whose entries are still to be read. */
  private *node(name: Buffer, depth: number): Parse<PendingNode | DirectoryBeingRead> {
    if (depth > MAX_DEPTH) this.fail(`directories nested deeper than ${MAX_DEPTH}`);
    yield* this.expect('(');
    yield* this.expect('type');
    const type = yield* this.token();
    switch (type) {
      case 'regular': {
        let next = yield* this.token();
        let executable = false;
        if (next === 'executable') {
          yield* this.expect('');
          executable = true;
          next = yield* this.token();
        }
        if (next !== 'contents') this.fail(`expected "contents"${executable ? '' : ' or "executable"'}, found ${JSON.stringify(next)}`);
        const size = yield* this.u64('file contents');
        const digest = size <= WHOLE_FILE_MAX ? yield* this.wholeFile(size) : yield* this.largeFile(size);
        yield* this.skipPadding(size, 'file contents');
        yield* this.expect(')');
        return { kind: 'file', name, size, executable, digest };
      }
      case 'symlink': {
        yield* this.expect('target');
        const target = Buffer.from(yield* this.string(MAX_SYMLINK_TARGET_LENGTH, 'symlink target'));
        const problem = symlinkTargetProblem(target);
        if (problem) this.fail(`symlink target ${problem}`);
        yield* this.expect(')');
        return { kind: 'symlink', name, target };
      }
      case 'directory':
        return { name, entries: [] };
      default:
        return this.fail(`unknown node type ${JSON.stringify(type)}`);
    }
  }

  /** A small file: gathered (copied out of the chunks, which are reused) and stored with one put. */
  private *wholeFile(size: number): Parse<Promise<B3Digest>> {
    const bytes = yield* this.bytes(size, 'file contents');
    const digest = putBlob(this.blobs, bytes.buffer === this.input.chunk.buffer ? Buffer.from(bytes) : bytes);
    this.onProgress?.(this.input.position);
    const full = this.window.track(digest, size);
    if (full) yield full;
    return digest;
  }

  /** A large file: written as its chunks come, waiting for the writer between them. */
  private *largeFile(size: number): Parse<Promise<B3Digest>> {
    const input = this.input;
    const writer = (this.writer = this.blobs.openWriter());
    for (let remaining = size; remaining > 0; ) {
      if (input.available === 0) {
        input.wanted = 'file contents';
        yield NEED_INPUT;
        continue;
      }
      const piece = input.take(Math.min(remaining, input.available));
      remaining -= piece.length;
      yield writer.write(piece);
      this.onProgress?.(input.position);
    }
    this.writer = undefined;
    const { digest } = (yield this.window.finish(writer, size)) as { digest: Promise<B3Digest> };
    return digest;
  }

  /** After a failure: the file being written is dropped and pending writes are waited for. */
  async abandon(): Promise<void> {
    await this.writer?.abort().catch(() => {});
    await this.window.drain().catch(() => {});
  }
}

/** Runs the parser until it needs input or is done, waiting for what it yields. */
async function advance(parser: Parse<PendingNode>, step: IteratorResult<Step, PendingNode>): Promise<IteratorResult<Step, PendingNode>> {
  while (!step.done && step.value !== NEED_INPUT) {
    let result: unknown;
    try {
      result = await step.value;
    } catch (err) {
      step = parser.throw(err);
      continue;
    }
    step = parser.next(result);
  }
  return step;
}

export async function ingestNar(
  stream: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
  services: { blobs: BlobService; directories: DirectoryService },
  options: IngestOptions = {},
): Promise<IngestedNar> {
  const reader = new NarReader(services.blobs, options.onProgress);
  const input = reader.input;
  const hash = createHash('sha256');
  const parser = reader.nar();
  try {
    let step = await advance(parser, parser.next());
    for await (const bytes of stream) {
      if (bytes.length === 0) continue;
      if (step.done) throw new NarFormatError(`NAR has trailing data after byte ${input.position}`);
      const chunk = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
      hash.update(chunk);
      input.chunk = chunk;
      input.offset = 0;
      step = await advance(parser, parser.next());
      if (step.done && input.available > 0) throw new NarFormatError(`NAR has trailing data after byte ${input.position}`);
    }
    if (!step.done) throw new NarFormatError(`NAR is truncated: it ends at byte ${input.position} inside ${input.wanted}`);
    input.chunk = EMPTY;
    await reader.window.drain();
    const root = await finishTree(step.value, services.directories);
    return { root, narSize: input.position, narSha256: hash.digest() };
  } catch (err) {
    parser.return(undefined as never);
    await reader.abandon();
    throw err;
  }
}

// NAR serialisation, event by event. A NAR is a sequence of strings, each a
// little-endian u64 length, the bytes, and zero padding to 8 bytes:
//   "nix-archive-1" node
//   node = "(" "type" ( "regular" ["executable" ""] "contents" <data>
//                     | "symlink" "target" <target>
//                     | "directory" ("entry" "(" "name" <name> "node" node ")")* ) ")"
// Directory entries come sorted by name bytes. The encoder coalesces the
// many small strings into output chunks and passes large file data through.

export const NAR_MAGIC = 'nix-archive-1';
/** The default slab size, and so the largest chunk the encoder coalesces. */
const OUTPUT_CHUNK = 64 * 1024;
/** Contents at least this large are handed to the sink as they are, never copied. */
const PASS_THROUGH_MIN = 32 * 1024;

/** The padding after `length` bytes of string data. */
export function padding(length: number): number {
  return (8 - (length % 8)) % 8;
}

function narString(text: string | Uint8Array): Buffer {
  const bytes = typeof text === 'string' ? Buffer.from(text) : text;
  const out = Buffer.alloc(8 + bytes.length + padding(bytes.length));
  out.writeBigUInt64LE(BigInt(bytes.length));
  out.set(bytes, 8);
  return out;
}

/** The fixed token sequences, encoded once. */
export const TOKENS = {
  magic: narString(NAR_MAGIC),
  open: narString('('),
  close: narString(')'),
  type: narString('type'),
  regular: narString('regular'),
  executable: narString('executable'),
  empty: narString(''),
  contents: narString('contents'),
  symlink: narString('symlink'),
  target: narString('target'),
  directory: narString('directory'),
  entry: narString('entry'),
  name: narString('name'),
  node: narString('node'),
};

/**
 * The runs of tokens that always come together, encoded once: a NAR of many
 * small files is mostly these, and one copy costs less than five.
 */
const RUNS = {
  regular: Buffer.concat([TOKENS.open, TOKENS.type, TOKENS.regular, TOKENS.contents]),
  executable: Buffer.concat([TOKENS.open, TOKENS.type, TOKENS.regular, TOKENS.executable, TOKENS.empty, TOKENS.contents]),
  symlink: Buffer.concat([TOKENS.open, TOKENS.type, TOKENS.symlink, TOKENS.target]),
  directory: Buffer.concat([TOKENS.open, TOKENS.type, TOKENS.directory]),
  entry: Buffer.concat([TOKENS.entry, TOKENS.open, TOKENS.name]),
};

export type NarSink = (chunk: Buffer) => void;

/**
 * Where the encoder gets the buffers (slabs) it gathers output in. A consumer
 * that knows when its chunks are written can hand slabs back for reuse: a
 * fresh buffer costs a page fault per 4 KiB on first write, which was a
 * quarter of a cold render of many small files.
 */
export interface SlabSource {
  /** A buffer of at least `size` bytes, all of it the encoder's to fill. */
  take(size: number): Buffer;
  /**
   * The encoder writes no more into `slab`; the last byte it put there is the
   * NAR's byte `end - 1`, so the slab is free once the consumer is past `end`.
   */
  retire(slab: Buffer, end: number): void;
}

const freshSlabs: SlabSource = { take: (size) => Buffer.allocUnsafe(size), retire: () => {} };

export class NarEncoder {
  // Bytes handed to the sink are never written again: the next ones are
  // appended after them, so a flush costs no allocation until the slab is full.
  private buffer: Buffer;
  private flushed = 0;
  private used = 0;
  private started = false;
  private fileRemaining = 0;
  private fileSize = 0;
  /** Total bytes emitted so far. */
  size = 0;

  /**
   * `slabSize`: how much is coalesced before a new slab is needed. A consumer
   * that gathers large writes anyway (a file, a pipe) saves allocations with
   * a larger one. `slabs`: where those come from (new ones by default).
   */
  constructor(
    private readonly sink: NarSink,
    private readonly slabSize = OUTPUT_CHUNK,
    private readonly slabs: SlabSource = freshSlabs,
  ) {
    this.buffer = slabs.take(slabSize);
  }

  /** `transient`: the memory of `bytes` is reused once put() returns, so it is copied, never handed over. */
  private put(bytes: Uint8Array, transient = false): void {
    if (bytes.length >= PASS_THROUGH_MIN && !transient) {
      this.flush();
      this.size += bytes.length;
      this.sink(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length));
      return;
    }
    this.room(bytes.length);
    this.size += bytes.length;
    this.buffer.set(bytes, this.used);
    this.used += bytes.length;
  }

  /** Makes sure the slab has `length` more bytes free, moving to a new slab if not. */
  private room(length: number): void {
    if (length <= this.buffer.length - this.used) return;
    this.flush();
    this.slabs.retire(this.buffer, this.size);
    this.buffer = this.slabs.take(Math.max(this.slabSize, length));
    this.flushed = 0;
    this.used = 0;
  }

  /**
   * A little-endian u64, byte by byte: per file and per name, this costs less
   * than a padding view or writeUInt32LE's argument checks in code V8 has not
   * optimised yet, which is the code a one-shot `nixcas nar` runs.
   */
  private putLength(length: number): void {
    this.room(8);
    const buffer = this.buffer;
    let at = this.used;
    let low = length % 0x100000000;
    let high = Math.floor(length / 0x100000000);
    for (let i = 0; i < 4; i++, low >>>= 8) buffer[at++] = low & 0xff;
    for (let i = 0; i < 4; i++, high >>>= 8) buffer[at++] = high & 0xff;
    this.used = at;
    this.size += 8;
  }

  /** The zeros that pad a string of `length` bytes to a multiple of 8. */
  private putPadding(length: number): void {
    const zeros = padding(length);
    if (zeros === 0) return;
    this.room(zeros);
    const buffer = this.buffer;
    for (let i = 0; i < zeros; i++) buffer[this.used + i] = 0;
    this.used += zeros;
    this.size += zeros;
  }

  private putString(bytes: Uint8Array): void {
    this.putLength(bytes.length);
    this.put(bytes);
    this.putPadding(bytes.length);
  }

  /** Every node starts with "(" "type" <kind>; the NAR's magic comes before the first. */
  private startNode(run: Buffer): void {
    if (!this.started) {
      this.started = true;
      this.put(TOKENS.magic);
    }
    this.put(run);
  }

  /** Passes buffered bytes to the sink. */
  flush(): void {
    if (this.used === this.flushed) return;
    const chunk = this.buffer.subarray(this.flushed, this.used);
    this.flushed = this.used;
    this.sink(chunk);
  }

  /** Starts a regular file of `size` bytes; follow with fileData() totalling `size`, then fileEnd(). */
  fileStart(executable: boolean, size: number): void {
    this.startNode(executable ? RUNS.executable : RUNS.regular);
    this.putLength(size);
    this.fileSize = size;
    this.fileRemaining = size;
  }

  /** Passes file contents on; `transient` when `chunk`'s memory is reused after the call. */
  fileData(chunk: Uint8Array, transient = false): void {
    if (chunk.length > this.fileRemaining) throw new Error(`file data exceeds its declared size of ${this.fileSize} bytes`);
    this.fileRemaining -= chunk.length;
    this.put(chunk, transient);
  }

  /**
   * Accounts for `length` bytes of file data that are not emitted (rendering
   * a byte range of a NAR). Flushes first, so everything before the gap has
   * reached the sink.
   */
  fileSkip(length: number): void {
    if (length > this.fileRemaining) throw new Error(`file data exceeds its declared size of ${this.fileSize} bytes`);
    this.flush();
    this.fileRemaining -= length;
    this.size += length;
  }

  fileEnd(): void {
    if (this.fileRemaining !== 0) {
      throw new Error(`file data ended ${this.fileRemaining} bytes short of its declared size of ${this.fileSize} bytes`);
    }
    this.putPadding(this.fileSize);
    this.put(TOKENS.close);
  }

  symlink(target: Uint8Array): void {
    this.startNode(RUNS.symlink);
    this.putString(target);
    this.put(TOKENS.close);
  }

  directoryStart(): void {
    this.startNode(RUNS.directory);
  }

  /** Starts the entry `name` of the current directory; its node follows. */
  entryStart(name: Uint8Array): void {
    this.put(RUNS.entry);
    this.putString(name);
    this.put(TOKENS.node);
  }

  entryEnd(): void {
    this.put(TOKENS.close);
  }

  directoryEnd(): void {
    this.put(TOKENS.close);
  }
}

// Canonical protobuf encoding of Directory messages, written by hand.
//
// A Directory's digest is the BLAKE3 of its canonical encoding: fields in
// number order, proto3 defaults (empty bytes, 0, false) omitted, no unknown
// fields. General protobuf libraries do not promise that form (protobufjs
// writes a present zero), so the bytes that define identity are produced here.
// The decoder accepts any valid protobuf encoding (unknown fields skipped, as
// proto3 does); identity is always recomputed from the canonical re-encoding.
import { InvalidInputError } from './errors.js';
import type { Directory, DirectoryNode, FileNode, SymlinkNode } from './model.js';

const WIRE_VARINT = 0;
const WIRE_LEN = 2;
const WIRE_I64 = 1;
const WIRE_I32 = 5;

export class WireFormatError extends InvalidInputError {}

/** Bytes in the varint encoding of a non-negative safe integer. */
function varintLength(value: number): number {
  let length = 1;
  for (; value >= 0x80; length++) value = Math.floor(value / 0x80);
  return length;
}

/** A length-delimited field: nothing when empty (the proto3 default). */
const bytesFieldLength = (value: Uint8Array) => (value.length === 0 ? 0 : 1 + varintLength(value.length) + value.length);
/** A varint field: nothing when 0. */
const varintFieldLength = (value: number) => (value === 0 ? 0 : 1 + varintLength(value));

function directoryNodeLength(node: DirectoryNode): number {
  return bytesFieldLength(node.name) + bytesFieldLength(node.digest) + varintFieldLength(node.size);
}

function fileNodeLength(node: FileNode): number {
  return bytesFieldLength(node.name) + bytesFieldLength(node.digest) + varintFieldLength(node.size) + varintFieldLength(node.executable ? 1 : 0);
}

function symlinkNodeLength(node: SymlinkNode): number {
  return bytesFieldLength(node.name) + bytesFieldLength(node.target);
}

/**
 * Writes into a buffer sized beforehand: an encoding is one allocation, with
 * no pieces to gather. Field numbers here are below 16, so a tag is one byte.
 */
class Writer {
  private pos = 0;
  constructor(readonly out: Buffer) {}

  varint(value: number): void {
    // Numbers here are non-negative safe integers: division, not bit operations, which stop at 32 bits.
    while (value >= 0x80) {
      this.out[this.pos++] = (value % 0x80) | 0x80;
      value = Math.floor(value / 0x80);
    }
    this.out[this.pos++] = value;
  }

  bytesField(field: number, value: Uint8Array): void {
    if (value.length === 0) return;
    this.out[this.pos++] = field * 8 + WIRE_LEN;
    this.varint(value.length);
    this.out.set(value, this.pos);
    this.pos += value.length;
  }

  varintField(field: number, value: number): void {
    if (value === 0) return;
    this.out[this.pos++] = field * 8 + WIRE_VARINT;
    this.varint(value);
  }

  /** The tag and length of an embedded message, whose fields the caller writes next. Written even when empty: presence is meaningful in a repeated field. */
  messageStart(field: number, length: number): void {
    this.out[this.pos++] = field * 8 + WIRE_LEN;
    this.varint(length);
  }

  finish(): Buffer {
    if (this.pos !== this.out.length) throw new Error(`encoded ${this.pos} bytes where ${this.out.length} were counted`);
    return this.out;
  }
}

/** The canonical encoding whose BLAKE3 is the directory's digest. */
export function encodeDirectory(directory: Directory): Buffer {
  // Each node's length, in writing order: counted once, for the total and for its own header.
  const lengths = [
    ...directory.directories.map(directoryNodeLength),
    ...directory.files.map(fileNodeLength),
    ...directory.symlinks.map(symlinkNodeLength),
  ];
  let total = 0;
  for (const length of lengths) total += 1 + varintLength(length) + length;
  const w = new Writer(Buffer.allocUnsafe(total));
  let next = 0;
  for (const node of directory.directories) {
    w.messageStart(1, lengths[next++]!);
    w.bytesField(1, node.name);
    w.bytesField(2, node.digest);
    w.varintField(3, node.size);
  }
  for (const node of directory.files) {
    w.messageStart(2, lengths[next++]!);
    w.bytesField(1, node.name);
    w.bytesField(2, node.digest);
    w.varintField(3, node.size);
    w.varintField(4, node.executable ? 1 : 0);
  }
  for (const node of directory.symlinks) {
    w.messageStart(3, lengths[next++]!);
    w.bytesField(1, node.name);
    w.bytesField(2, node.target);
  }
  return w.finish();
}

/**
 * Reads protobuf fields from `buf` up to `end`. A nested message is read in
 * place (enter/leave move the bound) rather than from a copy with a reader of
 * its own: a directory of thousands of entries decodes without allocating
 * anything but the nodes and the views of their names and digests.
 */
class Reader {
  pos = 0;
  private end: number;

  constructor(private readonly buf: Buffer, private what: string) {
    this.end = buf.length;
  }

  get done(): boolean {
    return this.pos >= this.end;
  }

  fail(why: string): never {
    throw new WireFormatError(`${this.what}: ${why} at byte ${this.pos}`);
  }

  varint(): number {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.end) this.fail('truncated varint');
      const byte = this.buf[this.pos++]!;
      result += (byte & 0x7f) * scale;
      if ((byte & 0x80) === 0) {
        if (!Number.isSafeInteger(result)) this.fail('integer larger than 2^53');
        return result;
      }
      scale *= 128;
    }
    this.fail('varint longer than 10 bytes');
  }

  /** The next field's key (field number × 8 + wire type). */
  key(): number {
    const key = this.varint();
    if (key < 8) this.fail('field number 0');
    return key;
  }

  private length(): number {
    const length = this.varint();
    if (this.pos + length > this.end) this.fail('truncated length-delimited field');
    return length;
  }

  bytes(): Buffer {
    const length = this.length();
    const out = this.buf.subarray(this.pos, this.pos + length);
    this.pos += length;
    return out;
  }

  /** Starts reading the embedded message that follows, as `what`; returns the outer bound for leave(). */
  enter(what: string): number {
    const outerEnd = this.end;
    const length = this.length(); // before reading pos: the length's varint moves it
    this.end = this.pos + length;
    this.what = what;
    return outerEnd;
  }

  /** Back in the enclosing message `what`, which ends at `end`. */
  leave(end: number, what: string): void {
    this.end = end;
    this.what = what;
  }

  skip(wireType: number): void {
    switch (wireType) {
      case WIRE_VARINT: this.varint(); return;
      case WIRE_I64: this.advance(8); return;
      case WIRE_LEN: this.bytes(); return;
      case WIRE_I32: this.advance(4); return;
      default: this.fail(`unsupported wire type ${wireType}`);
    }
  }

  private advance(n: number): void {
    if (this.pos + n > this.end) this.fail('truncated fixed-width field');
    this.pos += n;
  }

  expect(wireType: number, expected: number, field: number): void {
    if (wireType !== expected) this.fail(`field ${field} has wire type ${wireType}, expected ${expected}`);
  }
}

/** Absent bytes fields decode to this: nothing can write into zero bytes, so one serves all. */
const EMPTY = Buffer.alloc(0);
const NODE_MESSAGES = ['', 'DirectoryNode', 'FileNode', 'SymlinkNode'];
/** The highest field each node message has (a SymlinkNode's field 2 is its target). */
const NODE_LAST_FIELD = [0, 3, 4, 2];

/** Decodes a Directory message; structural validation is validateDirectory's job. */
export function decodeDirectory(buf: Buffer): Directory {
  const directory: Directory = { directories: [], files: [], symlinks: [] };
  const r = new Reader(buf, 'Directory');
  while (!r.done) {
    const key = r.key();
    const kind = Math.floor(key / 8);
    if (kind > 3) {
      r.skip(key & 7);
      continue;
    }
    r.expect(key & 7, WIRE_LEN, kind);
    const directoryEnd = r.enter(NODE_MESSAGES[kind]!);
    let name: Buffer = EMPTY;
    let second: Buffer = EMPTY; // the digest, or a symlink's target
    let size = 0;
    let executable = false;
    while (!r.done) {
      const nodeKey = r.key();
      const field = Math.floor(nodeKey / 8);
      const wireType = nodeKey & 7;
      if (field > NODE_LAST_FIELD[kind]!) {
        r.skip(wireType);
        continue;
      }
      r.expect(wireType, field <= 2 ? WIRE_LEN : WIRE_VARINT, field);
      if (field === 1) name = r.bytes();
      else if (field === 2) second = r.bytes();
      else if (field === 3) size = r.varint();
      else executable = r.varint() !== 0;
    }
    r.leave(directoryEnd, 'Directory');
    if (kind === 1) directory.directories.push({ name, digest: second, size });
    else if (kind === 2) directory.files.push({ name, digest: second, size, executable });
    else directory.symlinks.push({ name, target: second });
  }
  return directory;
}

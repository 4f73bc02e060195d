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

class Writer {
  private chunks: Buffer[] = [];
  private scratch = Buffer.allocUnsafe(10);
  length = 0;

  varint(value: number): void {
    let n = 0;
    // Numbers here are non-negative safe integers, so two 26/27-bit halves avoid bit-op overflow.
    let low = value % 0x80000000;
    let high = Math.floor(value / 0x80000000);
    while (high > 0 || low > 0x7f) {
      this.scratch[n++] = (low & 0x7f) | 0x80;
      low = (low >>> 7) | ((high & 0x7f) << 24);
      high = Math.floor(high / 0x80);
    }
    this.scratch[n++] = low;
    this.push(Buffer.from(this.scratch.subarray(0, n)));
  }

  tag(field: number, wireType: number): void {
    this.varint(field * 8 + wireType);
  }

  bytesField(field: number, value: Uint8Array): void {
    if (value.length === 0) return;
    this.tag(field, WIRE_LEN);
    this.varint(value.length);
    this.push(value);
  }

  varintField(field: number, value: number): void {
    if (value === 0) return;
    this.tag(field, WIRE_VARINT);
    this.varint(value);
  }

  messageField(field: number, message: Buffer): void {
    // Embedded messages are written even when empty: presence is meaningful in a repeated field.
    this.tag(field, WIRE_LEN);
    this.varint(message.length);
    this.push(message);
  }

  private push(chunk: Uint8Array): void {
    this.chunks.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    this.length += chunk.length;
  }

  finish(): Buffer {
    return Buffer.concat(this.chunks, this.length);
  }
}

function encodeDirectoryNode(node: DirectoryNode): Buffer {
  const w = new Writer();
  w.bytesField(1, node.name);
  w.bytesField(2, node.digest);
  w.varintField(3, node.size);
  return w.finish();
}

function encodeFileNode(node: FileNode): Buffer {
  const w = new Writer();
  w.bytesField(1, node.name);
  w.bytesField(2, node.digest);
  w.varintField(3, node.size);
  w.varintField(4, node.executable ? 1 : 0);
  return w.finish();
}

function encodeSymlinkNode(node: SymlinkNode): Buffer {
  const w = new Writer();
  w.bytesField(1, node.name);
  w.bytesField(2, node.target);
  return w.finish();
}

/** The canonical encoding whose BLAKE3 is the directory's digest. */
export function encodeDirectory(directory: Directory): Buffer {
  const w = new Writer();
  for (const node of directory.directories) w.messageField(1, encodeDirectoryNode(node));
  for (const node of directory.files) w.messageField(2, encodeFileNode(node));
  for (const node of directory.symlinks) w.messageField(3, encodeSymlinkNode(node));
  return w.finish();
}

class Reader {
  pos = 0;
  constructor(private readonly buf: Buffer, private readonly what: string) {}

  get done(): boolean {
    return this.pos >= this.buf.length;
  }

  fail(why: string): never {
    throw new WireFormatError(`${this.what}: ${why} at byte ${this.pos}`);
  }

  varint(): number {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.buf.length) this.fail('truncated varint');
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

  bytes(): Buffer {
    const length = this.varint();
    if (this.pos + length > this.buf.length) this.fail('truncated length-delimited field');
    const out = this.buf.subarray(this.pos, this.pos + length);
    this.pos += length;
    return out;
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
    if (this.pos + n > this.buf.length) this.fail('truncated fixed-width field');
    this.pos += n;
  }

  /** Calls `onField` for each field; it returns false for fields it does not know, which are skipped. */
  fields(onField: (field: number, wireType: number) => boolean): void {
    while (!this.done) {
      const key = this.varint();
      const field = Math.floor(key / 8);
      const wireType = key & 7;
      if (field === 0) this.fail('field number 0');
      if (!onField(field, wireType)) this.skip(wireType);
    }
  }

  expect(wireType: number, expected: number, field: number): void {
    if (wireType !== expected) this.fail(`field ${field} has wire type ${wireType}, expected ${expected}`);
  }
}

/** Decodes the fields a node message may have; fields above `lastField` are unknown to it. */
function decodeNodeFields(buf: Buffer, what: string, lastField: number) {
  const r = new Reader(buf, what);
  const out: { name: Buffer; digest: Buffer; size: number; executable: boolean } = {
    name: Buffer.alloc(0),
    digest: Buffer.alloc(0),
    size: 0,
    executable: false,
  };
  r.fields((field, wireType) => {
    if (field > lastField) return false;
    switch (field) {
      case 1: r.expect(wireType, WIRE_LEN, field); out.name = r.bytes(); return true;
      case 2: r.expect(wireType, WIRE_LEN, field); out.digest = r.bytes(); return true;
      case 3: r.expect(wireType, WIRE_VARINT, field); out.size = r.varint(); return true;
      case 4: r.expect(wireType, WIRE_VARINT, field); out.executable = r.varint() !== 0; return true;
      default: return false;
    }
  });
  return out;
}

/** Decodes a Directory message; structural validation is validateDirectory's job. */
export function decodeDirectory(buf: Buffer): Directory {
  const directory: Directory = { directories: [], files: [], symlinks: [] };
  const r = new Reader(buf, 'Directory');
  r.fields((field, wireType) => {
    if (field < 1 || field > 3) return false;
    r.expect(wireType, WIRE_LEN, field);
    const body = r.bytes();
    if (field === 1) {
      const n = decodeNodeFields(body, 'DirectoryNode', 3);
      directory.directories.push({ name: n.name, digest: n.digest, size: n.size });
    } else if (field === 2) {
      const n = decodeNodeFields(body, 'FileNode', 4);
      directory.files.push({ name: n.name, digest: n.digest, size: n.size, executable: n.executable });
    } else {
      // SymlinkNode's field 2 is the target; reuse the generic decoder's "digest" slot.
      const n = decodeNodeFields(body, 'SymlinkNode', 2);
      directory.symlinks.push({ name: n.name, target: n.digest });
    }
    return true;
  });
  return directory;
}

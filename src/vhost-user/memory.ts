// Guest memory as the front end shares it: regions of guest physical address
// space, each backed by a file descriptor we map MAP_SHARED. Every access a
// guest asks for is checked to lie inside one region; nothing here trusts an
// address.
import { fstatSync } from 'node:fs';
import { native } from '../native/index.js';

export interface MemoryRegion {
  guestPhysAddr: number;
  size: number;
  /** Where the front end (QEMU) has the region in its own address space; ring addresses use this. */
  userAddr: number;
  /** Where the region starts in the fd. */
  mmapOffset: number;
}

/**
 * Pieces of guest memory as plain numbers: piece i is `spans[3i + 2]` bytes
 * of `buffers[spans[3i]]` from `spans[3i + 1]` (the layout of castore's
 * ScatterList, which this library does not import).
 */
/** Distinct mappings one Places may refer to (the addon's limit). */
export const MAX_PLACE_BUFFERS = 16;

export interface Places {
  buffers: Uint8Array[];
  spans: Uint32Array;
  count: number;
}

/** A piece of guest memory: `bytes[offset .. offset + length)`. */
export interface Span {
  bytes: Uint8Array;
  offset: number;
  length: number;
}

export class GuestMemoryError extends Error {
  override name = 'GuestMemoryError';
}

/**
 * Node caps an ArrayBuffer at 4 GiB, so a region is mapped in chunks of 1 GiB.
 * Each chunk's mapping runs 1 MiB past its end (both map the same shared
 * pages), so that any structure of up to 1 MiB that starts in a chunk can be
 * read through that chunk alone: a virtqueue's rings are at most 512 KiB.
 */
const CHUNK = 2 ** 30;
const CHUNK_OVERLAP = 2 ** 20;
/** The largest span `contiguous` returns. */
export const MAX_CONTIGUOUS = CHUNK_OVERLAP;

class MappedRegion implements MemoryRegion {
  readonly guestPhysAddr: number;
  readonly size: number;
  readonly userAddr: number;
  readonly mmapOffset: number;
  readonly chunks: Uint8Array[] = [];

  constructor(region: MemoryRegion, fd: number) {
    this.guestPhysAddr = region.guestPhysAddr;
    this.size = region.size;
    this.userAddr = region.userAddr;
    this.mmapOffset = region.mmapOffset;
    try {
      for (let start = 0; start < region.size; start += CHUNK) {
        const length = Math.min(CHUNK + CHUNK_OVERLAP, region.size - start);
        const mapped = native().mmap(fd, length, region.mmapOffset + start, true);
        if (typeof mapped === 'number') throw new GuestMemoryError(`cannot map guest memory at ${hex(region.guestPhysAddr + start)} (${length} bytes): errno ${-mapped}`);
        this.chunks.push(new Uint8Array(mapped));
      }
    } catch (err) {
      this.unmap();
      throw err;
    }
  }

  unmap(): void {
    for (const chunk of this.chunks) if (chunk.byteLength > 0) native().munmap(chunk.buffer as ArrayBuffer);
    this.chunks.length = 0;
  }

  same(region: MemoryRegion): boolean {
    return region.guestPhysAddr === this.guestPhysAddr && region.size === this.size && region.userAddr === this.userAddr;
  }
}

/** Guest memory as native code takes it: mapping i covers guest addresses from gpas[i], its first primaries[i] bytes its own. */
export interface NativeChunks {
  buffers: ArrayBuffer[];
  gpas: number[];
  primaries: number[];
}

export class GuestMemory {
  private regions: MappedRegion[] = [];
  /** Counts the changes of the table, so that whoever keeps addresses from it knows when they are stale. */
  generation = 0;

  constructor(private readonly maxRegions: number) {}

  get regionCount(): number {
    return this.regions.length;
  }

  /** Maps a region from `fd` (which the caller still owns and closes). */
  add(region: MemoryRegion, fd: number): void {
    checkRegion(region);
    if (this.regions.length >= this.maxRegions) throw new GuestMemoryError(`more than ${this.maxRegions} memory regions`);
    for (const other of this.regions) {
      if (overlaps(region.guestPhysAddr, region.size, other.guestPhysAddr, other.size)) throw new GuestMemoryError(`region at ${hex(region.guestPhysAddr)} overlaps the one at ${hex(other.guestPhysAddr)}`);
      if (overlaps(region.userAddr, region.size, other.userAddr, other.size)) throw new GuestMemoryError(`region's front-end address ${hex(region.userAddr)} overlaps another region's`);
    }
    // Reading past the end of a file mapping raises SIGBUS, which would take the whole process down.
    // (memfds and hugetlbfs files are regular files; a front end that shrinks one later still can.)
    const file = fstatSync(fd);
    if (file.isFile() && region.mmapOffset + region.size > file.size) {
      throw new GuestMemoryError(`region at ${hex(region.guestPhysAddr)} ends at byte ${region.mmapOffset + region.size} of a ${file.size}-byte file`);
    }
    this.regions.push(new MappedRegion(region, fd));
    this.generation++;
  }

  /** Unmaps the region matching `region` (guest address, size and front-end address). */
  remove(region: MemoryRegion): void {
    const index = this.regions.findIndex((r) => r.same(region));
    if (index < 0) throw new GuestMemoryError(`no memory region at ${hex(region.guestPhysAddr)} of ${region.size} bytes to remove`);
    this.regions[index].unmap();
    this.regions.splice(index, 1);
    this.generation++;
  }

  /** Unmaps everything. */
  clear(): void {
    for (const region of this.regions) region.unmap();
    this.regions = [];
    this.generation++;
  }

  /** Every mapping, for native code (valid until `generation` changes; it checks its buffers are still attached). */
  nativeChunks(): NativeChunks {
    const chunks: NativeChunks = { buffers: [], gpas: [], primaries: [] };
    for (const r of this.regions) {
      r.chunks.forEach((chunk, i) => {
        chunks.buffers.push(chunk.buffer as ArrayBuffer);
        chunks.gpas.push(r.guestPhysAddr + i * CHUNK);
        chunks.primaries.push(Math.min(CHUNK, r.size - i * CHUNK));
      });
    }
    return chunks;
  }

  /** The guest physical address of a front-end virtual address (how rings are given). */
  guestAddressOf(userAddr: number, length: number): number {
    for (const r of this.regions) {
      if (userAddr >= r.userAddr && userAddr - r.userAddr + length <= r.size) return userAddr - r.userAddr + r.guestPhysAddr;
    }
    throw new GuestMemoryError(`front-end address ${hex(userAddr)} (+${length}) is not in guest memory`);
  }

  /** `length` bytes at guest address `gpa` as one span (at most MAX_CONTIGUOUS bytes). */
  contiguous(gpa: number, length: number): Span {
    if (length > MAX_CONTIGUOUS) throw new GuestMemoryError(`${length} bytes at ${hex(gpa)}: too large for one piece`);
    const r = this.regionOf(gpa, length);
    const offset = gpa - r.guestPhysAddr;
    const chunk = Math.floor(offset / CHUNK);
    return { bytes: r.chunks[chunk], offset: offset - chunk * CHUNK, length };
  }

  /** Throws unless `length` bytes at `gpa` lie in guest memory. */
  check(gpa: number, length: number): void {
    this.regionOf(gpa, length);
  }

  /** Copies `length` bytes at `gpa` into `target[at..]`. */
  copyOut(gpa: number, length: number, target: Uint8Array, at: number): void {
    const one = this.withinChunk(gpa, length);
    if (one) return void target.set(one.bytes.subarray(one.offset, one.offset + length), at);
    this.pieces(gpa, length, (bytes, offset, take, done) => void target.set(bytes.subarray(offset, offset + take), at + done));
  }

  /** Copies `source` to guest address `gpa`. */
  copyIn(gpa: number, source: Uint8Array): void {
    const one = this.withinChunk(gpa, source.length);
    if (one) return void one.bytes.set(source, one.offset);
    this.pieces(gpa, source.length, (bytes, offset, take, done) => void bytes.set(source.subarray(done, done + take), offset));
  }

  /**
   * Appends the places of `length` bytes at `gpa` (one piece per chunk
   * crossed) to `into`; false when `into` is full. Valid until the memory
   * table changes.
   */
  places(gpa: number, length: number, into: Places): boolean {
    return this.pieces(gpa, length, (bytes, offset, take) => {
      let buffer = into.buffers.indexOf(bytes);
      if (buffer < 0) {
        if (into.buffers.length === MAX_PLACE_BUFFERS) return false;
        buffer = into.buffers.push(bytes) - 1;
      }
      const at = 3 * into.count;
      if (at + 3 > into.spans.length) return false;
      into.spans[at] = buffer;
      into.spans[at + 1] = offset;
      into.spans[at + 2] = take;
      into.count++;
      return true;
    });
  }

  /**
   * The chunk and offset of `length` bytes at `gpa` when they lie in one
   * chunk (as all do in guests under 1 GiB): the copies' fast path. The
   * returned object is reused.
   */
  private withinChunk(gpa: number, length: number): { bytes: Uint8Array; offset: number } | undefined {
    const r = this.regionOf(gpa, length);
    const offset = gpa - r.guestPhysAddr;
    const chunk = Math.floor(offset / CHUNK);
    const within = offset - chunk * CHUNK;
    if (within + length > CHUNK) return undefined;
    this.piece.bytes = r.chunks[chunk];
    this.piece.offset = within;
    return this.piece;
  }
  private readonly piece: { bytes: Uint8Array; offset: number } = { bytes: new Uint8Array(0), offset: 0 };

  /**
   * Calls `visit` for each piece of `length` bytes at `gpa` that lies in one
   * chunk (`done` bytes came before it); stops and returns false when
   * `visit` returns false.
   */
  private pieces(gpa: number, length: number, visit: (bytes: Uint8Array, offset: number, take: number, done: number) => boolean | void): boolean {
    const r = this.regionOf(gpa, length);
    let offset = gpa - r.guestPhysAddr;
    for (let done = 0; done < length; ) {
      const chunk = Math.floor(offset / CHUNK);
      const within = offset - chunk * CHUNK;
      const take = Math.min(length - done, CHUNK - within);
      if (visit(r.chunks[chunk], within, take, done) === false) return false;
      offset += take;
      done += take;
    }
    return true;
  }

  private regionOf(gpa: number, length: number): MappedRegion {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length < 0) throw new GuestMemoryError(`bad guest address ${gpa} (+${length})`);
    for (const r of this.regions) {
      if (gpa >= r.guestPhysAddr && gpa - r.guestPhysAddr + length <= r.size) return r;
    }
    throw new GuestMemoryError(`guest address ${hex(gpa)} (+${length}) is outside guest memory`);
  }
}

function checkRegion(region: MemoryRegion): void {
  for (const [name, value] of Object.entries(region)) {
    if (!Number.isSafeInteger(value) || value < 0) throw new GuestMemoryError(`memory region ${name} ${value} is out of range`);
  }
  if (region.size === 0) throw new GuestMemoryError('memory region of size 0');
}

function overlaps(a: number, aLength: number, b: number, bLength: number): boolean {
  return a < b + bLength && b < a + aLength;
}

export function hex(n: number | bigint): string {
  return `0x${n.toString(16)}`;
}

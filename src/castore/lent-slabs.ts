// Memory a producer lends to the consumers of its chunks, so a large file's
// bytes are read once into a slab and every consumer uses them where they
// are: the SHA-256 thread hashes the slab (it is shared memory), and the blob
// file is written from it with O_DIRECT (it is aligned). Importing 1 GiB
// otherwise spent ~0.3 s of the main thread copying each chunk twice.
//
// A consumer that keeps a chunk after the call that gave it holds the slab
// (lentSlabOf(chunk).hold()) and calls the release it got when done; one that
// does not know about lent slabs must copy what it keeps, as the BlobWriter
// and TreeObserver contracts say. A slab goes back to the pool only once its
// producer and every holder have let go, so its bytes never change under a
// holder.
import { optionalNative } from '../native/index.js';

/** Slab addresses are multiples of this (O_DIRECT wants 512 or 4096). */
export const SLAB_ALIGNMENT = 4096;
/** The size of every slab of the import pool (lentSlabs). */
export const LENT_SLAB_SIZE = 4 * 1024 * 1024;

export class LentSlab {
  /** The producer's own hold, given up with release(). */
  private holds = 1;

  constructor(
    /** LENT_SLAB_SIZE bytes over a SharedArrayBuffer, aligned to SLAB_ALIGNMENT when the native addon is there to tell. */
    readonly bytes: Buffer,
    /** Whether `bytes` is known to start at an aligned address. */
    readonly aligned: boolean,
    private readonly pool: LentSlabPool,
  ) {}

  /** Keeps the slab's bytes as they are until the returned function is called (once; later calls do nothing). */
  hold(): () => void {
    this.holds++;
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      this.release();
    };
  }

  /** Gives up one hold: the producer's, when it passed its last chunk of this slab on. */
  release(): void {
    if (--this.holds === 0) this.pool.give(this);
    else if (this.holds < 0) throw new Error('lent slab released more often than held');
  }

  /** Whether `chunk` (a view into this slab) starts at an address that is a multiple of SLAB_ALIGNMENT. */
  isAligned(chunk: Uint8Array): boolean {
    return this.aligned && (chunk.byteOffset - this.bytes.byteOffset) % SLAB_ALIGNMENT === 0;
  }

  /** Back in use, with the producer's hold. */
  reuse(): this {
    this.holds = 1;
    return this;
  }
}

const slabOfMemory = new WeakMap<ArrayBufferLike, LentSlab>();

/** The lent slab `chunk` is a view into, if it is one. */
export function lentSlabOf(chunk: Uint8Array): LentSlab | undefined {
  return slabOfMemory.get(chunk.buffer);
}

export class LentSlabPool {
  private readonly idle: LentSlab[] = [];

  constructor(
    /** The size of every slab of this pool. */
    readonly slabSize: number,
    /** Idle slabs kept for reuse; a fresh one costs a page fault per 4 KiB on first touch. */
    private readonly keepIdle: number,
  ) {}

  /** A slab for the caller to fill, held once by it. */
  take(): LentSlab {
    const idle = this.idle.pop();
    if (idle) return idle.reuse();
    const memory = new SharedArrayBuffer(this.slabSize + SLAB_ALIGNMENT);
    const addon = optionalNative();
    const skip = addon ? addon.misalignment(Buffer.from(memory), SLAB_ALIGNMENT) : 0;
    const slab = new LentSlab(Buffer.from(memory, skip, this.slabSize), addon !== undefined, this);
    slabOfMemory.set(memory, slab);
    return slab;
  }

  give(slab: LentSlab): void {
    if (this.idle.length < this.keepIdle) this.idle.push(slab);
  }
}

/** The process's pool for imports: slabs move between imports, which run one after another or interleaved. */
export const lentSlabs = new LentSlabPool(LENT_SLAB_SIZE, 8);

/**
 * Smaller slabs for decompressed NARs (store/nar/decompress.ts): several download at once, and
 * their bytes are copied into blob files' own buffers, so large slabs would only hold memory.
 */
export const decodedSlabs = new LentSlabPool(512 * 1024, 8);

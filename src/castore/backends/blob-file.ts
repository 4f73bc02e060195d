// The file of one large blob, written in order and made durable at finish().
//
// Bytes are copied into slabs of aligned memory, reused across blobs, and a
// full slab is written while the next one fills; bytes that come in a lent
// slab (lent-slabs.ts), as a large file's do on import, are written from
// there. From the first slab that starts DIRECT_FROM bytes in, the file is
// written with O_DIRECT: the bytes go from the slab to the disk without a
// copy in the page cache, which this store would have to flush (fsync)
// before publishing the blob anyway. A buffered write of a large file costs
// a kernel copy into freshly allocated page-cache pages and then waits for
// their writeback; going direct skips both (docs/design-notes.md has the
// measurements). The start of every blob, and so all of a small one, stays
// buffered and cached for the readers who usually come soon after.
//
// Where the file system refuses O_DIRECT (at fcntl, or with EINVAL on a
// write), or the native addon is missing, the blob is written buffered.
import { constants, promises as fs } from 'node:fs';
import { type NativeAddon, optionalNative } from '../../native/index.js';
import { lentSlabOf } from '../lent-slabs.js';

/** Memory, file offsets and lengths of O_DIRECT writes are multiples of this (covers 512 and 4096-byte sectors). */
const ALIGNMENT = 4096;
/** The first slab of a blob: a blob just past the small-blob limit does not take a large one. */
const FIRST_SLAB = 256 * 1024;
const SLAB = 4 * 1024 * 1024;
/** Bytes of a blob after which its file is written with O_DIRECT. */
const DIRECT_FROM = 8 * 1024 * 1024;
/** Slab writes of one blob in flight at once: one on its way to the disk, one waiting behind it. */
const WRITES_IN_FLIGHT = 2;
/** A buffered file is flushed in steps of this many bytes while it is written, so the final fsync waits only for the last. */
const BUFFERED_SYNC_STEP = 32 * 1024 * 1024;

/** Aligned slabs of two sizes, kept for reuse (a fresh 4 MiB buffer costs 1024 page faults). */
class SlabPool {
  private readonly idle = new Map<number, Buffer[]>([[FIRST_SLAB, []], [SLAB, []]]);
  private readonly keep = new Map<number, number>([[FIRST_SLAB, 16], [SLAB, 4]]);

  constructor(private readonly addon: NativeAddon | undefined) {}

  take(size: number): Buffer {
    const slab = this.idle.get(size)?.pop();
    if (slab) return slab;
    if (!this.addon) return Buffer.allocUnsafeSlow(size);
    const raw = Buffer.allocUnsafeSlow(size + ALIGNMENT);
    const skip = this.addon.misalignment(raw, ALIGNMENT);
    return raw.subarray(skip, skip + size);
  }

  give(slab: Buffer): void {
    const idle = this.idle.get(slab.length);
    if (idle && idle.length < this.keep.get(slab.length)!) idle.push(slab);
  }
}

let pool: SlabPool | undefined;

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

export class BlobFileWriter {
  private readonly slabs: SlabPool;
  private slab?: Buffer;
  private fill = 0;
  /** Bytes given to write(2) so far: the file offset of the slab being filled. */
  private position = 0;
  private direct = false;
  /** Whether this file reached DIRECT_FROM and O_DIRECT was asked for (whatever the answer). */
  private triedDirect = false;
  /** Whether the last write was padded past the blob's end (truncated at finish). */
  private padded = false;
  private readonly inFlight = new Set<Promise<void>>();
  private failure: unknown;
  private unsynced = 0;
  private stepSync?: Promise<void>;

  private constructor(private readonly handle: fs.FileHandle) {
    pool ??= new SlabPool(optionalNative());
    this.slabs = pool;
  }

  /** Creates the file (it must not exist), read-only once complete. */
  static async create(path: string): Promise<BlobFileWriter> {
    const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL;
    return new BlobFileWriter(await fs.open(path, flags, 0o444));
  }

  /**
   * Copies `chunk` into the file's slabs, or, when it lies in a lent slab
   * (lent-slabs.ts) at an aligned address, writes it from there, holding that
   * slab until written. Waits while the disk is behind. The caller may reuse
   * `chunk` once this resolves.
   */
  async write(chunk: Uint8Array): Promise<void> {
    const lent = lentSlabOf(chunk);
    if (lent && this.fill === 0 && this.position % ALIGNMENT === 0 && lent.isAligned(chunk)) {
      const whole = chunk.length - (chunk.length % ALIGNMENT);
      if (whole > 0) {
        await this.roomToWrite();
        this.startWrite(chunk.subarray(0, whole), whole, whole, lent.hold());
        chunk = chunk.subarray(whole);
      }
    }
    for (let at = 0; at < chunk.length; ) {
      if (!this.slab) {
        await this.roomToWrite();
        this.slab = this.slabs.take(this.position === 0 ? FIRST_SLAB : SLAB);
      }
      const piece = Math.min(chunk.length - at, this.slab.length - this.fill);
      this.slab.set(chunk.subarray(at, at + piece), this.fill);
      this.fill += piece;
      at += piece;
      if (this.fill === this.slab.length) this.submit();
    }
  }

  private async roomToWrite(): Promise<void> {
    if (this.failure) throw this.failure;
    while (this.inFlight.size >= WRITES_IN_FLIGHT) await Promise.race(this.inFlight);
    if (this.failure) throw this.failure;
  }

  /** Writes what is left, cuts the file to `size` bytes and syncs it to disk, then closes it. */
  async finish(size: number): Promise<void> {
    try {
      if (this.fill > 0) this.submit();
      await this.settle();
      if (this.failure) throw this.failure;
      if (this.position !== size) throw new Error(`blob file: ${this.position} bytes written, ${size} expected`);
      if (this.padded) await this.handle.truncate(size);
      await this.handle.sync();
    } finally {
      await this.handle.close();
    }
  }

  /** Stops writing and closes the file (the caller removes it). */
  async abort(): Promise<void> {
    await this.settle();
    if (this.slab) this.slabs.give(this.slab);
    this.slab = undefined;
    await this.handle.close().catch(() => {});
  }

  private async settle(): Promise<void> {
    while (this.inFlight.size) await Promise.race(this.inFlight);
    await this.stepSync;
  }

  /** Starts writing the slab being filled; it goes back to the pool once written. */
  private submit(): void {
    const slab = this.slab!;
    const length = this.fill;
    this.slab = undefined;
    this.fill = 0;
    let writeLength = length;
    if (this.willBeDirect() && length % ALIGNMENT !== 0) {
      // Only a blob's last slab is partial: pad it (zeros, not another blob's bytes) and truncate later.
      writeLength = roundUp(length, ALIGNMENT);
      slab.fill(0, length, writeLength);
      this.padded = true;
    }
    this.startWrite(slab, length, writeLength, () => this.slabs.give(slab));
  }

  /** Whether the write at the current position goes around the page cache (turning O_DIRECT on where it starts to). */
  private willBeDirect(): boolean {
    if (!this.triedDirect && this.position >= DIRECT_FROM) this.goDirect();
    return this.direct;
  }

  /**
   * Writes `writeLength` bytes of `bytes` (`length` of the blob's, then any
   * padding) at the current position; `done` runs once written or failed.
   */
  private startWrite(bytes: Uint8Array, length: number, writeLength: number, done: () => void): void {
    this.willBeDirect();
    const position = this.position;
    this.position += length;
    const written: Promise<void> = this.writeAt(bytes, writeLength, position)
      .then(() => this.afterWrite(writeLength), (err) => void (this.failure ??= err))
      .finally(() => {
        this.inFlight.delete(written);
        done();
      });
    this.inFlight.add(written);
  }

  /** Turns O_DIRECT on for the rest of the file, if the addon and the file system allow it. */
  private goDirect(): void {
    this.triedDirect = true;
    if (!optionalNative() || !constants.O_DIRECT) return;
    this.direct = optionalNative()!.setDirect(this.handle.fd, true) === 0;
    // The buffered start of the file goes to disk meanwhile, not all at finish().
    if (this.direct && !this.stepSync) this.startStepSync();
  }

  private async writeAt(slab: Uint8Array, length: number, position: number): Promise<void> {
    let retried = false;
    for (let done = 0; done < length; ) {
      try {
        done += (await this.handle.write(slab, done, length - done, position + done)).bytesWritten;
      } catch (err) {
        // A file system that took O_DIRECT but refuses this write (alignment, or no direct I/O
        // at all): go on buffered. Another write in flight may have turned O_DIRECT off already.
        if (!this.triedDirect || retried || (err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
        retried = true;
        if (this.direct) {
          this.direct = false;
          optionalNative()!.setDirect(this.handle.fd, false);
        }
      }
    }
  }

  private afterWrite(length: number): void {
    if (this.direct) return;
    this.unsynced += length;
    if (this.unsynced >= BUFFERED_SYNC_STEP && !this.stepSync) this.startStepSync();
  }

  private startStepSync(): void {
    this.unsynced = 0;
    this.stepSync = this.handle.datasync().then(
      () => void (this.stepSync = undefined),
      (err) => void (this.failure ??= err),
    );
  }
}

// The sweep of a collection in the local store: removes every directory
// record, small blob and blob file that is not among the live objects.
//
// Order keeps the store's invariant (every stored directory's closure is
// stored) at every instant, whatever kills the process: all dead directory
// records go in one LMDB transaction, before any blob; then the dead small
// blobs, in batches; then the blob files one by one. A dead directory never
// outlives a child it names, and no remaining directory names a removed blob.
// The caller holds the GC lock exclusively (gc-lock.ts).
import { promises as fs } from 'node:fs';
import { join } from 'node:path';
import { digestKey } from '../digest.js';
import { LocalStore, committed } from './local.js';

/** Live objects by hex digest. */
export interface LiveObjects {
  directories: Set<string>;
  blobs: Set<string>;
}

export interface SweepReport {
  directories: number;
  smallBlobs: number;
  blobFiles: number;
  /** Bytes of blob files removed: what the file system gets back. */
  fileBytes: number;
  /** Bytes of directory records and small blobs removed: room the database reuses (its file does not shrink). */
  recordBytes: number;
}

export interface SweepOptions {
  dryRun?: boolean;
  /** Stop removing blob files once this many bytes of them are freed. */
  maxFreed?: number;
  onProgress?: (report: SweepReport) => void;
}

const HEX_DIGEST = /^[0-9a-f]{64}$/;
/** Small blobs removed per transaction. */
const SMALL_BLOB_BATCH = 4096;

export async function sweepLocalStore(root: string, live: LiveObjects, options: SweepOptions = {}): Promise<SweepReport> {
  const store = LocalStore.forCollection(root);
  const report: SweepReport = { directories: 0, smallBlobs: 0, blobFiles: 0, fileBytes: 0, recordBytes: 0 };
  try {
    // Keys only: a live record's value is never read (its pages would count in this process's RSS).
    const deadRecords = (db: typeof store.directories, liveSet: Set<string>) => {
      const dead = new DigestList();
      for (const key of db.getKeys()) {
        // A key that is no digest is no object of ours: left alone.
        if ((key as Buffer).length !== 32 || liveSet.has(digestKey(key as Buffer))) continue;
        dead.push(key as Buffer);
        report.recordBytes += db.getBinaryFast(key as Buffer)?.length ?? 0;
      }
      return dead;
    };
    const deadDirectories = deadRecords(store.directories, live.directories);
    report.directories = deadDirectories.length;
    if (!options.dryRun && deadDirectories.length) {
      await committed(root, `the removal of ${deadDirectories.length} directories`, store.directories.transaction(() => {
        for (const key of deadDirectories.keys()) store.directories.removeSync(key);
      }));
    }
    options.onProgress?.(report);
    const deadSmall = deadRecords(store.smallBlobs, live.blobs);
    report.smallBlobs = deadSmall.length;
    // In batches: a transaction holds a copy of every page it changes. With no dead directory
    // left, no directory names these blobs, so a crash between batches loses nothing.
    for (let at = 0; !options.dryRun && at < deadSmall.length; at += SMALL_BLOB_BATCH) {
      const end = Math.min(at + SMALL_BLOB_BATCH, deadSmall.length);
      await committed(root, `the removal of ${end - at} small blobs`, store.smallBlobs.transaction(() => {
        for (const key of deadSmall.keys(at, end)) store.smallBlobs.removeSync(key);
      }));
    }
    options.onProgress?.(report);
    await sweepBlobFiles(root, live, report, options);
    // Records of blob files that are gone (swept now, or moved aside by verify --repair).
    if (!options.dryRun) {
      const stale: Buffer[] = [];
      for (const key of store.blobFiles.getKeys()) if (!live.blobs.has(digestKey(key as Buffer))) stale.push(Buffer.from(key as Buffer));
      if (stale.length) {
        await committed(root, `the removal of ${stale.length} blob file records`, store.blobFiles.transaction(() => {
          for (const key of stale) store.blobFiles.removeSync(key);
        }));
      }
    }
    return report;
  } finally {
    await store.release();
  }
}

/** Digests (32 bytes each) packed in one growing buffer: a collection lists tens of thousands. */
class DigestList {
  private bytes = Buffer.allocUnsafe(32 * 1024);
  length = 0;

  push(digest: Buffer): void {
    if ((this.length + 1) * 32 > this.bytes.length) {
      const grown = Buffer.allocUnsafe(this.bytes.length * 2);
      this.bytes.copy(grown);
      this.bytes = grown;
    }
    digest.copy(this.bytes, this.length++ * 32);
  }

  *keys(from = 0, to = this.length): Generator<Buffer> {
    for (let i = from; i < to; i++) yield this.bytes.subarray(i * 32, i * 32 + 32);
  }
}

async function sweepBlobFiles(root: string, live: LiveObjects, report: SweepReport, options: SweepOptions): Promise<void> {
  const blobs = join(root, 'blobs');
  let prefixes: string[];
  try {
    prefixes = await fs.readdir(blobs);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  for (const prefix of prefixes.sort()) {
    if (!/^[0-9a-f]{2}$/.test(prefix)) continue; // not ours: never touched
    for (const name of await fs.readdir(join(blobs, prefix))) {
      if (!HEX_DIGEST.test(name) || !name.startsWith(prefix) || live.blobs.has(name)) continue;
      if (options.maxFreed !== undefined && report.fileBytes >= options.maxFreed) return;
      const path = join(blobs, prefix, name);
      let size: number;
      try {
        size = (await fs.lstat(path)).size;
        if (!options.dryRun) await fs.unlink(path);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw err;
      }
      report.blobFiles++;
      report.fileBytes += size;
      if (report.blobFiles % 1000 === 0) options.onProgress?.(report);
    }
  }
}

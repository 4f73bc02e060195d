// How much of the store's LMDB file one process keeps mapped. LMDB reads a value
// where it lies in its memory map, so every small blob and directory a
// long-running server reads stays resident in that process (and counts in its
// RSS) up to the whole file, although those pages are page cache, shared, and
// what a pread(2) of the same bytes would have left cached without counting.
// Past a budget of bytes read, the map's pages are dropped from the process
// (madvise MADV_DONTNEED on a shared mapping: nothing is lost, the page cache
// keeps them); the next read maps a page again with a minor fault.
import { realpathSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { optionalNative } from '../../native/index.js';

/** Bytes read out of the map between two releases (each read also counted as one more page). */
export const MAPPED_METADATA_BUDGET = envBytes('NIXCAS_MAPPED_METADATA_BUDGET', 4 * 1024 * 1024);
const PAGE = 4096;

function envBytes(name: string, fallback: number): number {
  const value = process.env[name];
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${name}=${value}: expected a number of bytes (0: never release the store's mapped pages)`);
  return n;
}

export class MappedBudget {
  private readSinceRelease = 0;

  /** `file` as /proc/self/maps names it (symbolic links resolved); undefined: nothing is ever released. */
  private constructor(private file: string | undefined, private readonly budget: number) {}

  /** The budget of the LMDB environment in `metadataDir`. */
  static forEnvironment(metadataDir: string, budget = MAPPED_METADATA_BUDGET): MappedBudget {
    let file: string | undefined;
    try {
      file = budget > 0 && optionalNative() ? realpathSync(join(metadataDir, 'data.mdb')) : undefined;
    } catch {
      file = undefined; // not there (yet): this process keeps what it maps, as LMDB alone does
    }
    return new MappedBudget(file, budget);
  }

  /** Counts a value of `bytes` read from the map; drops the mapped pages when the budget is spent. */
  read(bytes: number): void {
    if (this.file === undefined) return;
    this.readSinceRelease += bytes + PAGE;
    if (this.readSinceRelease >= this.budget) this.release();
  }

  release(): void {
    this.readSinceRelease = 0;
    const native = this.file === undefined ? undefined : optionalNative();
    if (!native) return;
    // The map stays where LMDB put it (its size is fixed), so where it is is looked up once;
    // each release checks the range still is that file's mapping before it drops anything.
    if (this.releaseRanges(this.ranges)) {
      this.ranges = found(native.mappingsOf(this.file!));
      // Refused even just after it was read: this system does not let the ranges be checked.
      if (this.releaseRanges(this.ranges)) this.file = undefined;
    }
  }

  /** Drops the pages of each range; true when a range is no longer the file's mapping (or none is known). */
  private releaseRanges(ranges: number[] | undefined): boolean {
    if (!ranges) return true;
    const native = optionalNative()!;
    let stale = false;
    for (let i = 0; i + 1 < ranges.length; i += 2) stale ||= native.releaseMapping(this.file!, ranges[i], ranges[i + 1]) === -ESTALE;
    return stale;
  }

  private ranges?: number[];
}

function found(ranges: number[] | number): number[] {
  return typeof ranges === 'number' ? [] : ranges;
}
const ESTALE = osConstants.errno.ESTALE;

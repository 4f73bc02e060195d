// Decoded directories, kept while they are used. A lookup in a directory of
// 100k entries must not decode it again, and a listing needs its entries in
// one sorted array so that a readdir offset is an index.
import type { B3Digest } from '../castore/digest.js';
import { type Node, sortedEntries } from '../castore/model.js';
import type { DirectoryService } from '../castore/directoryservice.js';

export interface LoadedDirectory {
  /** All entries, sorted by name bytes. */
  readonly children: readonly Node[];
  readonly subdirectories: number;
}

/** Binary search of a name among sorted children. */
export function findChild(children: readonly Node[], name: Uint8Array): Node | undefined {
  let low = 0;
  let high = children.length - 1;
  while (low <= high) {
    const middle = (low + high) >>> 1;
    const order = compareBytes(children[middle].node.name, name);
    if (order === 0) return children[middle];
    if (order < 0) low = middle + 1;
    else high = middle - 1;
  }
  return undefined;
}

/**
 * Byte order of two names, in JavaScript: names are short, and a call into
 * Buffer.compare costs more than comparing them here.
 */
export function compareBytes(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    if (a[i] !== b[i]) return a[i] - b[i];
  }
  return a.length - b.length;
}

export class DirectoryCache {
  private readonly loaded = new Map<string, LoadedDirectory>();
  private readonly loading = new Map<string, Promise<LoadedDirectory | undefined>>();
  private cachedEntries = 0;

  constructor(
    private readonly directories: DirectoryService,
    /** Total entries kept; the least recently used directories go first. */
    private readonly capacity = 200_000,
  ) {}

  /** The directory (at once when it is cached), or undefined when the store does not have it. */
  get(digest: B3Digest): LoadedDirectory | Promise<LoadedDirectory | undefined> {
    const key = Buffer.from(digest.buffer, digest.byteOffset, digest.byteLength).toString('latin1');
    const hit = this.loaded.get(key);
    if (hit) {
      this.loaded.delete(key); // re-insert: Map order is the recency order
      this.loaded.set(key, hit);
      return hit;
    }
    let pending = this.loading.get(key);
    if (!pending) {
      pending = this.load(key, digest).finally(() => this.loading.delete(key));
      this.loading.set(key, pending);
    }
    return pending;
  }

  private async load(key: string, digest: B3Digest): Promise<LoadedDirectory | undefined> {
    const directory = await this.directories.get(digest);
    if (!directory) return undefined;
    const loaded: LoadedDirectory = { children: sortedEntries(directory), subdirectories: directory.directories.length };
    this.loaded.set(key, loaded);
    this.cachedEntries += loaded.children.length + 1;
    for (const [oldKey, old] of this.loaded) {
      if (this.cachedEntries <= this.capacity || oldKey === key) break;
      this.loaded.delete(oldKey);
      this.cachedEntries -= old.children.length + 1;
    }
    return loaded;
  }
}

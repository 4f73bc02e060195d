// Open blob readers kept per inode, for reads that come without an open file
// handle (FUSE_NO_OPEN_SUPPORT: the kernel stops sending OPEN and RELEASE, so
// reading a small file costs one request instead of three). The least
// recently used idle readers are closed first.
import type { BlobReader } from '../castore/blobservice.js';

interface Entry {
  reader: Promise<BlobReader>;
  /** The reader once it has opened. */
  opened?: BlobReader;
  /** Reads in progress: a reader is closed only when idle. */
  users: number;
  /** Left the cache (evicted or forgotten) while in use: close when the last user is done. */
  retired: boolean;
}

export class ReaderCache {
  private readonly entries = new Map<number, Entry>();

  constructor(private readonly capacity = 128) {}

  get size(): number {
    return this.entries.size;
  }

  /** Runs `use` with the inode's reader, opening it with `open` if there is none. */
  async with<T>(ino: number, open: () => Promise<BlobReader>, use: (reader: BlobReader) => Promise<T>): Promise<T> {
    let entry = this.entries.get(ino);
    if (entry) {
      this.entries.delete(ino); // re-insert: Map order is the recency order
    } else {
      const created: Entry = { reader: open(), users: 0, retired: false };
      // A failed open is not cached: the next read tries again (a remote store may be back).
      created.reader.then(
        (reader) => void (created.opened = reader),
        () => this.entries.get(ino) === created && this.entries.delete(ino),
      );
      entry = created;
    }
    this.entries.set(ino, entry);
    entry.users++;
    this.evictIdle();
    try {
      return await use(await entry.reader);
    } finally {
      entry.users--;
      if (entry.retired && entry.users === 0) void close(entry);
    }
  }

  /** The inode's reader if it is open already (and counts as a use for recency), without waiting. */
  peek(ino: number): BlobReader | undefined {
    const entry = this.entries.get(ino);
    if (!entry?.opened) return undefined;
    this.entries.delete(ino);
    this.entries.set(ino, entry);
    return entry.opened;
  }

  /** The inode is gone: close its reader (once idle). */
  drop(ino: number): void {
    const entry = this.entries.get(ino);
    if (!entry) return;
    this.entries.delete(ino);
    this.retire(entry);
  }

  async clear(): Promise<void> {
    const entries = [...this.entries.values()];
    this.entries.clear();
    await Promise.allSettled(entries.map((entry) => close(entry)));
  }

  private evictIdle(): void {
    if (this.entries.size <= this.capacity) return;
    for (const [ino, entry] of this.entries) {
      if (this.entries.size <= this.capacity) return;
      if (entry.users > 0) continue;
      this.entries.delete(ino);
      this.retire(entry);
    }
  }

  private retire(entry: Entry): void {
    entry.retired = true;
    if (entry.users === 0) void close(entry);
  }
}

async function close(entry: Entry): Promise<void> {
  try {
    await (await entry.reader).close();
  } catch {
    // never opened, or already closed
  }
}

// A local store in front of a remote one (issue #23): reads are answered
// from `local`; what it lacks is fetched from `remote` once, stored in
// `local` (verified: a blob is stored under the digest its bytes hash to,
// and must hash to the one asked for; directories are checked by the local
// DirectoryService's put), and answered from there from then on. Writes go
// to `remote`, the store of record. Concurrent reads of one missing object
// fetch it once.
import { type BlobReader, type BlobService, type BlobStat, type BlobWriter, streamBlobReader } from './blobservice.js';
import { type B3Digest, digestKey, formatDigest } from './digest.js';
import { type DirectoryService, directoryDigest } from './directoryservice.js';
import { DataLossError } from './errors.js';
import type { Directory } from './model.js';

/** One fetch per key at a time: later askers wait for the first. */
class SingleFlight {
  private readonly running = new Map<string, Promise<boolean>>();

  run(key: string, fetch: () => Promise<boolean>): Promise<boolean> {
    let flight = this.running.get(key);
    if (!flight) {
      flight = fetch().finally(() => this.running.delete(key));
      this.running.set(key, flight);
    }
    return flight;
  }
}

export class CachedBlobService implements BlobService {
  private readonly flights = new SingleFlight();

  constructor(
    private readonly local: BlobService,
    private readonly remote: BlobService,
  ) {}

  /** Makes sure `local` has the blob, fetching it from `remote`; false when neither has it. */
  private async cached(digest: B3Digest): Promise<boolean> {
    if (await this.local.has(digest)) return true;
    return this.flights.run(digestKey(digest), async () => {
      if (await this.local.has(digest)) return true;
      const chunks = await this.remote.readStream(digest);
      if (!chunks) return false;
      const writer = this.local.openWriter();
      let stored: B3Digest;
      try {
        for await (const chunk of chunks) await writer.write(chunk);
        stored = await writer.close();
      } catch (err) {
        await writer.abort();
        throw err;
      }
      if (!stored.equals(digest)) {
        throw new DataLossError(`the remote store sent blob ${formatDigest(digest)} with other bytes (they hash to ${formatDigest(stored)}): not served`);
      }
      return true;
    });
  }

  async has(digest: B3Digest): Promise<boolean> {
    return (await this.local.has(digest)) || this.remote.has(digest);
  }

  async stat(digest: B3Digest): Promise<BlobStat | undefined> {
    return (await this.local.stat(digest)) ?? this.remote.stat(digest);
  }

  async openReader(digest: B3Digest): Promise<BlobReader | undefined> {
    return (await this.cached(digest)) ? this.local.openReader(digest) : undefined;
  }

  async readStream(digest: B3Digest, chunkSize?: number): Promise<AsyncIterable<Buffer> | undefined> {
    const reader = await this.openReader(digest);
    return reader && streamBlobReader(reader, chunkSize);
  }

  readInline(digest: B3Digest, use: (contents: Buffer) => void): boolean {
    return this.local.readInline?.(digest, use) ?? false;
  }

  async openFile(digest: B3Digest) {
    return (await this.cached(digest)) ? this.local.openFile?.(digest) : undefined;
  }

  openWriter(): BlobWriter {
    return this.remote.openWriter();
  }

  async close(): Promise<void> {
    await Promise.all([this.local.close(), this.remote.close()]);
  }
}

export class CachedDirectoryService implements DirectoryService {
  private readonly flights = new SingleFlight();

  constructor(
    private readonly local: DirectoryService,
    private readonly remote: DirectoryService,
  ) {}

  /** Makes sure `local` has the directory and everything below it; false when the remote has none. */
  private cached(digest: B3Digest): Promise<boolean> {
    return this.flights.run(digestKey(digest), async () => {
      if (await this.local.get(digest)) return true;
      // Root first, breadth-first from the remote; the local store takes them leaves first, in one
      // batch: it checks each against its digest and never holds a directory without its children.
      const tree: Directory[] = [];
      try {
        for await (const directory of this.remote.getRecursive(digest)) tree.push(directory);
      } catch (err) {
        if ((err as Error).name === 'NotFoundError') return false;
        throw err;
      }
      if (tree.length === 0) return false;
      await this.local.put(leavesFirst(tree));
      return true;
    });
  }

  async get(digest: B3Digest): Promise<Directory | undefined> {
    return (await this.local.get(digest)) ?? ((await this.cached(digest)) ? this.local.get(digest) : undefined);
  }

  async *getRecursive(digest: B3Digest): AsyncIterable<Directory> {
    await this.cached(digest);
    yield* this.local.getRecursive(digest);
  }

  put(batch: Iterable<Directory>): Promise<B3Digest> {
    return this.remote.put(batch);
  }

  async close(): Promise<void> {
    await Promise.all([this.local.close(), this.remote.close()]);
  }
}

/**
 * A tree given root first (breadth-first, each digest once) in an order where
 * every directory follows the ones it references: depth-first, children
 * before their parent. (Reversing breadth-first order is not enough: a child
 * first met beside a directory that also refers to it would come after it.)
 */
function leavesFirst(tree: Directory[]): Directory[] {
  const byDigest = new Map<string, Directory>();
  for (const directory of tree) byDigest.set(digestKey(directoryDigest(directory)), directory);
  const ordered: Directory[] = [];
  const done = new Set<string>();
  const visit = (directory: Directory, key: string): void => {
    if (done.has(key)) return;
    done.add(key);
    for (const child of directory.directories) {
      const childKey = digestKey(child.digest);
      const found = byDigest.get(childKey);
      if (found) visit(found, childKey);
    }
    ordered.push(directory);
  };
  visit(tree[0]!, digestKey(directoryDigest(tree[0]!)));
  return ordered;
}

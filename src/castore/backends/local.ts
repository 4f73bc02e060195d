// The embedded local store: one directory on disk that several nixcas
// processes may share at once, without a daemon.
//
//   STORE/nixcas-store          marker with the layout version
//   STORE/blobs/ab/abcd…        one file per blob, named by the hex digest
//   STORE/tmp/<pid>-<random>    blobs being written
//   STORE/metadata/             LMDB: directories; path infos (store/backends/local.ts)
//
// A blob is written to tmp/, fsynced, then renamed into blobs/ and the
// directory fsynced: a reader sees a complete blob or none, whatever kills
// the writer. Directories are committed to LMDB in one transaction per batch,
// after their references were checked, so a stored directory's closure is
// always complete. LMDB is multi-process safe by design.
import { randomBytes } from 'node:crypto';
import { constants, promises as fs, readdirSync, unlinkSync, mkdirSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type Database, type RootDatabase, open as openLmdb } from 'lmdb';
import { type BlobReader, type BlobService, type BlobWriter, streamBlobReader } from '../blobservice.js';
import { type B3Digest, createBlake3, digestKey } from '../digest.js';
import { type DirectoryService, checkBatch, walkDirectories } from '../directoryservice.js';
import type { Directory } from '../model.js';
import { decodeDirectory } from '../wire.js';

const LAYOUT_MARKER = 'nixcas-store';
const LAYOUT_VERSION = 1;

function processIsAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class LocalStore {
  private readonly env: RootDatabase;
  private readonly directoryDb: Database<Buffer, Buffer>;
  private users = 0;

  private constructor(readonly root: string) {
    mkdirSync(join(root, 'blobs'), { recursive: true });
    mkdirSync(join(root, 'tmp'), { recursive: true });
    const marker = join(root, LAYOUT_MARKER);
    if (existsSync(marker)) {
      const version = Number(readFileSync(marker, 'utf8').trim().split(' ')[1]);
      if (version !== LAYOUT_VERSION) {
        throw new Error(`${root}: store layout version ${version}, this nixcas reads version ${LAYOUT_VERSION}`);
      }
    } else {
      writeFileSync(marker, `${LAYOUT_MARKER} ${LAYOUT_VERSION}\n`);
    }
    this.removeAbandonedTempFiles();
    this.env = openLmdb({ path: join(root, 'metadata'), maxDbs: 8, compression: false });
    this.directoryDb = this.env.openDB({ name: 'directories', encoding: 'binary', keyEncoding: 'binary' });
  }

  /** Temp files of writers that no longer run (killed mid-write) are garbage. */
  private removeAbandonedTempFiles(): void {
    const tmp = join(this.root, 'tmp');
    for (const name of readdirSync(tmp)) {
      const pid = Number(name.split('-')[0]);
      if (Number.isInteger(pid) && pid > 0 && !processIsAlive(pid)) {
        try {
          unlinkSync(join(tmp, name));
        } catch {
          // Another process cleaned it up first.
        }
      }
    }
  }

  private static readonly open = new Map<string, LocalStore>();

  /** One LocalStore per directory per process, shared by every service that names it. */
  private static acquire(root: string): LocalStore {
    let store = LocalStore.open.get(root);
    if (!store) {
      store = new LocalStore(root);
      LocalStore.open.set(root, store);
    }
    store.users++;
    return store;
  }

  /** A BlobService on the store at `root`; closing it releases the store. */
  static blobService(root: string): LocalBlobService {
    const store = LocalStore.acquire(root);
    return new LocalBlobService(root, () => store.release());
  }

  /** A DirectoryService on the store at `root`; closing it releases the store. */
  static directoryService(root: string): LocalDirectoryService {
    const store = LocalStore.acquire(root);
    return new LocalDirectoryService(store.directoryDb, () => store.release());
  }

  /**
   * Another named database in the store's LMDB environment, for the layers
   * above castore (store/ keeps PathInfos here). Call release() when done.
   */
  static metadataDb<V>(root: string, name: string, options: { encoding: 'msgpack' | 'binary' }): { db: Database<V, Buffer>; release: () => Promise<void> } {
    const store = LocalStore.acquire(root);
    const db = store.env.openDB<V, Buffer>({ name, keyEncoding: 'binary', ...options, useRecords: false } as never);
    return { db, release: () => store.release() };
  }

  private async release(): Promise<void> {
    if (--this.users > 0) return;
    LocalStore.open.delete(this.root);
    await this.env.close();
  }
}

export class LocalBlobService implements BlobService {
  private readonly knownPrefixDirs = new Set<string>();

  constructor(private readonly root: string, readonly onClose?: () => Promise<void>) {}

  private pathOf(digest: B3Digest): string {
    const hex = digestKey(digest);
    return join(this.root, 'blobs', hex.slice(0, 2), hex);
  }

  async has(digest: B3Digest) {
    return (await this.stat(digest)) !== undefined;
  }

  async stat(digest: B3Digest) {
    try {
      const st = await fs.stat(this.pathOf(digest));
      return { size: st.size };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  async openReader(digest: B3Digest): Promise<BlobReader | undefined> {
    let handle: fs.FileHandle;
    try {
      handle = await fs.open(this.pathOf(digest), constants.O_RDONLY);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    const { size } = await handle.stat();
    return {
      size,
      read: async (target, offset, length, position) => (await handle.read(target, offset, length, position)).bytesRead,
      close: () => handle.close(),
    };
  }

  async readStream(digest: B3Digest, chunkSize?: number) {
    const reader = await this.openReader(digest);
    return reader && streamBlobReader(reader, chunkSize);
  }

  openWriter(): BlobWriter {
    const tmpPath = join(this.root, 'tmp', `${process.pid}-${randomBytes(8).toString('hex')}`);
    return new LocalBlobWriter(tmpPath, (digest) => this.publish(tmpPath, digest));
  }

  /** Moves a complete, synced temp file to its content address. */
  private async publish(tmpPath: string, digest: B3Digest): Promise<void> {
    const finalPath = this.pathOf(digest);
    const prefixDir = join(finalPath, '..');
    if (!this.knownPrefixDirs.has(prefixDir)) {
      await fs.mkdir(prefixDir, { recursive: true });
      this.knownPrefixDirs.add(prefixDir);
    }
    if (await this.has(digest)) {
      await fs.unlink(tmpPath); // same content is already there
      return;
    }
    await fs.rename(tmpPath, finalPath);
    const dir = await fs.open(prefixDir, constants.O_RDONLY | constants.O_DIRECTORY);
    try {
      await dir.sync(); // make the rename itself durable
    } finally {
      await dir.close();
    }
  }

  async close() {
    await releaseOnce(this);
  }
}

/**
 * Writes a blob to its temp file. Disk writes are queued rather than awaited
 * one by one, so the next chunk can arrive (from the network, a NAR) while
 * the previous one is written; write() waits only when too much is queued.
 */
class LocalBlobWriter implements BlobWriter {
  private static readonly MAX_QUEUED_BYTES = 8 * 1024 * 1024;
  private readonly hasher = createBlake3();
  private readonly file: Promise<fs.FileHandle>;
  private queue: Promise<void>;
  private queuedBytes = 0;
  private failure: unknown;
  private state: 'open' | 'closed' | 'aborted' = 'open';

  constructor(private readonly tmpPath: string, private readonly publish: (digest: B3Digest) => Promise<void>) {
    this.file = fs.open(tmpPath, 'wx', 0o444);
    this.file.catch(() => {}); // surfaced through the queue
    this.queue = this.file.then(() => {});
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (this.state !== 'open') throw new Error(`blob writer is ${this.state}`);
    if (this.failure) throw this.failure;
    this.hasher.update(chunk);
    this.queuedBytes += chunk.length;
    this.queue = this.queue.then(async () => {
      const fh = await this.file;
      for (let written = 0; written < chunk.length; ) {
        written += (await fh.write(chunk, written, chunk.length - written)).bytesWritten;
      }
      this.queuedBytes -= chunk.length;
    });
    this.queue.catch((err) => (this.failure ??= err));
    if (this.queuedBytes > LocalBlobWriter.MAX_QUEUED_BYTES) await this.queue;
  }

  async close(): Promise<B3Digest> {
    if (this.state !== 'open') throw new Error(`blob writer is ${this.state}`);
    this.state = 'closed';
    const digest = this.hasher.digest();
    try {
      await this.queue;
      const fh = await this.file;
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
      await this.publish(digest);
      return digest;
    } catch (err) {
      await this.discard();
      throw err;
    }
  }

  async abort(): Promise<void> {
    if (this.state === 'open') this.state = 'aborted';
    await this.discard();
  }

  private async discard(): Promise<void> {
    await this.queue.catch(() => {});
    await (await this.file.catch(() => undefined))?.close().catch(() => {});
    await fs.unlink(this.tmpPath).catch(() => {});
  }
}

export class LocalDirectoryService implements DirectoryService {
  constructor(private readonly db: Database<Buffer, Buffer>, readonly onClose?: () => Promise<void>) {}

  async get(digest: B3Digest): Promise<Directory | undefined> {
    const encoded = this.db.get(digest);
    return encoded && decodeDirectory(encoded);
  }

  getRecursive(digest: B3Digest) {
    return walkDirectories((d) => this.get(d), digest);
  }

  async put(batch: Iterable<Directory>): Promise<B3Digest> {
    const { root, ordered } = await checkBatch(batch, (d) => this.get(d));
    await this.db.transaction(() => {
      for (const { digest, encoded } of ordered) this.db.put(digest, encoded);
    });
    return root.digest;
  }

  /** Every stored digest (for consistency checks). */
  *digests(): Iterable<Buffer> {
    for (const key of this.db.getKeys()) yield key as Buffer;
  }

  async close() {
    await releaseOnce(this);
  }
}

const released = new WeakSet<object>();

/** Gives a service's share of its LocalStore back exactly once, however often close() is called. */
async function releaseOnce(service: { onClose?: () => Promise<void> }): Promise<void> {
  if (released.has(service)) return;
  released.add(service);
  await service.onClose?.();
}

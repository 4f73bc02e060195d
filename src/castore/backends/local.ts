// The embedded local store: one directory on disk that several nixcas
// processes may share at once, without a daemon.
//
//   STORE/nixcas-store          marker with the layout version
//   STORE/blobs/ab/abcd…        one file per blob larger than SMALL_BLOB_MAX, named by the hex digest
//   STORE/tmp/<pid>-<random>    large blobs being written
//   STORE/damaged/              objects `nixcas verify --repair` moved aside
//   STORE/metadata/             LMDB: small blobs; directories; path infos (store/backends/local.ts);
//                               records of large blob files found intact (blob-file-record.ts)
//
// A large blob is written to tmp/ (blob-file.ts: past 8 MiB around the page
// cache, with O_DIRECT), fsynced, then renamed into blobs/ and the
// directory fsynced: a reader sees a complete blob or none, whatever kills
// the writer. Small blobs (most files of a Nix store) live in LMDB: creating
// a file costs ~0.5 ms here, an LMDB put a few µs, and puts made together
// share one commit. Directories are committed to LMDB in one transaction per
// batch, after their references were checked, so a stored directory's closure
// is always complete. LMDB commits are ordered, so a directory is never
// durable before the small blobs it names. LMDB is multi-process safe.
//
// Nothing is handed out unchecked (docs/design-notes.md, "verified reads"):
// a small blob and a directory record are hashed when read (a small blob
// once per digest object the caller holds); a large blob's file is hashed in
// full on first use unless its blob-files record shows it unchanged since it
// was last found intact. A mismatch is a DataLossError.
import { randomBytes } from 'node:crypto';
import { type BigIntStats, close, constants, fstatSync, linkSync, open, promises as fs, read, readdirSync, unlinkSync, mkdirSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { dirname, join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { type Database, type RootDatabase, open as openLmdb } from 'lmdb';
import { type BlobFile, type BlobReader, type BlobService, type BlobWriter, type ScatterList, bufferReader, streamBlobReader, writeWhole } from '../blobservice.js';
import { type B3Digest, type Blake3Hasher, blake3, createBlake3, digestKey, formatDigest } from '../digest.js';
import { type DirectoryService, checkBatch, readUnderDigest, walkDirectories } from '../directoryservice.js';
import { DataLossError, StorageFullError } from '../errors.js';
import type { Directory } from '../model.js';
import { decodeDirectory } from '../wire.js';
import { type NativeAddon, optionalNative } from '../../native/index.js';
import { BlobFileWriter } from './blob-file.js';
import { blobFileRecord } from './blob-file-record.js';
import { lentSlabOf } from '../lent-slabs.js';
import { WriteLease } from './gc-lock.js';
import { MappedBudget } from './mapped-budget.js';

const LAYOUT_MARKER = 'nixcas-store';
/**
 * The LMDB map's size, fixed and large (address space, not memory). lmdb-js otherwise starts at
 * the file's size and grows the map as the file grows, and the map it outgrew stays mapped, with
 * its resident pages, for as long as the process lives (a collection held both: 42 MB more RSS).
 */
const MAP_SIZE = 2 ** 40;
/** Version 2 added small blobs in LMDB; version 1 stores are read as they are and upgraded. */
const LAYOUT_VERSION = 2;
const READABLE_LAYOUTS = [1, 2];

/**
 * Temp files are named PID-NONCE-N: the pid tells whether their writer still
 * runs, the nonce keeps a later process that gets the same pid off its names,
 * and a counter is cheaper than random bytes for each of thousands of writers.
 */
const TEMP_NAME_NONCE = randomBytes(6).toString('hex');
const TEMP_NAME = /^([0-9]+)-[0-9a-f]{12}-[0-9]+$/;
/** What the store's own directories and files are made with (the umask can only narrow them). */
const DIRECTORY_MODE = 0o755;
const FILE_MODE = 0o644;
/** The marker's name while it is written, before it is linked in place (placeMarker). */
const MARKER_BEING_PLACED = /^\.nixcas-store\.\d+-[0-9a-f]+$/;

/**
 * Puts the layout marker in place whole: written under a name of its own, then linked (which
 * fails if the marker is there). Writers that make the same store at once all succeed, and
 * none of them ever reads a marker half written.
 */
function placeMarker(marker: string): void {
  const dir = dirname(marker);
  const staging = join(dir, `.nixcas-store.${process.pid}-${randomBytes(4).toString('hex')}`);
  writeFileSync(staging, `${LAYOUT_MARKER} ${LAYOUT_VERSION}\n`, { mode: FILE_MODE });
  try {
    linkSync(staging, marker);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  } finally {
    unlinkSync(staging);
  }
}
let tempFiles = 0;

/** Blobs up to this size are kept in LMDB rather than as files. */
export const SMALL_BLOB_MAX = 64 * 1024;

function processIsAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** What a database that does not exist reads as, in a store opened read-only: nothing. */
const EMPTY_DATABASE = {
  get: () => undefined,
  getBinaryFast: () => undefined,
  doesExist: () => false,
  getRange: () => [],
  getKeys: () => [],
} as unknown as Database<Buffer, Buffer>;

export interface OpenOptions {
  /** Make a store where there is none, if the directory is empty or missing (default true; read-only commands say false). */
  create?: boolean;
}

export class LocalStore {
  private readonly env: RootDatabase;
  private readonly directoryDb: Database<Buffer, Buffer>;
  private readonly smallBlobDb: Database<Buffer, Buffer>;
  private readonly blobFileDb: Database<Buffer, Buffer>;
  /** Held while this process writes, so that a collection never sweeps what it is about to register (gc-lock.ts). */
  private readonly lease?: WriteLease;
  private users = 0;

  /**
   * `create` false: the store is only read (a command that writes nothing).
   * Then nothing is written to it either: LMDB is opened read-only, which
   * also works on a read-only file system, and no clean-up or upgrade runs.
   */
  private constructor(readonly root: string, create: boolean) {
    const marker = join(root, LAYOUT_MARKER);
    const readOnly = !create;
    if (existsSync(marker)) {
      const version = Number(readFileSync(marker, 'utf8').trim().split(' ')[1]);
      if (!READABLE_LAYOUTS.includes(version)) {
        throw new Error(`${root}: store layout version ${version}, this nixcas reads versions ${READABLE_LAYOUTS.join(' and ')}`);
      }
      if (version !== LAYOUT_VERSION && !readOnly) writeFileSync(marker, `${LAYOUT_MARKER} ${LAYOUT_VERSION}\n`);
    } else {
      LocalStore.createIn(root, create);
      // The marker first: a creation cut short is still recognised as a store, never as someone's directory.
      placeMarker(marker);
    }
    if (!readOnly) {
      observeLmdbBatchRejections();
      // Explicit modes: a store is never world-writable, whatever the umask.
      for (const dir of ['blobs', 'tmp', 'metadata']) mkdirSync(join(root, dir), { recursive: true, mode: DIRECTORY_MODE });
      this.removeAbandonedTempFiles();
    }
    // overlappingSync off: with it, a SIGKILL was seen to leave a directory durable without a small blob
    // committed before it (test/crash.test.ts). Plain LMDB commits are durable and ordered when they resolve.
    const metadata = join(root, 'metadata');
    try {
      this.env = openLmdb({ path: metadata, maxDbs: 8, compression: false, overlappingSync: false, readOnly, mapSize: MAP_SIZE });
    } catch (err) {
      const message = (err as Error).message;
      const denied = /permission denied|read-only file system|operation not permitted/i.test(message);
      const hint = denied && !readOnly ? ': this command stores things there, which needs write access to the store directory; commands that only read (nar, mount, virtiofs) do not' : '';
      throw new Error(`${root}: cannot open the store's database ${metadata}: ${message}${hint}`, { cause: err });
    }
    this.readOnly = readOnly;
    this.directoryDb = this.openBinary('directories');
    this.smallBlobDb = this.openBinary('small-blobs');
    this.blobFileDb = this.openBinary('blob-files');
    this.mapped = MappedBudget.forEnvironment(metadata);
    if (!readOnly) this.lease = new WriteLease(root);
  }

  private readonly readOnly: boolean;
  /** What reads of small blobs and directories leave mapped (mapped-budget.ts). */
  readonly mapped: MappedBudget;

  /**
   * A named database. Read-only, one that was never written (a layout-1
   * store has no small-blobs; an empty store no pathinfos) reads as empty.
   */
  private openBinary(name: string): Database<Buffer, Buffer> {
    // lmdb-js returns undefined for a database it may not create.
    return (this.env.openDB({ name, encoding: 'binary', keyEncoding: 'binary' }) as Database<Buffer, Buffer> | undefined) ?? EMPTY_DATABASE;
  }

  /**
   * A directory without the marker becomes a store only when it is missing or
   * empty, and only for a command that writes: nixcas never fills someone
   * else's directory with its own files.
   */
  private static createIn(root: string, create: boolean): void {
    if (!create) {
      throw new Error(
        `${root} holds no nixcas store (there is no ${LAYOUT_MARKER} file in it), and this command only reads one: ` +
          'make one with `nixcas import` or `nixcas copy`, or name another with --store',
      );
    }
    let entries: string[];
    try {
      entries = readdirSync(root);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new Error(`${root}: cannot make a store there: ${(err as Error).message}`, { cause: err });
      entries = [];
    }
    // A file system of its own, mounted there, starts with lost+found: that counts as empty. So
    // does a marker being placed by a writer that started at the same time (see placeMarker),
    // or left half-placed by one that was killed.
    if (entries.includes(LAYOUT_MARKER)) return;
    entries = entries.filter((name) => name !== 'lost+found' && !MARKER_BEING_PLACED.test(name));
    if (entries.length > 0) {
      const shown = entries.slice(0, 3).join(', ') + (entries.length > 3 ? ', …' : '');
      throw new Error(
        `${root} is not a nixcas store (there is no ${LAYOUT_MARKER} file in it) and is not empty (${shown}): ` +
          'nixcas makes a new store only in an empty or missing directory; name another with --store',
      );
    }
    mkdirSync(root, { recursive: true, mode: DIRECTORY_MODE });
  }

  /**
   * Temp files of writers that no longer run (killed mid-write) are garbage.
   * Only names nixcas gives its temp files (PID-NONCE-N) are touched.
   */
  private removeAbandonedTempFiles(): void {
    const tmp = join(this.root, 'tmp');
    for (const name of readdirSync(tmp)) {
      const ours = TEMP_NAME.exec(name);
      if (!ours) continue;
      const pid = Number(ours[1]);
      if (pid > 0 && !processIsAlive(pid)) {
        try {
          unlinkSync(join(tmp, name));
        } catch {
          // Another process cleaned it up first.
        }
      }
    }
  }

  private static readonly open = new Map<string, LocalStore>();

  /**
   * One LocalStore per directory per process, shared by every service that
   * names it. `create`: whether a missing store may be made here (see createIn).
   */
  private static acquire(root: string, create: boolean): LocalStore {
    let store = LocalStore.open.get(root);
    if (store && create && store.readOnly) throw new Error(`${root}: the store is open read-only in this process and cannot also be written`);
    if (!store) {
      store = new LocalStore(root, create);
      LocalStore.open.set(root, store);
    }
    store.users++;
    return store;
  }

  /** A BlobService on the store at `root`; closing it releases the store. */
  static blobService(root: string, options: OpenOptions = {}): LocalBlobService {
    const store = LocalStore.acquire(root, options.create ?? true);
    return new LocalBlobService(root, store.smallBlobDb, store.blobFileDb, !store.readOnly, () => store.release(), store.lease, store.mapped);
  }

  /** A DirectoryService on the store at `root`; closing it releases the store. */
  static directoryService(root: string, options: OpenOptions = {}): LocalDirectoryService {
    const store = LocalStore.acquire(root, options.create ?? true);
    return new LocalDirectoryService(root, store.directoryDb, () => store.release(), store.lease, store.mapped);
  }

  /**
   * Another named database in the store's LMDB environment, for the layers
   * above castore (store/ keeps PathInfos here). Call release() when done.
   */
  static metadataDb<V>(root: string, name: string, options: { encoding: 'msgpack' | 'binary' } & OpenOptions): { db: Database<V, Buffer>; release: () => Promise<void>; lease?: WriteLease } {
    const store = LocalStore.acquire(root, options.create ?? true);
    // Read-only, a database never written is undefined: it reads as empty.
    const db =
      (store.env.openDB<V, Buffer>({ name, keyEncoding: 'binary', encoding: options.encoding, useRecords: false } as never) as Database<V, Buffer> | undefined) ??
      (EMPTY_DATABASE as unknown as Database<V, Buffer>);
    return { db, release: () => store.release(), lease: store.lease };
  }

  /**
   * What a collection needs of the store at `root` (castore/backends/sweep.ts): its object
   * databases. Only for a caller that holds the GC lock exclusively; release() when done.
   */
  static forCollection(root: string): { directories: Database<Buffer, Buffer>; smallBlobs: Database<Buffer, Buffer>; blobFiles: Database<Buffer, Buffer>; release: () => Promise<void> } {
    // A collection writes, but never makes a store where there is none.
    if (!existsSync(join(root, LAYOUT_MARKER))) throw new Error(`${root} holds no nixcas store (there is no ${LAYOUT_MARKER} file in it): there is nothing to collect`);
    const store = LocalStore.acquire(root, true);
    return { directories: store.directoryDb, smallBlobs: store.smallBlobDb, blobFiles: store.blobFileDb, release: () => store.release() };
  }

  private async release(): Promise<void> {
    if (--this.users > 0) return;
    LocalStore.open.delete(this.root);
    this.lease?.release();
    await this.env.close();
  }
}

/** Whether reads are checked; NIXCAS_VERIFY_READS=0 is for measuring what the checks cost (bench/), nothing else. */
export const VERIFY_READS = process.env.NIXCAS_VERIFY_READS !== '0';
/** Large blob files found intact by a process that cannot record it (a read-only store): remembered up to this many. */
const REMEMBERED_FILES = 65536;

export class LocalBlobService implements BlobService {
  private readonly knownPrefixDirs = new Set<string>();
  /** Digest objects whose small blob was checked: a caller that keeps its digest (a decoded directory) pays once. */
  private readonly checkedSmall = new WeakSet<Uint8Array>();
  /** Files found intact here, by hex digest: the record they had then. */
  private readonly checkedFiles = new Map<string, Buffer>();

  constructor(
    private readonly root: string,
    private readonly smallBlobs: Database<Buffer, Buffer>,
    private readonly fileRecords: Database<Buffer, Buffer>,
    private readonly writable: boolean,
    readonly onClose?: () => Promise<void>,
    private readonly lease?: WriteLease,
    private readonly mapped?: MappedBudget,
  ) {}

  /** `data`, the small blob stored under `digest`, unless it does not hash to it. */
  private checkedSmallBlob(digest: B3Digest, data: Buffer): Buffer {
    this.mapped?.read(data.length);
    if (!VERIFY_READS || this.checkedSmall.has(digest)) return data;
    if (!hashesTo(data, digest)) {
      throw new DataLossError(
        `the store at ${this.root} is damaged: small blob ${formatDigest(digest)} (${data.length} bytes, in metadata/) does not hash to its digest; ` +
          'nothing of it was served, and whatever holds it must be imported again',
      );
    }
    this.checkedSmall.add(digest);
    return data;
  }

  /**
   * Makes sure the open file `fd` (with `stats`) of a large blob holds what
   * `digest` names: at once when its record says it is unchanged since it
   * was found intact, otherwise by hashing it in full (then recorded, when
   * this process may).
   */
  private async checkFile(fd: number, stats: BigIntStats, digest: B3Digest): Promise<void> {
    if (!VERIFY_READS) return;
    const record = blobFileRecord(stats);
    const stored = this.fileRecords.getBinaryFast(digest);
    if (stored && record.equals(stored.subarray(0, stored.length))) return;
    const key = digestKey(digest);
    if (this.checkedFiles.get(key)?.equals(record)) return;
    const found = await hashFile(fd);
    if (!found.equals(digest)) {
      throw new DataLossError(
        `the store at ${this.root} is damaged: blob ${formatDigest(digest)} (file ${this.pathOf(digest)}, ${record.readBigUInt64LE(16)} bytes) ` +
          `does not hash to its digest (it hashes to ${formatDigest(found)}); nothing of it was served, and whatever holds it must be imported again`,
      );
    }
    this.rememberFile(digest, key, record);
  }

  private rememberFile(digest: B3Digest, key: string, record: Buffer): void {
    if (this.writable) {
      // A record that does not make it to disk (a full disk) only means hashing the file again later.
      committed(this.root, `the record of blob ${formatDigest(digest)}`, this.fileRecords.put(digest, record)).catch(() => {});
      return;
    }
    if (this.checkedFiles.size >= REMEMBERED_FILES) this.checkedFiles.delete(this.checkedFiles.keys().next().value!);
    this.checkedFiles.set(key, record);
  }

  private pathOf(digest: B3Digest): string {
    const hex = digestKey(digest);
    return join(this.root, 'blobs', hex.slice(0, 2), hex);
  }

  async has(digest: B3Digest) {
    // A writer that finds a blob there relies on it being there until it registers what uses it.
    await this.lease?.hold();
    if (this.smallBlobs.doesExist(digest)) return true;
    return (await this.stat(digest)) !== undefined;
  }

  async stat(digest: B3Digest) {
    const small = this.smallBlobs.get(digest);
    if (small) return { size: small.length };
    try {
      const st = await fs.stat(this.pathOf(digest));
      return { size: st.size };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  readInline(digest: B3Digest, use: (contents: Buffer) => void): boolean {
    // The reusable buffer LMDB reads into: no copy, valid until the next read. Its
    // `length` is set to the value's size but the array is larger, so take a view.
    const contents = this.smallBlobs.getBinaryFast(digest);
    if (!contents) return false;
    use(this.checkedSmallBlob(digest, contents.subarray(0, contents.length)));
    return true;
  }

  async openReader(digest: B3Digest): Promise<BlobReader | undefined> {
    const small = this.smallBlobs.get(digest);
    if (small) return bufferReader(this.checkedSmallBlob(digest, small));
    const file = await this.openCheckedFile(digest);
    return file && fileReader(file.fd, file.size);
  }

  async openFile(digest: B3Digest): Promise<BlobFile | undefined> {
    if (this.smallBlobs.doesExist(digest)) return undefined;
    const file = await this.openCheckedFile(digest);
    if (!file) return undefined;
    const { fd } = file;
    return { fd, size: file.size, close: () => new Promise<void>((resolve) => close(fd, () => resolve())) };
  }

  /** The large blob's file, open and checked (checkFile), and its size; undefined when there is none. */
  private async openCheckedFile(digest: B3Digest): Promise<{ fd: number; size: number } | undefined> {
    let fd: number;
    try {
      fd = await openFd(this.pathOf(digest));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    try {
      // fstat of an open fd never waits for the disk.
      const stats = fstatSync(fd, { bigint: true });
      await this.checkFile(fd, stats, digest);
      return { fd, size: Number(stats.size) };
    } catch (err) {
      close(fd, () => {});
      throw err;
    }
  }

  async readStream(digest: B3Digest, chunkSize?: number) {
    const found = this.smallBlobs.get(digest);
    const small = found && this.checkedSmallBlob(digest, found);
    if (small && small.length <= (chunkSize ?? Infinity)) return (async function* () { yield small; })();
    const reader = await this.openReader(digest);
    return reader && streamBlobReader(reader, chunkSize);
  }

  openWriter(): BlobWriter {
    const tmpPath = join(this.root, 'tmp', `${process.pid}-${TEMP_NAME_NONCE}-${++tempFiles}`);
    return new LocalBlobWriter(
      tmpPath,
      (digest) => this.publish(tmpPath, digest),
      (digest, data) => this.publishSmall(digest, data),
    );
  }

  async put(data: Buffer): Promise<B3Digest> {
    if (data.length > SMALL_BLOB_MAX) return writeWhole(this, data);
    const digest = blake3(data);
    await this.publishSmall(digest, data);
    return digest;
  }

  /**
   * Where a writer outside this object (the native NAR ingest, store/nar/native-ingest.ts) makes
   * its temp files: a fresh prefix, to which it appends a number, of names abandoned-file
   * clean-up recognises (TEMP_NAME).
   */
  tempFilePrefix(): string {
    return join(this.root, 'tmp', `${process.pid}-${randomBytes(6).toString('hex')}-`);
  }

  /** A complete, synced file made under tempFilePrefix(), which its writer hashed to `digest` as it wrote it: moved to its address. */
  async adoptTempFile(tmpPath: string, digest: B3Digest): Promise<void> {
    await this.lease?.hold();
    await this.publish(tmpPath, digest);
  }

  /** A small blob whose digest its caller computed from these bytes (the native NAR ingest). */
  putHashed(digest: B3Digest, data: Buffer): Promise<void> {
    if (data.length > SMALL_BLOB_MAX) throw new RangeError(`a blob of ${data.length} bytes is not small`);
    return this.publishSmall(digest, data);
  }

  /** Stores a small blob in LMDB; puts made in the same tick share one commit. */
  private async publishSmall(digest: B3Digest, data: Buffer): Promise<void> {
    await this.lease?.hold();
    if (this.smallBlobs.doesExist(digest)) return;
    await committed(this.root, `small blob ${formatDigest(digest)}`, this.smallBlobs.put(digest, data));
  }

  /** Every small blob (for consistency checks). */
  *smallBlobEntries(): Iterable<{ digest: Buffer; data: Buffer }> {
    for (const { key, value } of this.smallBlobs.getRange()) yield { digest: key as Buffer, data: value };
  }

  /** Moves a complete, synced temp file to its content address. */
  private async publish(tmpPath: string, digest: B3Digest): Promise<void> {
    const finalPath = this.pathOf(digest);
    const prefixDir = join(finalPath, '..');
    if (!this.knownPrefixDirs.has(prefixDir)) {
      await fs.mkdir(prefixDir, { recursive: true, mode: DIRECTORY_MODE });
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
    // Hashed as it was written, so intact as it is now (the rename changed its ctime: stat after it).
    const stats = (await fs.stat(finalPath, { bigint: true })) as BigIntStats;
    this.rememberFile(digest, digestKey(digest), blobFileRecord(stats));
  }

  /**
   * Moves a damaged blob out of the way (`nixcas verify --repair`): its bytes
   * to STORE/damaged/, so that it reads as missing rather than wrong and the
   * next import or copy of a path that holds it stores it afresh. Returns
   * where the bytes went; undefined when the store has no such blob.
   */
  async quarantine(digest: B3Digest): Promise<string | undefined> {
    const aside = await damagedPath(this.root, `blob-${digestKey(digest)}`);
    const small = this.smallBlobs.get(digest);
    if (small) {
      await fs.writeFile(aside, small, { mode: FILE_MODE });
      await committed(this.root, `the removal of small blob ${formatDigest(digest)}`, this.smallBlobs.remove(digest));
      return aside;
    }
    try {
      await fs.rename(this.pathOf(digest), aside);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    await committed(this.root, `the removal of the record of blob ${formatDigest(digest)}`, this.fileRecords.remove(digest));
    return aside;
  }

  async close() {
    await releaseOnce(this);
  }
}

/** A fresh name under STORE/damaged/ for something moved aside (the directory is made on first use). */
async function damagedPath(root: string, name: string): Promise<string> {
  const dir = join(root, 'damaged');
  await fs.mkdir(dir, { recursive: true, mode: DIRECTORY_MODE });
  return join(dir, `${name}-${Date.now()}`);
}

/** The chunk itself when it owns its memory; a copy when it is a view into a larger buffer it would keep alive. */
function ownedCopy(chunk: Uint8Array): Buffer {
  const view = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  return chunk.byteLength === chunk.buffer.byteLength ? view : Buffer.from(view);
}

/**
 * Writes a blob. The first SMALL_BLOB_MAX bytes are held in memory; a blob
 * that stays that small goes to LMDB and never touches a file. Past that, the
 * bytes go to a temp file (blob-file.ts), which is synced before it is
 * renamed to the blob's address.
 */
class LocalBlobWriter implements BlobWriter {
  /** Created once the blob outgrows SMALL_BLOB_MAX; a small one is hashed whole at close(). */
  private hasher?: Blake3Hasher;
  private held: Uint8Array[] = [];
  private heldBytes = 0;
  private file?: Promise<BlobFileWriter>;
  private size = 0;
  /** write() calls run one after another, even when a caller does not wait for the last. */
  private writing: Promise<void> = Promise.resolve();
  private state: 'open' | 'closed' | 'aborted' = 'open';

  constructor(
    private readonly tmpPath: string,
    private readonly publish: (digest: B3Digest) => Promise<void>,
    private readonly publishSmall: (digest: B3Digest, data: Buffer) => Promise<void>,
  ) {}

  write(chunk: Uint8Array): Promise<void> {
    if (this.state !== 'open') return Promise.reject(new Error(`blob writer is ${this.state}`));
    this.writing = this.writing.then(() => this.append(chunk));
    return this.writing;
  }

  private async append(chunk: Uint8Array): Promise<void> {
    if (!this.file) {
      if (this.heldBytes + chunk.length <= SMALL_BLOB_MAX) {
        // Kept until close(): lent memory only as a copy.
        this.held.push(lentSlabOf(chunk) ? Buffer.from(chunk) : chunk);
        this.heldBytes += chunk.length;
        return;
      }
      // Too big for LMDB: continue as a file, starting with what was held.
      this.hasher = createBlake3();
      this.file = BlobFileWriter.create(this.tmpPath);
      const held = this.held;
      this.held = [];
      this.heldBytes = 0;
      for (const piece of held) await this.appendToFile(piece);
    }
    await this.appendToFile(chunk);
  }

  private async appendToFile(chunk: Uint8Array): Promise<void> {
    this.hasher!.update(chunk);
    this.size += chunk.length;
    await (await this.file!).write(chunk);
  }

  async close(): Promise<B3Digest> {
    if (this.state !== 'open') throw new Error(`blob writer is ${this.state}`);
    this.state = 'closed';
    try {
      await this.writing;
    } catch (err) {
      await this.discard();
      throw err;
    }
    if (!this.file) {
      const data = this.held.length === 1 ? ownedCopy(this.held[0]!) : Buffer.concat(this.held);
      this.held = [];
      const digest = blake3(data);
      await this.publishSmall(digest, data);
      return digest;
    }
    const digest = this.hasher!.digest();
    try {
      await (await this.file).finish(this.size);
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
    this.held = [];
    if (!this.file) return;
    await this.writing.catch(() => {});
    await (await this.file.catch(() => undefined))?.abort();
    await fs.unlink(this.tmpPath).catch(() => {});
  }
}

export class LocalDirectoryService implements DirectoryService {
  constructor(
    private readonly root: string,
    private readonly db: Database<Buffer, Buffer>,
    readonly onClose?: () => Promise<void>,
    private readonly lease?: WriteLease,
    private readonly mapped?: MappedBudget,
  ) {}

  async get(digest: B3Digest): Promise<Directory | undefined> {
    const encoded = this.db.get(digest);
    if (!encoded) return undefined;
    this.mapped?.read(encoded.length);
    if (VERIFY_READS && !hashesTo(encoded, digest)) {
      throw new DataLossError(
        `the store at ${this.root} is damaged: directory ${formatDigest(digest)} (${encoded.length} bytes, in metadata/) does not hash to its digest; ` +
          'whatever holds it must be imported again',
      );
    }
    let directory: Directory;
    try {
      directory = decodeDirectory(encoded);
    } catch (err) {
      throw new Error(`directory ${formatDigest(digest)} is malformed (${(err as Error).message}): the store is damaged`);
    }
    // Its bytes hash to the key (checked above): the key is its digest.
    return readUnderDigest(directory, digest);
  }

  getRecursive(digest: B3Digest) {
    return walkDirectories((d) => this.get(d), digest);
  }

  async put(batch: Iterable<Directory>): Promise<B3Digest> {
    // Before the check that the children are there: they must stay until the path is registered.
    await this.lease?.hold();
    const { root, ordered } = await checkBatch(batch, (d) => this.get(d));
    const written = this.db.transaction(() => {
      for (const { digest, encoded } of ordered) this.db.put(digest, encoded);
    });
    await committed(this.root, `${ordered.length} directories`, written);
    return root.digest;
  }

  /** Moves a damaged directory record to STORE/damaged/ (see LocalBlobService.quarantine). */
  async quarantine(digest: B3Digest): Promise<string | undefined> {
    const encoded = this.db.get(digest);
    if (!encoded) return undefined;
    const aside = await damagedPath(this.root, `directory-${digestKey(digest)}`);
    await fs.writeFile(aside, encoded, { mode: FILE_MODE });
    await committed(this.root, `the removal of directory ${formatDigest(digest)}`, this.db.remove(digest));
    return aside;
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

// Blob files are read with raw fds and the callback API: FUSE and virtio-fs
// reads go through here, and each FileHandle promise hop costs more than the
// read of a cached page. fstat of an open fd never waits for the disk, so it
// is done synchronously.
/** Bytes read without waiting for the disk, or -1 when the data is not cached (or the addon is missing). */
function readCached(fd: number, target: Uint8Array, offset: number, length: number, position: number): number {
  const addon = nativeReader();
  return addon ? checkedRead(addon.readCached(fd, target, offset, length, position)) : -1;
}

/** Like readCached, into the pieces of a scatter list in turn; -1 when not (all) cached. */
function readCachedScatter(fd: number, targets: ScatterList, position: number): number {
  const addon = nativeReader();
  return addon ? checkedRead(addon.readCachedScatter(fd, targets.buffers, targets.spans, targets.count, position)) : -1;
}

/** The addon for cached reads, unless it is missing or the file system has no RWF_NOWAIT. */
function nativeReader(): NativeAddon | undefined {
  return noWaitUnsupported ? undefined : optionalNative();
}

function checkedRead(n: number): number {
  if (n === -EOPNOTSUPP) noWaitUnsupported = true; // a filesystem without RWF_NOWAIT: stop trying
  return Math.max(-1, n);
}
const EOPNOTSUPP = osConstants.errno.EOPNOTSUPP;
let noWaitUnsupported = false;

function openFd(path: string): Promise<number> {
  return new Promise((resolve, reject) => open(path, constants.O_RDONLY, (err, fd) => (err ? reject(err) : resolve(fd))));
}

function fileReader(fd: number, size: number): BlobReader {
  let closed: Promise<void> | undefined;
  return {
    size,
    fd,
    read: (target, offset, length, position) => {
      // What the page cache holds is read at once; only the rest goes to libuv's thread pool,
      // whose round trip costs many times more than copying a cached 128 KiB.
      const n = readCached(fd, target, offset, length, position);
      if (n >= 0) return Promise.resolve(n);
      return new Promise((resolve, reject) => read(fd, target, offset, length, position, (err, n) => (err ? reject(err) : resolve(n))));
    },
    tryReadv: (targets, length, position) => {
      // Only a whole answer counts: a short read would look like the end of the file.
      const wanted = Math.min(length, size - position);
      if (wanted <= 0) return 0;
      const n = readCachedScatter(fd, targets, position);
      return n === wanted ? n : undefined;
    },
    close: () => (closed ??= new Promise<void>((resolve) => close(fd, () => resolve()))),
  };
}

/** Whether `data` hashes to `digest`, without making a digest Buffer where the addon is there. */
function hashesTo(data: Uint8Array, digest: B3Digest): boolean {
  const addon = optionalNative();
  return addon ? addon.blake3Matches(data, digest) : blake3(data).equals(digest);
}

const HASH_STEP = 1024 * 1024;

/** The BLAKE3 of a whole open file, read in steps through libuv's pool. */
async function hashFile(fd: number): Promise<B3Digest> {
  const hasher = createBlake3();
  const step = Buffer.allocUnsafe(HASH_STEP);
  for (let position = 0; ; ) {
    const n = await new Promise<number>((resolve, reject) => read(fd, step, 0, step.length, position, (err, bytes) => (err ? reject(err) : resolve(bytes))));
    if (n === 0) return hasher.digest();
    hasher.update(step.subarray(0, n));
    position += n;
  }
}

let observingBatchRejections = false;

/**
 * lmdb-js starts each event turn's write batch with a promise of its own that
 * nothing awaits; when that batch's commit fails (a full disk), the promise is
 * rejected and Node would end the process for it. Every write of ours awaits
 * its own promise (committed()), so a commit failure nobody awaited is that
 * one: it is dropped. Any other unhandled rejection is rethrown, and ends the
 * process as it would have.
 */
function observeLmdbBatchRejections(): void {
  if (observingBatchRejections) return;
  observingBatchRejections = true;
  // lmdb-js also prints the cause of a failed commit, stack and all, with console.error; the cause
  // reaches the caller in its StorageFullError (committed()), which says it once, in one line.
  const print = console.error.bind(console);
  console.error = (...args: unknown[]) => {
    const [first] = args;
    if (args.length === 1 && first instanceof Error && typeof (first as NodeJS.ErrnoException).code === 'number' && /[/\\]lmdb[/\\]/.test(first.stack ?? '')) return;
    print(...args);
  };
  process.on('unhandledRejection', (reason) => {
    if (reason instanceof Error && 'commitError' in reason) {
      (reason.commitError as Promise<unknown>).catch(() => {});
      return;
    }
    throw reason;
  });
}

/** How long a failed commit's cause is waited for before the error is reported without it. */
const COMMIT_CAUSE_WAIT_MS = 100;

/**
 * Awaits an LMDB write. lmdb-js fails every write of a commit that failed
 * (a full file system, the map at its limit, a disk error) with one generic
 * error, and rejects that error's `commitError` promise with the cause: left
 * unobserved, that rejection ended the process. Both are taken here and
 * become one StorageFullError naming the store and the cause.
 */
export async function committed<T>(root: string, what: string, write: Promise<T>): Promise<T> {
  try {
    return await write;
  } catch (err) {
    const commitError = (err as { commitError?: Promise<unknown> }).commitError;
    if (!commitError) throw err;
    const cause = await Promise.race([
      commitError.then(() => undefined, (reason: unknown) => reason),
      delay(COMMIT_CAUSE_WAIT_MS, undefined, { ref: false }),
    ]);
    const detail = cause instanceof Error ? cause.message : 'lmdb gave no cause';
    throw new StorageFullError(
      `the store at ${root} could not commit ${what} to its database (${detail}): is its file system full? ` +
        'Nothing of this write was kept; reads go on, and writes work again once there is room',
      { cause: cause ?? err },
    );
  }
}

// The read-only filesystem over castore nodes, independent of any transport:
// FUSE over /dev/fuse and virtio-fs both drive it with plain values.
//
// Inodes are handed out per (parent, name), so the same content at two places
// is two inodes (and a file's mode never leaks to an identical file with
// another executable bit). The kernel counts its references to an inode
// (every lookup, every readdirplus entry) and gives them back with forget;
// an inode whose count drops to zero is dropped, so memory follows what the
// kernel holds, not what was ever visited.
import { type BlobReader, type BlobService, type ScatterList, copyToScatter } from '../castore/blobservice.js';
import { formatDigest } from '../castore/digest.js';
import type { DirectoryService } from '../castore/directoryservice.js';
import { displayName, type Node } from '../castore/model.js';
import {
  IMMUTABLE_TIMEOUT,
  ROOT_ATTRIBUTE_TIMEOUT,
  nodeAttributes,
  rootAttributes,
  type Attributes,
  type Entry,
} from './attributes.js';
import { ReaderCache } from './reader-cache.js';
import { DirectoryCache, findChild, type LoadedDirectory } from './directory-cache.js';
import { FsError } from './errors.js';

export const ROOT_INODE = 1;

/** A value now, or later: the hot paths (a cached directory, a file's attributes) answer without a promise. */
export type MaybePromise<T> = T | Promise<T>;

function then<T, U>(value: MaybePromise<T>, next: (value: T) => MaybePromise<U>): MaybePromise<U> {
  return value instanceof Promise ? value.then(next) : next(value);
}

/** The top level: which names exist (store path basenames) and what each one is. */
export interface RootProvider {
  lookup(name: Buffer): Promise<Node | undefined>;
  list(): AsyncIterable<Node>;
}

export interface FilesystemOptions {
  /** Allow listing the root; lookups of known names work either way. */
  listRoot?: boolean;
  /** Entries of decoded directories kept in memory. */
  directoryCacheEntries?: number;
  /** A cache shared with other filesystems over the same store (one per VM with virtio-fs). */
  directoryCache?: DirectoryCache;
}

interface Inode {
  readonly ino: number;
  /** undefined for the root. */
  readonly node?: Node;
  readonly parent?: Inode;
  /** References the kernel holds. */
  lookups: number;
  /** Children the kernel knows, by name bytes (latin1), so a name keeps its inode. */
  children?: Map<string, Inode>;
  /** A file whose blob the store keeps in memory (readInline), once the first read found out; false: it does not. */
  inline?: boolean;
  /** A directory's decoded contents once loaded: immutable, and kept no longer than the kernel holds the inode. */
  directory?: LoadedDirectory;
  /** Its entry (attributes and timeouts), once made. */
  entry?: Entry;
}

/** Every inode has the same fields from the start, so the code that reads them sees one shape. */
function newInode(ino: number, node: Node | undefined, parent: Inode | undefined, lookups: number): Inode {
  return { ino, node, parent, lookups, children: undefined, inline: undefined, directory: undefined, entry: undefined };
}

/** One entry of a directory listing; `offset` is where the next listing call resumes. */
export interface ListingEntry {
  name: Buffer;
  kind: 'directory' | 'file' | 'symlink';
  /** The inode when the kernel already knows this child, otherwise 0. */
  ino: number;
  offset: number;
  /** The child itself; undefined for "." and "..". */
  node?: Node;
  /** The name as the key of the parent's children (latin1), once needed. */
  key?: string;
}

interface DirectoryHandle {
  inode: Inode;
  /** A snapshot taken at opendir, so offsets stay stable while the listing is read. */
  entries: ListingEntry[];
  /** The root without --list-root: listing it is refused. */
  unlistable: boolean;
}

interface FileHandle {
  inode: Inode;
  reader: BlobReader;
}

export interface FilesystemStats {
  blockSize: number;
  nameMax: number;
  /** Inodes the kernel holds now (statfs's f_files): shows forgets at work. */
  files: number;
}

function entryWith(attributes: Attributes): Entry {
  return { attributes, entryTimeout: IMMUTABLE_TIMEOUT, attributeTimeout: IMMUTABLE_TIMEOUT };
}

/** The top level changes whenever a path is registered: its attributes are kept for a second only. */
const ROOT_ENTRY: Entry = { attributes: rootAttributes(ROOT_INODE), entryTimeout: ROOT_ATTRIBUTE_TIMEOUT, attributeTimeout: ROOT_ATTRIBUTE_TIMEOUT };

export const XATTR_DIRECTORY_DIGEST = 'user.tvix.castore.directory.digest';
export const XATTR_BLOB_DIGEST = 'user.tvix.castore.blob.digest';

export class ReadOnlyFilesystem {
  private readonly inodes = new Map<number, Inode>();
  private readonly files = new Map<number, FileHandle>();
  private readonly directoryHandles = new Map<number, DirectoryHandle>();
  private readonly cache: DirectoryCache;
  private readonly readers = new ReaderCache();
  private nextIno = ROOT_INODE + 1;
  private nextHandle = 1;

  constructor(
    private readonly blobs: BlobService,
    directories: DirectoryService,
    private readonly root: RootProvider,
    private readonly options: FilesystemOptions = {},
  ) {
    this.cache = options.directoryCache ?? new DirectoryCache(directories, options.directoryCacheEntries);
    this.inodes.set(ROOT_INODE, newInode(ROOT_INODE, undefined, undefined, 1));
  }

  /** Inodes currently known to the kernel (root included). */
  get inodeCount(): number {
    return this.inodes.size;
  }

  get openHandles(): number {
    return this.files.size + this.directoryHandles.size;
  }

  /** Finds `name` in the directory `parent`; counts one kernel reference to the result. */
  lookup(parent: number, name: Buffer): MaybePromise<Entry> {
    const dir = this.inode(parent);
    const key = name.toString('latin1');
    const child = dir.children?.get(key);
    if (child) return this.referencedEntry(child);
    return then(this.findNode(dir, name), (node) => {
      if (!node) throw new FsError('ENOENT');
      // Another lookup of the same name may have adopted it meanwhile.
      return this.referencedEntry(dir.children?.get(key) ?? this.adopt(dir, node, key));
    });
  }

  /** The child's entry, counting the kernel reference it hands out; an inode nobody holds is dropped on failure. */
  private referencedEntry(child: Inode): MaybePromise<Entry> {
    let entry: MaybePromise<Entry>;
    try {
      entry = this.entryOf(child);
    } catch (err) {
      this.dropIfUnreferenced(child);
      throw err;
    }
    if (!(entry instanceof Promise)) {
      this.reference(child);
      return entry;
    }
    return entry.then(
      (e) => {
        this.reference(child);
        return e;
      },
      (err: unknown) => {
        this.dropIfUnreferenced(child);
        throw err;
      },
    );
  }

  /** The kernel dropped `count` references to `ino`. */
  forget(ino: number, count: number): void {
    const inode = this.inodes.get(ino);
    if (!inode || ino === ROOT_INODE) return;
    inode.lookups -= count;
    this.dropIfUnreferenced(inode);
  }

  /**
   * Counts a kernel reference. A FORGET may have dropped the inode while this
   * lookup was waiting for the store: the kernel is about to hold it again, so
   * it goes back into the table.
   */
  private reference(inode: Inode): void {
    inode.lookups++;
    if (this.inodes.has(inode.ino)) return;
    this.inodes.set(inode.ino, inode);
    const siblings = (inode.parent!.children ??= new Map());
    const key = inode.node!.node.name.toString('latin1');
    if (!siblings.has(key)) siblings.set(key, inode);
  }

  /** Drops an inode the kernel holds no reference to (forgotten, or a lookup that failed). */
  private dropIfUnreferenced(inode: Inode): void {
    if (inode.lookups > 0 || inode.ino === ROOT_INODE) return;
    this.inodes.delete(inode.ino);
    this.readers.drop(inode.ino);
    const siblings = inode.parent?.children;
    const key = inode.node!.node.name.toString('latin1');
    if (siblings?.get(key) === inode) siblings.delete(key);
  }

  /** The inode's attributes; `attributeTimeout` is how long the kernel may keep them. */
  getattr(ino: number): MaybePromise<Entry> {
    const inode = this.inode(ino);
    if (!inode.node) return ROOT_ENTRY;
    return this.entryOf(inode);
  }

  readlink(ino: number): Buffer {
    const node = this.inode(ino).node;
    if (node?.kind !== 'symlink') throw new FsError('EINVAL');
    return node.node.target;
  }

  /** Opens a file for reading; the handle reads at any offset until released. */
  async open(ino: number): Promise<number> {
    const inode = this.inode(ino);
    const reader = await this.openBlob(inode);
    const handle = this.nextHandle++;
    this.files.set(handle, { inode, reader });
    return handle;
  }

  /** Reads up to `length` bytes at `position` into `target[offset..]`; short only at the end. */
  async read(handle: number, target: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    const file = this.files.get(handle);
    if (!file) throw new FsError('EBADF');
    return this.readBlob(file.inode, file.reader, target, offset, length, position);
  }

  /**
   * Like `read`, by inode instead of handle (the kernel sends no OPEN once
   * told it need not): the inode's reader is opened on first use and kept.
   */
  readInode(ino: number, target: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    const inode = this.inode(ino);
    return this.readers.with(
      ino,
      () => this.openBlob(inode),
      (reader) => this.readBlob(inode, reader, target, offset, length, position),
    );
  }

  /** Opens the inode's reader and keeps it, as `readInode` does, without reading: then `tryReadInode` can answer. */
  openInode(ino: number): Promise<void> {
    const inode = this.inode(ino);
    return this.readers.with(
      ino,
      () => this.openBlob(inode),
      async () => undefined,
    );
  }

  /** Whether the inode's reader is open (so a `tryReadInode` that answers nothing would have to wait for the disk). */
  readerIsOpen(ino: number): boolean {
    return this.readers.peek(ino) !== undefined;
  }

  /**
   * Reads like `readInode`, straight into `targets` (filled in turn), but
   * only if that can be done at once: a blob the store keeps in memory, or an
   * open blob file whose bytes are in the page cache. Returns the bytes read,
   * or undefined when it would have to wait (then use readInode).
   */
  tryReadInode(ino: number, targets: ScatterList, length: number, position: number): number | undefined {
    const inode = this.inode(ino);
    const node = inode.node;
    if (node?.kind !== 'file') throw new FsError(node?.kind === 'symlink' ? 'EINVAL' : 'EISDIR');
    const wanted = Math.min(length, node.node.size - position);
    if (wanted <= 0) return 0;
    if (inode.inline !== false && this.blobs.readInline) {
      let copied = -1;
      let found: boolean;
      try {
        found = this.blobs.readInline(node.node.digest, (contents) => {
          if (contents.length === node.node.size) copied = copyToScatter(contents, position, wanted, targets);
        });
      } catch (err) {
        throw new FsError('EIO', `${this.pathOf(inode)}: ${(err as Error).message}`, { cause: err });
      }
      inode.inline = found;
      if (found) {
        if (copied < 0) throw new FsError('EIO', `${this.pathOf(inode)} (blob ${formatDigest(node.node.digest)}): the blob's size is not the directory's ${node.node.size}`);
        return copied;
      }
    }
    return this.readers.peek(ino)?.tryReadv?.(targets, wanted, position);
  }

  /**
   * The open file behind an inode whose reader reads one (see BlobReader.fd), and the blob's
   * size, while that reader is open: for a transport that reads it on its own.
   */
  fileOf(ino: number): { fd: number; size: number } | undefined {
    const reader = this.readers.peek(ino);
    return reader?.fd === undefined ? undefined : { fd: reader.fd, size: reader.size };
  }

  /** Like tryReadInode, through an open file handle. */
  tryRead(handle: number, targets: ScatterList, length: number, position: number): number | undefined {
    const file = this.files.get(handle);
    if (!file) throw new FsError('EBADF');
    const wanted = Math.min(length, file.reader.size - position);
    if (wanted <= 0) return 0;
    return file.reader.tryReadv?.(targets, wanted, position);
  }

  private async openBlob(inode: Inode): Promise<BlobReader> {
    const node = inode.node;
    if (node?.kind !== 'file') throw new FsError(node?.kind === 'symlink' ? 'EINVAL' : 'EISDIR');
    const where = `${this.pathOf(inode)} (blob ${formatDigest(node.node.digest)})`;
    let reader: BlobReader | undefined;
    try {
      reader = await this.blobs.openReader(node.node.digest);
    } catch (err) {
      throw new FsError('EIO', `${where}: ${(err as Error).message}`, { cause: err });
    }
    if (!reader) throw new FsError('EIO', `${where}: the blob is missing from the store`);
    if (reader.size !== node.node.size) {
      await reader.close();
      throw new FsError('EIO', `${where}: the blob has ${reader.size} bytes, the directory says ${node.node.size}`);
    }
    return reader;
  }

  private async readBlob(inode: Inode, reader: BlobReader, target: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    const end = Math.min(reader.size, position + length);
    let filled = 0;
    try {
      while (position + filled < end) {
        const n = await reader.read(target, offset + filled, end - position - filled, position + filled);
        if (n === 0) throw new Error(`the blob ended after ${position + filled} bytes`);
        filled += n;
      }
    } catch (err) {
      throw new FsError('EIO', `${this.pathOf(inode)}: ${(err as Error).message}`, { cause: err });
    }
    return filled;
  }

  async release(handle: number): Promise<void> {
    const file = this.files.get(handle);
    this.files.delete(handle);
    await file?.reader.close();
  }

  /** Takes a snapshot of the directory's entries, to be listed with `list`. */
  async opendir(ino: number): Promise<number> {
    const inode = this.inode(ino);
    const parentIno = inode.parent?.ino ?? ROOT_INODE;
    const entries: ListingEntry[] = [
      { name: Buffer.from('.'), kind: 'directory', ino, offset: 1, node: undefined, key: undefined },
      { name: Buffer.from('..'), kind: 'directory', ino: parentIno, offset: 2, node: undefined, key: undefined },
    ];
    const add = (node: Node) =>
      entries.push({
        name: node.node.name,
        kind: node.kind,
        ino: inode.children?.get(node.node.name.toString('latin1'))?.ino ?? 0,
        offset: entries.length + 1,
        node,
        key: undefined,
      });
    if (!inode.node) {
      // Without --list-root the root opens (so `cd`, `tar -C` and openat work) but does not list.
      if (!this.options.listRoot) return this.newDirectoryHandle(inode, entries, true);
      for await (const node of this.root.list()) add(node);
    } else if (inode.node.kind === 'directory') {
      for (const node of (await this.loadDirectory(inode)).children) add(node);
    } else {
      throw new FsError('ENOTDIR');
    }
    return this.newDirectoryHandle(inode, entries, false);
  }

  private newDirectoryHandle(inode: Inode, entries: ListingEntry[], unlistable: boolean): number {
    const handle = this.nextHandle++;
    this.directoryHandles.set(handle, { inode, entries, unlistable });
    return handle;
  }

  /** The entries from `offset` on (0 is the start); the caller stops when its buffer is full. */
  list(handle: number, offset: number): ListingEntry[] {
    const dir = this.directoryHandles.get(handle);
    if (!dir) throw new FsError('EBADF');
    if (dir.unlistable) throw new FsError('EPERM');
    return dir.entries.slice(offset, offset + 1024);
  }

  /**
   * The entry of a listed child, for readdirplus: like a lookup, it counts a
   * kernel reference. Undefined for "." and "..", which the kernel resolves itself.
   */
  listedEntry(handle: number, listed: ListingEntry): MaybePromise<Entry | undefined> {
    const dir = this.directoryHandles.get(handle);
    if (!dir) throw new FsError('EBADF');
    if (!listed.node) return undefined;
    const key = (listed.key ??= listed.name.toString('latin1'));
    const child = dir.inode.children?.get(key) ?? this.adopt(dir.inode, listed.node, key);
    return then(this.referencedEntry(child), (entry) => {
      listed.ino = child.ino;
      return entry;
    });
  }

  releasedir(handle: number): void {
    this.directoryHandles.delete(handle);
  }

  statfs(): FilesystemStats {
    return { blockSize: 4096, nameMax: 255, files: this.inodes.size };
  }

  /** The digest xattr names of an inode. */
  listxattr(ino: number): string[] {
    const node = this.inode(ino).node;
    if (node?.kind === 'directory') return [XATTR_DIRECTORY_DIGEST];
    if (node?.kind === 'file') return [XATTR_BLOB_DIGEST];
    return [];
  }

  /** The `b3:<base64>` digest behind an inode; ENODATA for any other name. */
  getxattr(ino: number, name: string): Buffer {
    const node = this.inode(ino).node;
    if (node?.kind === 'directory' && name === XATTR_DIRECTORY_DIGEST) return Buffer.from(formatDigest(node.node.digest));
    if (node?.kind === 'file' && name === XATTR_BLOB_DIGEST) return Buffer.from(formatDigest(node.node.digest));
    throw new FsError('ENODATA');
  }

  /** Closes every handle (the session ended). */
  async close(): Promise<void> {
    const files = [...this.files.values()];
    this.files.clear();
    this.directoryHandles.clear();
    await Promise.allSettled([...files.map((file) => file.reader.close()), this.readers.clear()]);
  }

  private inode(ino: number): Inode {
    const inode = this.inodes.get(ino);
    if (!inode) throw new FsError('ENOENT', `inode ${ino} is not known (forgotten already?)`);
    return inode;
  }

  /** A new inode for `node` in `parent`, under `key` (its name in latin1). */
  private adopt(parent: Inode, node: Node, key: string): Inode {
    const child = newInode(this.nextIno++, node, parent, 0);
    this.inodes.set(child.ino, child);
    (parent.children ??= new Map()).set(key, child);
    return child;
  }

  private findNode(dir: Inode, name: Buffer): MaybePromise<Node | undefined> {
    if (!dir.node) {
      return this.root.lookup(name).then(
        (node) => (node && node.node.name.equals(name) ? node : undefined),
        (err: Error) => {
          throw new FsError('EIO', `looking up ${displayName(name)}: ${err.message}`, { cause: err });
        },
      );
    }
    if (dir.node.kind !== 'directory') throw new FsError('ENOTDIR');
    return then(this.loadDirectory(dir), (loaded) => findChild(loaded.children, name));
  }

  /** Made once per inode: what it is never changes. */
  private entryOf(inode: Inode): MaybePromise<Entry> {
    if (inode.entry) return inode.entry;
    const node = inode.node!;
    if (node.kind !== 'directory') return (inode.entry = entryWith(nodeAttributes(inode.ino, node)));
    return then(
      this.loadDirectory(inode),
      (d) => (inode.entry = entryWith(nodeAttributes(inode.ino, node, { entries: d.children.length, subdirectories: d.subdirectories }))),
    );
  }

  private loadDirectory(inode: Inode): MaybePromise<LoadedDirectory> {
    if (inode.directory) return inode.directory;
    const node = inode.node;
    if (node?.kind !== 'directory') throw new FsError('ENOTDIR');
    const where = () => `${this.pathOf(inode)} (directory ${formatDigest(node.node.digest)})`;
    const found = (loaded: LoadedDirectory | undefined) => {
      if (!loaded) throw new FsError('EIO', `${where()}: the directory is missing from the store`);
      inode.directory = loaded;
      return loaded;
    };
    let pending: MaybePromise<LoadedDirectory | undefined>;
    try {
      pending = this.cache.get(node.node.digest);
    } catch (err) {
      throw new FsError('EIO', `${where()}: ${(err as Error).message}`, { cause: err });
    }
    if (!(pending instanceof Promise)) return found(pending);
    return pending.then(found, (err: Error) => {
      throw new FsError('EIO', `${where()}: ${err.message}`, { cause: err });
    });
  }

  /** A readable path for log messages. */
  private pathOf(inode: Inode): string {
    const names: string[] = [];
    for (let at: Inode | undefined = inode; at?.node; at = at.parent) names.push(displayName(at.node.node.name));
    return names.reverse().join('/');
  }
}

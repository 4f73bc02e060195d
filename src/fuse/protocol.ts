// The FUSE protocol, shared by both transports (/dev/fuse and virtio-fs):
// decodes a request message, asks the filesystem core, encodes the reply.
// Requests are handled concurrently and answered in whatever order they
// finish; each reply carries the request's unique id.
import { fuseCounters } from './counters.js';
import { constants } from 'node:os';
import type { ScatterList } from '../castore/blobservice.js';
import type { Attributes, Entry } from '../fs/attributes.js';
import { FsError } from '../fs/errors.js';
import type { ListingEntry, MaybePromise, ReadOnlyFilesystem } from '../fs/filesystem.js';
import {
  ATTR_OUT_SIZE,
  DIRENT_HEADER_SIZE,
  DT_DIR,
  DT_LNK,
  DT_REG,
  ENTRY_OUT_SIZE,
  FORGET_ONE_SIZE,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  FUSE_MIN_MINOR_VERSION,
  GETXATTR_OUT_SIZE,
  IN_HEADER_SIZE,
  INIT_OUT_SIZE,
  InitFlag,
  OPEN_OUT_SIZE,
  OUT_HEADER_SIZE,
  OpenFlag,
  Opcode,
  STATFS_OUT_SIZE,
  WRITING_OPCODES,
  direntSize,
} from './abi.js';

/**
 * Where replies go: one complete message (out header included) per call. The
 * sink is done with the buffer when `send` returns (it is reused).
 */
export interface ReplySink {
  send(reply: Buffer): void;
  /**
   * Optional, for transports that can take a reply where it is going (the
   * guest's memory on virtio-fs): sets `into` to the places of the reply's
   * bytes [offset, offset + length), or returns false when there is no room.
   * Valid only until the event loop turns; the reply is then sent with
   * sendInPlace.
   */
  scatter?(offset: number, length: number, into: ScatterList): boolean;
  /** Sends a reply of `length` bytes whose bytes after `header` were written through scatter(). */
  sendInPlace?(header: Buffer, length: number): void;
}

export interface FuseServerOptions {
  /** Called for requests that failed for a reason worth telling (EIO, malformed requests). */
  log?: (message: string) => void;
  /** The kernel said DESTROY (virtio-fs at umount): the session is over. */
  onDestroy?: () => void;
  /** Largest READ we ask the kernel for, in 4 KiB pages (FUSE_MAX_PAGES). */
  maxPages?: number;
  /** Answer OPEN with ENOSYS when the kernel supports that (default), saving OPEN and RELEASE per file. */
  noOpen?: boolean;
  /** A transport that answers some requests itself (virtio-fs's native path): told what it may answer. */
  accelerator?: Accelerator;
}

/**
 * What a transport may answer without this layer, as this layer would: GETATTR of an inode
 * from its attributes, READ by inode from the blob's open file. Told again after each answer
 * this layer gives (it keeps what it can), and told when the inode is forgotten.
 */
export interface Accelerator {
  /** GETATTR of `nodeid` is answered with `attrOut` (fuse_attr_out, 104 bytes; copy it). */
  attributes(nodeid: number, attrOut: Buffer): void;
  /** READ of `nodeid` without a file handle is answered from `size` bytes of `fd` (not closed by the transport). */
  file(nodeid: number, fd: number, size: number): void;
  /** `nodeid` is forgotten: none of it may be answered any more. */
  forget(nodeid: number): void;
}

/** The INIT flags we ask for, where the kernel offers them. */
const WANTED_FLAGS =
  InitFlag.ASYNC_READ |
  InitFlag.DO_READDIRPLUS |
  InitFlag.PARALLEL_DIROPS |
  InitFlag.MAX_PAGES |
  InitFlag.CACHE_SYMLINKS |
  InitFlag.ASYNC_DIO;

const UNKNOWN_INO = 0xffffffff;
/** FUSE_ROOT_ID. */
const ROOT_NODEID = 1;
/** File handles start at 1; a READ with handle 0 comes from a kernel that no longer opens files. */
const NO_HANDLE = 0;
/** Idle READ buffers kept (each MAX_READ): enough for the kernel's usual readahead depth. */
const READ_BUFFERS_KEPT = 16;
const NO_REPLY: ReadonlySet<number> = new Set([Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT]);
const O_ACCMODE = 3;
const W_OK = 2;
export const MAX_WRITE = 128 * 1024;

/**
 * Whether FuseServer.handle will send a reply to `message` (every request
 * gets exactly one, except FORGET, BATCH_FORGET and INTERRUPT, and messages
 * too short to name a request). virtio-fs returns the buffers of the others
 * to the guest at once.
 */
export function expectsReply(message: Buffer): boolean {
  if (message.length < 16) return false;
  if (message.length < IN_HEADER_SIZE || message.readUInt32LE(0) !== message.length) return true; // answered EINVAL
  return !NO_REPLY.has(message.readUInt32LE(4));
}

/** The request's arguments and where its reply goes. */
class Request {
  constructor(
    readonly message: Buffer,
    readonly sink: ReplySink,
  ) {}
  get opcode(): number {
    return this.message.readUInt32LE(4);
  }
  get nodeid(): number {
    return readU64(this.message, 16);
  }
  /** The arguments after the header, bounded by the header's length field. */
  get args(): Buffer {
    return this.message.subarray(IN_HEADER_SIZE);
  }
  /**
   * A reply buffer with room for `size` bytes after the out header. Small
   * ones are one scratch buffer, reused: fill it and send it without waiting.
   */
  allocate(size: number): Buffer {
    if (size <= SMALL_REPLY) return (scratchViews[size] ??= scratch.subarray(0, OUT_HEADER_SIZE + size));
    if (size <= SCRATCH_SIZE) return scratch.subarray(0, OUT_HEADER_SIZE + size);
    return Buffer.allocUnsafe(OUT_HEADER_SIZE + size);
  }
  /** Sends `reply[0..OUT_HEADER_SIZE + size)` as a success. */
  ok(reply: Buffer, size: number): void {
    const message = reply.length === OUT_HEADER_SIZE + size ? reply : reply.subarray(0, OUT_HEADER_SIZE + size);
    message.writeUInt32LE(message.length, 0);
    message.writeInt32LE(0, 4);
    copyUnique(this.message, message);
    this.sink.send(message);
  }
  empty(): void {
    this.ok(this.allocate(0), 0);
  }
  error(errno: number): void {
    const message = header;
    message.writeUInt32LE(OUT_HEADER_SIZE, 0);
    message.writeInt32LE(-errno, 4);
    copyUnique(this.message, message);
    this.sink.send(message);
  }
}

/**
 * Replies are written and sent in one go (the sinks copy them before send
 * returns), so one buffer serves every small reply of every session.
 */
const SCRATCH_SIZE = 64 * 1024;
const scratch = Buffer.allocUnsafe(OUT_HEADER_SIZE + SCRATCH_SIZE);
const scratchView = new DataView(scratch.buffer, scratch.byteOffset, scratch.length);
/** Views of the scratch buffer for replies up to this size, made once each. */
const SMALL_REPLY = 4096;
const scratchViews: Buffer[] = [];

/** The request's unique into the reply header (bytes 8..16 of both). */
function copyUnique(request: Buffer, reply: Buffer): void {
  reply.writeUInt32LE(request.readUInt32LE(8), 8);
  reply.writeUInt32LE(request.readUInt32LE(12), 12);
}
const header = Buffer.allocUnsafe(OUT_HEADER_SIZE);

/** A request whose arguments are shorter than its opcode needs. */
class MalformedRequest extends Error {}

export class FuseServer {
  private initialized = false;
  private minor = 0;
  /** The kernel can do without OPEN/RELEASE for files (FUSE_NO_OPEN_SUPPORT). */
  private noOpen = false;
  /** Reply buffers of READs that finished, for the next ones. */
  private readonly readBuffers: Buffer[] = [];
  /** Where a READ's bytes go when the transport takes them in place; emptied after each use. */
  private readonly readPlaces: ScatterList = { buffers: [], spans: new Uint32Array(3 * MAX_READ_PIECES), count: 0 };
  private readonly log: (message: string) => void;

  constructor(
    private readonly fs: ReadOnlyFilesystem,
    private readonly options: FuseServerOptions = {},
  ) {
    this.log = options.log ?? (() => {});
  }

  /** The protocol minor agreed in INIT (0 before). */
  get negotiatedMinor(): number {
    return this.minor;
  }

  /**
   * Handles one request message. The reply, if the opcode has one, goes to
   * `sink` when ready. Never throws: a malformed message is logged and, when
   * it carries a unique id, answered EINVAL. Returns true when the request
   * waits for something (its reply comes from a later turn of the event
   * loop), false when it was dealt with at once.
   */
  handle(message: Buffer, sink: ReplySink): boolean {
    if (message.length < IN_HEADER_SIZE || message.readUInt32LE(0) !== message.length) {
      this.log(`malformed FUSE request: ${message.length} bytes, header says ${message.length >= 4 ? message.readUInt32LE(0) : '?'}`);
      if (message.length >= 16) new Request(message, sink).error(errno.EINVAL);
      return false;
    }
    const request = new Request(message, sink);
    fuseCounters.requests[request.opcode & 63]++;
    let pending: Promise<void> | void;
    try {
      pending = this.dispatch(request);
    } catch (err) {
      this.fail(request, err);
      return false;
    }
    if (!pending) return false;
    pending.catch((err: unknown) => this.fail(request, err));
    return true;
  }

  private fail(request: Request, err: unknown): void {
    fuseCounters.errors[request.opcode & 63]++;
    if (NO_REPLY.has(request.opcode)) {
      this.log(`${opcodeName(request.opcode)} failed: ${(err as Error)?.message ?? err}`);
      return; // the kernel expects no reply to these (on virtio-fs there is nowhere to write one)
    }
    if (err instanceof FsError) {
      if (err.detail) this.log(`${opcodeName(request.opcode)}: ${err.message}`);
      request.error(err.errno);
    } else if (err instanceof MalformedRequest) {
      this.log(`malformed ${opcodeName(request.opcode)} request: ${err.message}`);
      request.error(errno.EINVAL);
    } else {
      this.log(`${opcodeName(request.opcode)} failed: ${(err as Error)?.stack ?? err}`);
      request.error(errno.EIO);
    }
  }

  private dispatch(request: Request): Promise<void> | void {
    const opcode = request.opcode;
    if (opcode === Opcode.INIT) return this.init(request);
    if (!this.initialized) throw new FsError('EIO', 'request before INIT');
    switch (opcode) {
      case Opcode.LOOKUP:
        return this.lookup(request);
      case Opcode.FORGET:
        return this.forget(request);
      case Opcode.BATCH_FORGET:
        return this.batchForget(request);
      case Opcode.GETATTR:
        return this.getattr(request);
      case Opcode.READLINK:
        return this.readlink(request);
      case Opcode.OPEN:
        return this.open(request);
      case Opcode.READ:
        return this.read(request);
      case Opcode.RELEASE:
        return this.release(request);
      case Opcode.OPENDIR:
        return this.opendir(request);
      case Opcode.READDIR:
        return this.readdir(request, false);
      case Opcode.READDIRPLUS:
        return this.readdir(request, true);
      case Opcode.RELEASEDIR:
        this.fs.releasedir(readU64(need(request, 8), 0));
        return request.empty();
      case Opcode.STATFS:
        return this.statfs(request);
      case Opcode.GETXATTR:
        return this.getxattr(request);
      case Opcode.LISTXATTR:
        return this.listxattr(request);
      case Opcode.ACCESS:
        if (need(request, 4).readUInt32LE(0) & W_OK) throw new FsError('EROFS');
        return request.empty();
      case Opcode.FLUSH:
      case Opcode.FSYNC:
      case Opcode.FSYNCDIR:
        // Nothing to flush in a read-only store. ENOSYS tells the kernel so for
        // good: it stops sending these, which saves a round trip per close.
        throw new FsError('ENOSYS');
      case Opcode.INTERRUPT:
        return; // requests finish quickly; the kernel gets their normal reply
      case Opcode.DESTROY:
        request.empty();
        this.options.onDestroy?.();
        return;
      default:
        if (WRITING_OPCODES.has(opcode)) throw new FsError('EROFS');
        throw new FsError('ENOSYS');
    }
  }

  private init(request: Request): void {
    const args = need(request, 16);
    const major = args.readUInt32LE(0);
    const minor = args.readUInt32LE(4);
    const maxReadahead = args.readUInt32LE(8);
    const flags = args.readUInt32LE(12);
    if (major > FUSE_KERNEL_VERSION) {
      // The kernel then asks again with our major.
      const reply = request.allocate(8);
      reply.writeUInt32LE(FUSE_KERNEL_VERSION, OUT_HEADER_SIZE);
      reply.writeUInt32LE(FUSE_KERNEL_MINOR_VERSION, OUT_HEADER_SIZE + 4);
      return request.ok(reply, 8);
    }
    if (major < FUSE_KERNEL_VERSION || minor < FUSE_MIN_MINOR_VERSION) {
      throw new FsError('EPROTO', `the kernel speaks FUSE ${major}.${minor}; nixcas needs 7.${FUSE_MIN_MINOR_VERSION} or newer`);
    }
    this.minor = Math.min(minor, FUSE_KERNEL_MINOR_VERSION);
    this.noOpen = (flags & InitFlag.NO_OPEN_SUPPORT) !== 0 && this.options.noOpen !== false;
    const reply = request.allocate(INIT_OUT_SIZE).fill(0);
    const o = OUT_HEADER_SIZE;
    reply.writeUInt32LE(FUSE_KERNEL_VERSION, o);
    reply.writeUInt32LE(this.minor, o + 4);
    reply.writeUInt32LE(maxReadahead, o + 8);
    reply.writeUInt32LE((flags & WANTED_FLAGS) >>> 0, o + 12);
    reply.writeUInt16LE(64, o + 16); // max_background
    reply.writeUInt16LE(48, o + 18); // congestion_threshold
    reply.writeUInt32LE(MAX_WRITE, o + 20);
    reply.writeUInt32LE(1, o + 24); // time_gran: ns
    reply.writeUInt16LE(this.options.maxPages ?? 256, o + 28);
    this.initialized = true;
    request.ok(reply, INIT_OUT_SIZE);
  }

  private lookup(request: Request): Promise<void> | void {
    const entry = this.fs.lookup(request.nodeid, cString(request.args));
    if (entry instanceof Promise) return entry.then((e) => replyEntry(request, e));
    replyEntry(request, entry);
  }

  private forget(request: Request): void {
    this.fs.forget(request.nodeid, readU64(need(request, 8), 0));
    this.options.accelerator?.forget(request.nodeid);
  }

  private batchForget(request: Request): void {
    const args = need(request, 8);
    const count = args.readUInt32LE(0);
    if (args.length < 8 + count * FORGET_ONE_SIZE) throw new MalformedRequest(`BATCH_FORGET of ${count} entries in ${args.length} bytes`);
    const accelerator = this.options.accelerator;
    for (let i = 0, at = 8; i < count; i++, at += FORGET_ONE_SIZE) {
      const ino = readU64(args, at);
      this.fs.forget(ino, readU64(args, at + 8));
      accelerator?.forget(ino);
    }
  }

  private getattr(request: Request): Promise<void> | void {
    const entry = this.fs.getattr(request.nodeid);
    if (entry instanceof Promise) return entry.then((e) => void replyAttributes(request, e.attributes, e.attributeTimeout));
    const reply = replyAttributes(request, entry.attributes, entry.attributeTimeout);
    // The root's attributes change as store paths appear; no other inode's ever do.
    if (this.options.accelerator && request.nodeid !== ROOT_NODEID) this.options.accelerator.attributes(request.nodeid, reply.subarray(OUT_HEADER_SIZE, OUT_HEADER_SIZE + ATTR_OUT_SIZE));
  }

  private readlink(request: Request): void {
    const target = this.fs.readlink(request.nodeid);
    const reply = request.allocate(target.length);
    target.copy(reply, OUT_HEADER_SIZE);
    request.ok(reply, target.length);
  }

  private async open(request: Request): Promise<void> {
    if ((need(request, 4).readUInt32LE(0) & O_ACCMODE) !== 0) throw new FsError('EROFS');
    // ENOSYS tells a kernel that offered NO_OPEN_SUPPORT to stop sending OPEN and RELEASE
    // (and keep its page cache); READs then come with handle 0 and are served by inode.
    if (this.noOpen) throw new FsError('ENOSYS');
    const handle = await this.fs.open(request.nodeid);
    this.replyOpen(request, handle, OpenFlag.KEEP_CACHE);
  }

  private replyOpen(request: Request, handle: number, flags: number): void {
    const reply = request.allocate(OPEN_OUT_SIZE).fill(0, OUT_HEADER_SIZE);
    writeU64(reply, OUT_HEADER_SIZE, handle);
    reply.writeUInt32LE(flags, OUT_HEADER_SIZE + 8);
    request.ok(reply, OPEN_OUT_SIZE);
  }

  private read(request: Request): Promise<void> | void {
    const args = need(request, 24);
    const handle = readU64(args, 0);
    const position = readU64(args, 8);
    const size = args.readUInt32LE(16);
    if (size > MAX_READ) throw new MalformedRequest(`READ of ${size} bytes`);
    if (this.readInPlace(request, handle, position, size)) return;
    // The first READs of a file find its reader not open yet: open it, then read in place. (Each
    // into a buffer of its own instead, a guest starting 64 READs of a new file cost 64 buffers.)
    if (handle === NO_HANDLE && request.sink.scatter && !this.fs.readerIsOpen(request.nodeid)) return this.openThenRead(request, position, size);
    return this.readWaiting(request, handle, position, size);
  }

  /**
   * Where the transport can take the bytes in place (virtio-fs: the guest's pages), a read that
   * needs no waiting goes straight there: one copy, from the page cache or the store's memory.
   * False when it would have to wait (nothing is sent then).
   */
  private readInPlace(request: Request, handle: number, position: number, size: number): boolean {
    const sink = request.sink;
    const places = this.readPlaces;
    if (!sink.scatter || !sink.sendInPlace || !sink.scatter(OUT_HEADER_SIZE, size, places)) return false;
    const n = handle === NO_HANDLE ? this.fs.tryReadInode(request.nodeid, places, size, position) : this.fs.tryRead(handle, places, size, position);
    places.buffers.length = 0; // valid only now
    places.count = 0;
    if (n === undefined) return false;
    if (handle === NO_HANDLE && this.options.accelerator) this.offerFile(request.nodeid);
    fuseCounters.readBytes += n;
    header.writeUInt32LE(OUT_HEADER_SIZE + n, 0);
    header.writeInt32LE(0, 4);
    copyUnique(request.message, header);
    sink.sendInPlace(header, OUT_HEADER_SIZE + n);
    return true;
  }

  private async openThenRead(request: Request, position: number, size: number): Promise<void> {
    await this.fs.openInode(request.nodeid);
    if (!this.readInPlace(request, NO_HANDLE, position, size)) await this.readWaiting(request, NO_HANDLE, position, size);
  }

  private offerFile(ino: number): void {
    const file = this.fs.fileOf(ino);
    if (file) this.options.accelerator!.file(ino, file.fd, file.size);
  }

  /** A READ that has to wait (a blob file not in the page cache, a remote store): into a buffer of ours, then sent. */
  private async readWaiting(request: Request, handle: number, position: number, size: number): Promise<void> {
    // The blob bytes go straight into the reply buffer, after the header. Buffers this large
    // are fresh mappings each time (page faults and all), so they are reused.
    const reply = this.readBuffers.pop() ?? Buffer.allocUnsafe(OUT_HEADER_SIZE + MAX_READ);
    // Counted where the transport could have taken the bytes in place (a FUSE mount never can).
    if (request.sink.scatter) fuseCounters.bufferedReads++;
    try {
      const n =
        handle === NO_HANDLE
          ? await this.fs.readInode(request.nodeid, reply, OUT_HEADER_SIZE, size, position)
          : await this.fs.read(handle, reply, OUT_HEADER_SIZE, size, position);
      fuseCounters.readBytes += n;
      request.ok(reply, n);
      if (handle === NO_HANDLE && this.options.accelerator) this.offerFile(request.nodeid);
    } finally {
      if (this.readBuffers.length < READ_BUFFERS_KEPT) this.readBuffers.push(reply);
    }
  }

  private async release(request: Request): Promise<void> {
    await this.fs.release(readU64(need(request, 8), 0));
    request.empty();
  }

  private async opendir(request: Request): Promise<void> {
    const ino = request.nodeid;
    const handle = await this.fs.opendir(ino);
    // A store path's directories never change: let the kernel cache their listings.
    this.replyOpen(request, handle, ino === 1 ? 0 : OpenFlag.CACHE_DIR | OpenFlag.KEEP_CACHE);
  }

  private readdir(request: Request, plus: boolean): Promise<void> | void {
    const args = need(request, 24);
    const handle = readU64(args, 0);
    let offset = readU64(args, 8);
    const size = Math.min(args.readUInt32LE(16), MAX_READ);
    // First decide which entries fit, then resolve their entries (plus): at once where the
    // directories involved are cached, otherwise concurrently.
    const chosen: ListingEntry[] = [];
    let used = 0;
    for (let batch = this.fs.list(handle, offset); batch.length > 0; batch = this.fs.list(handle, offset)) {
      let full = false;
      for (const listed of batch) {
        const need = (plus ? ENTRY_OUT_SIZE : 0) + direntSize(listed.name.length);
        if (used + need > size) {
          full = true;
          break;
        }
        chosen.push(listed);
        used += need;
        offset = listed.offset;
      }
      if (full) break;
    }
    if (!plus) return this.replyListing(request, chosen, undefined, used);
    const entries: MaybePromise<Entry | undefined>[] = [];
    let waiting = false;
    for (const listed of chosen) {
      let entry: MaybePromise<Entry | undefined>;
      try {
        entry = this.fs.listedEntry(handle, listed);
      } catch (err) {
        entry = this.unresolved(err);
      }
      if (entry instanceof Promise) {
        waiting = true;
        entry = entry.catch((err: unknown) => this.unresolved(err));
      }
      entries.push(entry);
    }
    if (!waiting) return this.replyListing(request, chosen, entries as (Entry | undefined)[], used);
    return Promise.all(entries).then((resolved) => this.replyListing(request, chosen, resolved, used));
  }

  /** An entry READDIRPLUS could not resolve: left blank; the kernel will look the name up itself and get the error then. */
  private unresolved(err: unknown): undefined {
    if (!(err instanceof FsError)) throw err;
    if (err.detail) this.log(`READDIRPLUS: ${err.message}`);
    return undefined;
  }

  private replyListing(request: Request, chosen: ListingEntry[], entries: (Entry | undefined)[] | undefined, used: number): void {
    const reply = request.allocate(used);
    const view = viewOf(reply);
    let at = OUT_HEADER_SIZE;
    for (let i = 0; i < chosen.length; i++) {
      const listed = chosen[i];
      if (entries) {
        const entry = entries[i];
        if (entry) writeEntry(view, at, entry);
        else reply.fill(0, at, at + ENTRY_OUT_SIZE);
        at += ENTRY_OUT_SIZE;
      }
      at = writeDirent(reply, view, at, listed);
    }
    request.ok(reply, used);
  }

  private statfs(request: Request): void {
    const stats = this.fs.statfs();
    const reply = request.allocate(STATFS_OUT_SIZE).fill(0, OUT_HEADER_SIZE);
    writeU64(reply, OUT_HEADER_SIZE + 24, stats.files); // blocks, bfree, bavail and ffree stay 0
    const o = OUT_HEADER_SIZE + 40;
    reply.writeUInt32LE(stats.blockSize, o);
    reply.writeUInt32LE(stats.nameMax, o + 4);
    reply.writeUInt32LE(stats.blockSize, o + 8);
    request.ok(reply, STATFS_OUT_SIZE);
  }

  private getxattr(request: Request): void {
    const args = need(request, 9);
    const value = this.fs.getxattr(request.nodeid, cString(args.subarray(8)).toString('latin1'));
    this.replyXattr(request, args.readUInt32LE(0), value);
  }

  private listxattr(request: Request): void {
    const names = this.fs.listxattr(request.nodeid);
    this.replyXattr(request, need(request, 4).readUInt32LE(0), Buffer.from(names.map((name) => name + '\0').join('')));
  }

  /** The xattr convention: size 0 asks for the length, a too-small size is ERANGE. */
  private replyXattr(request: Request, size: number, value: Buffer): void {
    if (size === 0) {
      const reply = request.allocate(GETXATTR_OUT_SIZE).fill(0, OUT_HEADER_SIZE);
      reply.writeUInt32LE(value.length, OUT_HEADER_SIZE);
      return request.ok(reply, GETXATTR_OUT_SIZE);
    }
    if (size < value.length) throw new FsError('ERANGE');
    const reply = request.allocate(value.length);
    value.copy(reply, OUT_HEADER_SIZE);
    request.ok(reply, value.length);
  }
}

/** Pieces a READ's reply may come in (a page each, as Linux builds them, and some to spare). */
const MAX_READ_PIECES = 1024;

/** The largest READ or READDIR answered: 256 pages of 4 KiB plus slack. */
const MAX_READ = 1024 * 1024 + 4096;

const errno = constants.errno;

function need(request: Request, size: number): Buffer {
  const args = request.args;
  if (args.length < size) throw new MalformedRequest(`${args.length} bytes of arguments, ${size} needed`);
  return args;
}

/** A NUL-terminated name from the arguments (the NUL is required). */
function cString(args: Buffer): Buffer {
  const end = args.indexOf(0);
  if (end < 0) throw new MalformedRequest('a name without its terminating NUL');
  return args.subarray(0, end);
}

function readU64(buffer: Buffer, at: number): number {
  const high = buffer.readUInt32LE(at + 4);
  if (high >= 0x200000) return Number.MAX_SAFE_INTEGER; // past 2^53: no such inode, handle or offset
  return high * 0x1_0000_0000 + buffer.readUInt32LE(at);
}

function writeU64(buffer: Buffer, at: number, value: number): void {
  buffer.writeUInt32LE(value >>> 0, at);
  buffer.writeUInt32LE(Math.floor(value / 0x1_0000_0000), at + 4);
}

// Both fit the scratch buffer: its DataView is theirs.
function replyEntry(request: Request, entry: Entry): void {
  const reply = request.allocate(ENTRY_OUT_SIZE);
  writeEntry(scratchView, OUT_HEADER_SIZE, entry);
  request.ok(reply, ENTRY_OUT_SIZE);
}

/** Answers with the attributes; returns the reply (valid until the next reply is made). */
function replyAttributes(request: Request, attributes: Attributes, timeout: number): Buffer {
  const reply = request.allocate(ATTR_OUT_SIZE);
  const view = scratchView;
  setU64(view, OUT_HEADER_SIZE, timeout); // attr_valid
  setU64(view, OUT_HEADER_SIZE + 8, 0); // attr_valid_nsec, dummy
  writeAttributes(view, OUT_HEADER_SIZE + 16, attributes);
  request.ok(reply, ATTR_OUT_SIZE);
  return reply;
}

/** A DataView over a reply buffer (the scratch one's is kept): field stores that V8 inlines. */
function viewOf(buffer: Buffer): DataView {
  return buffer.buffer === scratch.buffer && buffer.byteOffset === scratch.byteOffset ? scratchView : new DataView(buffer.buffer, buffer.byteOffset, buffer.length);
}

function setU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, value >>> 0, true);
  view.setUint32(at + 4, Math.floor(value / 0x1_0000_0000), true);
}

/** fuse_attr */
function writeAttributes(view: DataView, at: number, a: Attributes): void {
  setU64(view, at, a.ino);
  setU64(view, at + 8, a.size);
  setU64(view, at + 16, a.blocks);
  setU64(view, at + 24, 0); // atime
  setU64(view, at + 32, a.mtime);
  setU64(view, at + 40, 0); // ctime
  view.setUint32(at + 48, 0, true); // the three nanosecond fields
  view.setUint32(at + 52, 0, true);
  view.setUint32(at + 56, 0, true);
  view.setUint32(at + 60, a.mode, true);
  view.setUint32(at + 64, a.nlink, true);
  view.setUint32(at + 68, a.uid, true);
  view.setUint32(at + 72, a.gid, true);
  view.setUint32(at + 76, 0, true); // rdev
  view.setUint32(at + 80, a.blksize, true);
  view.setUint32(at + 84, 0, true); // flags
}

/** fuse_entry_out */
function writeEntry(view: DataView, at: number, entry: Entry): void {
  setU64(view, at, entry.attributes.ino);
  setU64(view, at + 8, 0); // generation: inode numbers are never reused
  setU64(view, at + 16, entry.entryTimeout);
  setU64(view, at + 24, entry.attributeTimeout);
  setU64(view, at + 32, 0); // the two nanosecond fields
  writeAttributes(view, at + 40, entry.attributes);
}

/** fuse_dirent, padded; returns the offset after it. */
function writeDirent(buffer: Buffer, view: DataView, at: number, listed: ListingEntry): number {
  const length = listed.name.length;
  const size = direntSize(length);
  setU64(view, at, listed.ino || UNKNOWN_INO);
  setU64(view, at + 8, listed.offset);
  view.setUint32(at + 16, length, true);
  view.setUint32(at + 20, listed.kind === 'directory' ? DT_DIR : listed.kind === 'file' ? DT_REG : DT_LNK, true);
  listed.name.copy(buffer, at + DIRENT_HEADER_SIZE);
  for (let i = at + DIRENT_HEADER_SIZE + length; i < at + size; i++) buffer[i] = 0;
  return at + size;
}

const OPCODE_NAMES = new Map<number, string>(Object.entries(Opcode).map(([name, value]) => [value, name]));
export function opcodeName(opcode: number): string {
  return OPCODE_NAMES.get(opcode) ?? `opcode ${opcode}`;
}

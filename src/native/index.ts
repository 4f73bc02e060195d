// Loads the N-API addon (src/native/nixcas_native.c, built by node-gyp on `npm ci`).
import { createRequire } from 'node:module';

export interface Watch {
  readonly __watch: unique symbol;
}

/** Handles the addon makes (opaque). */
export type FastRing = { readonly __brand: 'FastRing' };
export type FastTables = { readonly __brand: 'FastTables' };

export interface NativeAddon {
  /**
   * Calls `onReady` whenever `fd` is readable, or writable with `writable` (or in error); `status` < 0 is a libuv error.
   * With `drainEventfd`, `fd` is an eventfd whose counter is read (reset) before each call.
   */
  watch(fd: number, onReady: (status: number, events: number) => void, writable?: boolean, drainEventfd?: boolean): Watch;
  unwatch(handle: Watch): void;
  /** Bytes read, or -errno (-EAGAIN when a non-blocking fd has nothing). */
  read(fd: number, buffer: Uint8Array): number;
  /** preadv2(RWF_NOWAIT) into `buffer[offset, offset + length)`: bytes read, or -errno (-EAGAIN: not cached). */
  readCached(fd: number, buffer: Uint8Array, offset: number, length: number, position: number): number;
  /**
   * preadv2(RWF_NOWAIT) into `count` pieces (at most 1024), piece i being `spans[3i + 2]` bytes of
   * `buffers[spans[3i]]` from `spans[3i + 1]`: bytes read, or -errno (-EAGAIN: not cached).
   */
  readCachedScatter(fd: number, buffers: Uint8Array[], spans: Uint32Array, count: number, position: number): number;
  /**
   * Waits in poll(2) for the eventfd `fd` and reads its counter: 1. Returns 0 instead as soon as
   * anything the event loop watches is ready or its next timer is due; -errno on failure.
   */
  waitKick(fd: number): number;
  /** Adds 1 to an eventfd's counter: 0, or -errno. */
  signal(fd: number): number;
  /** One writev(2): bytes written, or -errno. */
  writev(fd: number, buffers: Uint8Array[]): number;
  setNonBlocking(fd: number): number;
  /** fcntl(F_SETPIPE_SZ): the pipe's capacity afterwards, or -errno (-EBADF when `fd` is not a pipe). */
  widenPipe(fd: number, size: number): number;
  /** Bytes from the start of `buffer` to its first address that is a multiple of `alignment`. */
  misalignment(buffer: Uint8Array, alignment: number): number;
  /** Whether the BLAKE3 of `data` is `digest` (src/native/blake3.c). */
  blake3Matches(data: Uint8Array, digest: Uint8Array): boolean;
  /** The index of the first of `data` whose BLAKE3 is not its digest, or -1 (many small inputs hashed side by side). */
  blake3ManyMatch(data: Uint8Array[], digests: Uint8Array[]): number;
  /** fcntl(F_SETFL) with or without O_DIRECT: 0 or -errno (-EINVAL where the file system has no direct I/O). */
  setDirect(fd: number, on: boolean): number;
  /** flock(2): shared or exclusive, waiting or not; 0 or -errno (-EWOULDBLOCK: held elsewhere). */
  flock(fd: number, exclusive: boolean, wait: boolean): number;
  unflock(fd: number): number;
  /** One datagram to a unix datagram socket (a leading @: the abstract namespace); 0 or -errno. */
  notifySocket(path: string, message: string): number;
  mount(source: string, target: string | Buffer, fstype: string, flags: number, data: string): number;
  umount2(target: string | Buffer, flags: number): number;
  socketpair(): [number, number] | number;
  /** Blocks until a file descriptor arrives with SCM_RIGHTS; -errno on failure. */
  receiveFd(socket: number): number;
  /** A listening AF_UNIX stream socket (non-blocking), or -errno. */
  listenUnix(path: string | Buffer): number;
  /** A connected AF_UNIX stream socket (blocking), or -errno. */
  connectUnix(path: string | Buffer): number;
  /** The next connection (non-blocking), or -errno (-EAGAIN when nobody is waiting). */
  accept(listener: number): number;
  /** `[bytes or -errno, ...fds]`: one recvmsg(2); -EMSGSIZE when more fds came than fit (32). */
  recvmsg(fd: number, buffer: Uint8Array): number[];
  /** One sendmsg(2) of the buffers with `fds` attached (SCM_RIGHTS): bytes sent, or -errno. */
  sendmsg(fd: number, buffers: Uint8Array[], fds: number[]): number;
  /** A MAP_SHARED mapping of `fd` as an ArrayBuffer, or -errno. */
  mmap(fd: number, length: number, offset: number, writable: boolean): ArrayBuffer | number;
  /** Unmaps a buffer `mmap` returned, at once; it becomes detached (length 0). */
  munmap(buffer: ArrayBuffer): void;
  /** A non-blocking eventfd, or -errno. */
  eventfd(): number;
  /** [start, end, …] of this process's shared mappings of the file at `path` (as /proc/self/maps names it), or -errno. */
  mappingsOf(path: string): number[] | number;
  /**
   * Drops the pages of the mapping [start, end) of `path` from this process (madvise
   * MADV_DONTNEED; they stay in the page cache): bytes released, or -ESTALE when that range is
   * not a mapping of `path` (any more), or -errno.
   */
  releaseMapping(path: string, start: number, end: number): number;
  /**
   * A split ring for virtiofsServe: guest memory as mapped chunks (`buffers[i]` maps guest
   * addresses from `gpas[i]`, the first `primaries[i]` bytes its own) and the guest addresses
   * of the descriptor table, avail and used rings.
   */
  fastRing(buffers: ArrayBuffer[], gpas: number[], primaries: number[], desc: number, avail: number, used: number, size: number, indirect: boolean): FastRing;
  /** What one FUSE session lets virtiofsServe answer: attributes and open files by inode. */
  fastTables(): FastTables;
  /** GETATTR of `nodeid` is answered with these 104 bytes (fuse_attr_out). */
  fastAttributes(tables: FastTables, nodeid: number, attrOut: Buffer): void;
  /** READ of `nodeid` without a handle is answered from `size` bytes of `fd` (duplicated) while they are cached. */
  fastFile(tables: FastTables, nodeid: number, fd: number, size: number): void;
  /** Nothing of `nodeid` is answered natively any more. */
  fastForget(tables: FastTables, nodeid: number): void;
  /** Forgets everything (and closes the duplicated fds). */
  fastClear(tables: FastTables): void;
  /**
   * Answers, in order, the chains from avail index `nextAvail` on while they are GETATTRs and
   * READs the tables cover (at most `max`), putting them on the used ring from `nextUsed` on;
   * stops at the first it leaves to JavaScript. Returns how many (-1: the ring's memory was
   * unmapped since fastRing). `stats` gets += GETATTRs, READs, bytes read.
   */
  /**
   * Waits for kicks on `kickFd` and answers natively what they bring, interrupting through
   * `callFd` (-1: none) as a turn's end would, up to `rounds` times; returns why it stopped
   * (NativeWait in vhost-user/virtqueue.ts), -1 when the ring's memory changed. `state` is the
   * queue's (nextAvail, nextUsed, signalledUsed, awaitingDriver, availAtInterrupt, eventIdx),
   * read and written back; `stats` as virtiofsServe's.
   */
  virtiofsLoop(ring: FastRing, tables: FastTables, kickFd: number, callFd: number, state: Float64Array, stats: Float64Array, rounds: number): number;
  /** 1 as soon as the ring's avail index moves beyond `nextAvail`, 0 after `maxNs` without that, -1 when its memory changed. */
  ringSpin(ring: FastRing, nextAvail: number, maxNs: number): number;
  virtiofsServe(ring: FastRing, tables: FastTables, nextAvail: number, nextUsed: number, stats: Float64Array, max: number): number;
  /** A memfd of `size` bytes, or -errno. */
  memfd(name: string, size: number): number;
  /** execv(2): replaces the process (same pid, env and inheritable fds); returns -errno only on failure. */
  exec(path: string, argv: string[]): number;
  /**
   * sendfile(2) of `count` bytes of `inFd` from `offset` to `outFd` (a socket, pipe, file or
   * /dev/null), on a thread-pool worker. `done` gets the bytes sent (> 0, maybe fewer than asked),
   * 0 at the end of `inFd`, or -errno (-EAGAIN: a non-blocking `outFd` is full, nothing sent).
   */
  sendfileAsync(outFd: number, inFd: number, offset: number, count: number, done: (result: number) => void): void;
  /** A close-on-exec duplicate of `fd`, or -errno. */
  dup(fd: number): number;
}

let addon: NativeAddon | undefined;

/** The addon, loaded on first use so commands that never need it start without it. */
export function native(): NativeAddon {
  if (!addon) {
    const require = createRequire(import.meta.url);
    // Both src/native/ (tsx) and dist/native/ sit two levels below the package root.
    try {
      addon = require('../../build/Release/nixcas_native.node') as NativeAddon;
    } catch (err) {
      throw new Error(
        `the nixcas native addon is not built (${(err as Error).message.split('\n')[0]}); run \`npm ci\` or \`npx node-gyp rebuild\``,
      );
    }
  }
  return addon;
}

let optional: NativeAddon | false | undefined;

/** The addon, or undefined where it is not built: for callers that have a slower way without it. */
export function optionalNative(): NativeAddon | undefined {
  if (optional === undefined) {
    try {
      optional = native();
    } catch {
      optional = false;
    }
  }
  return optional || undefined;
}

export const MS_RDONLY = 1;
export const MS_NOSUID = 2;
export const MS_NODEV = 4;
export const MNT_DETACH = 2;

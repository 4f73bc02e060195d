// The /dev/fuse transport: mounts, reads requests whenever the kernel has
// some (without blocking the event loop), hands them to the protocol layer,
// writes the replies, and unmounts.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, constants as fsConstants, openSync, readFileSync, realpathSync, statSync, writeFileSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { resolve } from 'node:path';
import { MNT_DETACH, MS_NODEV, MS_NOSUID, MS_RDONLY, native, type Watch } from '../native/index.js';
import type { FuseServer, ReplySink } from './protocol.js';
import { MAX_WRITE } from './protocol.js';

const errno = osConstants.errno;

export interface MountOptions {
  mountpoint: string;
  /** Let users other than the one mounting see the mount (allow_other). */
  allowOther?: boolean;
  /** Shown as the source in /proc/mounts. */
  fsname?: string;
  log?: (message: string) => void;
}

export class MountError extends Error {
  override name = 'MountError';
}

/**
 * The kernel gives a FUSE mount 128 KiB of readahead and lets a server only
 * lower it in INIT; as root we raise it afterwards through sysfs, so that
 * sequential reads come as 1 MiB requests (max_pages 256): a quarter of the
 * round trips.
 */
const READ_AHEAD_KB = 1024;

/** The kernel needs a read buffer for the largest request it may send (a WRITE of max_write). */
const READ_BUFFER_SIZE = MAX_WRITE + 64 * 1024;

export class DevFuseSession implements ReplySink {
  private watch?: Watch;
  private readonly readBuffer = Buffer.allocUnsafe(READ_BUFFER_SIZE);
  private finished = false;
  private initialized = false;
  private resolveClosed!: () => void;
  /** Resolves when the kernel ended the connection (unmounted) or the session was closed. */
  readonly closed = new Promise<void>((resolve) => (this.resolveClosed = resolve));

  private constructor(
    private readonly fd: number,
    private readonly server: FuseServer,
    private readonly options: MountOptions,
    /** How the mount was made, so that unmount undoes it the same way. */
    private readonly viaFusermount: boolean,
  ) {}

  /** Mounts a FUSE filesystem at `options.mountpoint` served by `server`. */
  static async mount(server: FuseServer, options: MountOptions): Promise<DevFuseSession> {
    checkMountpoint(options.mountpoint, (message) => options.log?.(message));
    const root = process.getuid?.() === 0;
    const fd = root ? mountDirectly(options) : await mountWithFusermount(options);
    const session = new DevFuseSession(fd, server, options, !root);
    session.watch = native().watch(fd, () => session.drain());
    return session;
  }

  /** Writes one reply. A reply to a request the kernel gave up on (ENOENT) is dropped quietly. */
  send(reply: Buffer): void {
    if (this.finished) return;
    const n = native().writev(this.fd, [reply]);
    if (n >= 0 || n === -errno.ENOENT || n === -errno.ENODEV) return;
    this.log(`writing a FUSE reply failed: ${errnoName(-n)}`);
  }

  /** Unmounts; the session ends when the kernel lets go (after open files close, if busy). */
  unmount(): void {
    if (this.finished) return;
    if (this.viaFusermount) {
      const result = spawnSync('fusermount3', ['-u', '-z', this.options.mountpoint], { stdio: ['ignore', 'ignore', 'pipe'] });
      if (result.status !== 0) this.log(`fusermount3 -u failed: ${result.stderr?.toString().trim() || result.error?.message}`);
      return;
    }
    let rc = native().umount2(this.options.mountpoint, 0);
    if (rc === -errno.EBUSY) {
      this.log(`${this.options.mountpoint} is busy; detaching it, it goes away when the last file on it is closed`);
      rc = native().umount2(this.options.mountpoint, MNT_DETACH);
    }
    if (rc < 0 && rc !== -errno.EINVAL) this.log(`unmounting ${this.options.mountpoint} failed: ${errnoName(-rc)}`);
    // EINVAL: not mounted any more (someone ran umount); the read loop sees ENODEV.
  }

  /** Reads every request the kernel has queued. */
  private drain(): void {
    while (!this.finished) {
      const n = native().read(this.fd, this.readBuffer);
      if (n > 0) {
        // Requests are handled asynchronously: give each its own copy.
        this.server.handle(Buffer.from(this.readBuffer.subarray(0, n)), this);
        if (!this.initialized) {
          // The first request is INIT, answered synchronously: the kernel has set
          // the mount's readahead by now, so raising it will stick.
          this.initialized = true;
          if (!this.viaFusermount) raiseReadahead(this.options.mountpoint, this.log.bind(this));
        }
        continue;
      }
      if (n === -errno.EAGAIN || n === -errno.ENOENT) return; // nothing queued / request interrupted
      if (n !== -errno.ENODEV) this.log(`reading /dev/fuse failed: ${n === 0 ? 'end of file' : errnoName(-n)}`);
      this.finish();
      return;
    }
  }

  private finish(): void {
    if (this.finished) return;
    this.finished = true;
    if (this.watch) native().unwatch(this.watch);
    closeSync(this.fd);
    this.resolveClosed();
  }

  private log(message: string): void {
    this.options.log?.(message);
  }
}

function checkMountpoint(mountpoint: string, log: (message: string) => void): void {
  try {
    if (!statSync(mountpoint).isDirectory()) throw new MountError(`${mountpoint} is not a directory`);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new MountError(`${mountpoint} does not exist; create the directory first`);
    if (code === 'ENOTCONN') {
      throw new MountError(`${mountpoint} is a FUSE mount whose server is gone; run \`umount -l ${mountpoint}\` first`);
    }
    throw err;
  }
  const existing = mountAt(realpathSync(mountpoint));
  if (existing?.startsWith('fuse')) {
    throw new MountError(`${mountpoint} is already a FUSE mount (${existing}), another nixcas mount perhaps: unmount it first (\`umount ${mountpoint}\`) rather than stack a second one on it`);
  }
  if (existing) log(`${mountpoint} is already a mount point (${existing}); the store is mounted over it and hides it until unmounted`);
}

/** The file system type mounted at `path` (as /proc/self/mountinfo says; the topmost), or undefined. */
function mountAt(path: string): string | undefined {
  let found: string | undefined;
  let table: string;
  try {
    table = readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return undefined;
  }
  for (const line of table.split('\n')) {
    const fields = line.split(' ');
    const separator = fields.indexOf('-');
    if (separator < 0) continue;
    const point = fields[4]!.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
    if (point === path) found = fields[separator + 1];
  }
  return found;
}

function mountData(fd: number, options: MountOptions): string {
  const uid = process.getuid?.() ?? 0;
  const gid = process.getgid?.() ?? 0;
  const data = [`fd=${fd}`, 'rootmode=40000', `user_id=${uid}`, `group_id=${gid}`, 'default_permissions'];
  if (options.allowOther) data.push('allow_other');
  return data.join(',');
}

/** As root: open /dev/fuse and mount(2) with its fd. */
function mountDirectly(options: MountOptions): number {
  let fd: number;
  try {
    fd = openSync('/dev/fuse', fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
  } catch (err) {
    throw new MountError(`cannot open /dev/fuse: ${(err as Error).message} (is the fuse module loaded?)`);
  }
  const rc = native().mount(options.fsname ?? 'nixcas', options.mountpoint, 'fuse.nixcas', MS_RDONLY | MS_NOSUID | MS_NODEV, mountData(fd, options));
  if (rc < 0) {
    closeSync(fd);
    throw new MountError(`mounting ${options.mountpoint} failed: ${errnoName(-rc)}`);
  }
  return fd;
}

/** As another user: fusermount3 (setuid root) mounts and passes the /dev/fuse fd back over a socket. */
async function mountWithFusermount(options: MountOptions): Promise<number> {
  const pair = native().socketpair();
  if (typeof pair === 'number') throw new MountError(`socketpair failed: ${errnoName(-pair)}`);
  const [ours, theirs] = pair;
  const mountOptions = ['ro', 'nosuid', 'nodev', 'default_permissions', `fsname=${options.fsname ?? 'nixcas'}`, 'subtype=nixcas'];
  if (options.allowOther) mountOptions.push('allow_other');
  let stderr = '';
  let spawnError: Error | undefined;
  const child = spawn('fusermount3', ['-o', mountOptions.join(','), '--', options.mountpoint], {
    stdio: ['ignore', 'ignore', 'pipe', theirs],
    env: { ...process.env, _FUSE_COMMFD: '3' },
  });
  child.on('error', (err) => (spawnError = err));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  closeSync(theirs);
  const fd = native().receiveFd(ours); // fusermount3 sends the fd once it has mounted, or exits
  closeSync(ours);
  if (fd < 0) {
    await new Promise((resolve) => child.once('close', resolve));
    const why = spawnError ? `cannot run fusermount3 (${spawnError.message}; install fuse3)` : stderr.trim() || 'fusermount3 failed';
    throw new MountError(`mounting ${options.mountpoint} failed: ${why}`);
  }
  native().setNonBlocking(fd);
  return fd;
}

/** Sets the readahead of the FUSE mount at `mountpoint` (its backing device info in sysfs). */
function raiseReadahead(mountpoint: string, log: (message: string) => void): void {
  try {
    // No stat or realpath of the mountpoint: it is mounted now, so they would
    // wait for this very process to answer. mountinfo does not touch the mount.
    const target = resolve(mountpoint);
    const line = readFileSync('/proc/self/mountinfo', 'utf8')
      .split('\n')
      .map((l) => l.split(' '))
      .filter((fields) => unescapeMountinfo(fields[4] ?? '') === target && fields.includes('fuse.nixcas'))
      .pop();
    if (line) writeFileSync(`/sys/class/bdi/${line[2]}/read_ahead_kb`, String(READ_AHEAD_KB));
  } catch (err) {
    log(`could not raise the readahead to ${READ_AHEAD_KB} KiB (${(err as Error).message}); sequential reads will be slower`);
  }
}

/** mountinfo writes space, tab, newline and backslash as octal escapes. */
function unescapeMountinfo(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

function errnoName(code: number): string {
  for (const [name, value] of Object.entries(errno)) if (value === code) return name;
  return `errno ${code}`;
}

// The unix socket front ends connect to. Each connection is its own device
// (one VM); when a VM goes away the socket stays, so the next VM can connect
// to the same running back end.
import { chmodSync, lstatSync, unlinkSync } from 'node:fs';
import { constants } from 'node:os';
import { closeAll } from './channel.js';
import { native, type Watch } from '../native/index.js';

export class ListenError extends Error {
  override name = 'ListenError';
}

export class UnixListener {
  private watch?: Watch;
  private constructor(
    readonly path: string,
    private readonly fd: number,
    /** The socket file is ours to remove on close (not when it was handed to us). */
    private readonly ownsFile = true,
  ) {}

  /**
   * Accepts on a socket someone else made and listens on (systemd's socket
   * activation): `fd`, already listening; its file is left alone on close.
   */
  static adopt(fd: number, path: string, onConnection: (fd: number) => void, log: (message: string) => void): UnixListener {
    const made = native().setNonBlocking(fd);
    if (made < 0) throw new ListenError(`cannot use the socket handed over as fd ${fd}: ${errnoName(-made)}`);
    const listener = new UnixListener(path, fd, false);
    listener.acceptOn(onConnection, log);
    return listener;
  }

  /**
   * Listens at `path`, a socket with permissions `mode` whatever the umask
   * (it is created 0600 and only then opened up). A socket file left by a back
   * end that is gone is replaced; one that still answers, or any other kind
   * of file, is an error.
   */
  static listen(path: string, onConnection: (fd: number) => void, log: (message: string) => void, mode = 0o600): UnixListener {
    removeStaleSocket(path);
    const umask = process.umask(0o177);
    let fd: number;
    try {
      fd = native().listenUnix(path);
    } finally {
      process.umask(umask);
    }
    if (fd < 0) throw new ListenError(`cannot listen on ${path}: ${errnoName(-fd)}`);
    try {
      if (mode !== 0o600) chmodSync(path, mode);
    } catch (err) {
      closeAll([fd]);
      throw new ListenError(`cannot give ${path} mode ${mode.toString(8)}: ${(err as Error).message}`);
    }
    const listener = new UnixListener(path, fd);
    listener.acceptOn(onConnection, log);
    return listener;
  }

  private acceptOn(onConnection: (fd: number) => void, log: (message: string) => void): void {
    const fd = this.fd;
    this.watch = native().watch(fd, () => {
      for (;;) {
        const client = native().accept(fd);
        if (client === -constants.errno.EAGAIN) return;
        if (client < 0) return log(`accepting a connection failed: ${errnoName(-client)}`);
        onConnection(client);
      }
    });
  }

  /** Stops listening and removes the socket file; connections already made go on. */
  close(): void {
    if (this.watch) native().unwatch(this.watch);
    this.watch = undefined;
    closeAll([this.fd]);
    if (!this.ownsFile) return;
    try {
      unlinkSync(this.path);
    } catch {
      // already gone
    }
  }
}

function removeStaleSocket(path: string): void {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch {
    return; // nothing there
  }
  if (!isSocket) throw new ListenError(`${path} exists and is not a socket; remove it or choose another path`);
  const probe = native().connectUnix(path);
  if (probe >= 0) {
    closeAll([probe]);
    throw new ListenError(`another process is already listening on ${path}`);
  }
  if (probe !== -constants.errno.ECONNREFUSED) throw new ListenError(`cannot check ${path}: ${errnoName(-probe)}`);
  unlinkSync(path);
}

export function errnoName(errno: number): string {
  const name = Object.entries(constants.errno).find(([, value]) => value === errno)?.[0];
  return name ?? `errno ${errno}`;
}

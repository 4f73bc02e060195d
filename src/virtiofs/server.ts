// `nixcas virtiofs`: a vhost-user socket where every connection (one VM) gets
// its own virtio-fs device over the same store. A VM that shuts down or
// reboots just connects again.
import type { ReadOnlyFilesystem } from '../fs/filesystem.js';
import { limitLog } from '../fuse/log-limit.js';
import { UnixListener, VhostUserBackend } from '../vhost-user/index.js';
import { VirtioFsDevice } from './device.js';

export interface VirtioFsServerOptions {
  socketPath: string;
  requestQueues: number;
  /** A fresh filesystem (inode table) for each FUSE session; they may share caches. */
  makeFilesystem(): ReadOnlyFilesystem;
  /** What went wrong: a guest's bad request, a failed reply, a connection broken off. */
  log(message: string): void;
  /** Front ends coming and going (defaults to log). */
  info?(message: string): void;
  /** A socket already listening (systemd's socket activation) to accept on, instead of making one at socketPath. */
  listeningFd?: number;
  /** The socket's permissions (default 0600, whatever the umask). */
  socketMode?: number;
  /** Wait for kicks in poll(2) between turns whose requests were answered at once (default true). */
  waitForKicks?: boolean;
  /** How long to wait on the CPU for a busy guest's next request (BackendOptions.pollMaxNs). */
  pollMaxNs?: number;
}

export class VirtioFsServer {
  private readonly backends = new Set<VhostUserBackend>();
  private nextConnection = 1;
  private listener?: UnixListener;

  private constructor(private readonly options: VirtioFsServerOptions) {}

  static listen(options: VirtioFsServerOptions): VirtioFsServer {
    const server = new VirtioFsServer(options);
    server.listener = options.listeningFd !== undefined
      ? UnixListener.adopt(options.listeningFd, options.socketPath, (fd) => server.accept(fd), options.log)
      : UnixListener.listen(options.socketPath, (fd) => server.accept(fd), options.log, options.socketMode);
    return server;
  }

  /** Front ends connected now. */
  get connections(): number {
    return this.backends.size;
  }

  /** Stops listening and hangs up on every front end. */
  close(): void {
    this.listener?.close();
    this.listener = undefined;
    for (const backend of [...this.backends]) backend.close('the back end is shutting down');
  }

  private accept(fd: number): void {
    const id = this.nextConnection++;
    // Whatever one VM's requests make us say is limited per connection, so a
    // guest flooding the log cannot crowd out what another one causes.
    const log = limitLog((message: string) => this.options.log(`connection ${id}: ${message}`));
    const info = (message: string) => (this.options.info ?? this.options.log)(`connection ${id}: ${message}`);
    const device = new VirtioFsDevice({ requestQueues: this.options.requestQueues, makeFilesystem: this.options.makeFilesystem, log });
    const backend = new VhostUserBackend(fd, device, {
      log,
      waitForKicks: this.options.waitForKicks ?? true,
      pollMaxNs: this.options.pollMaxNs,
      onClosed: (reason) => {
        this.backends.delete(backend);
        info(`closed (${reason})`);
      },
    });
    this.backends.add(backend);
    info('front end connected');
  }
}

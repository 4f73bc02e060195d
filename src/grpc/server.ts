// One gRPC server exposing the castore services under tvix's and snix's
// package names, plus the standard health and reflection services.
import { chmodSync, readFileSync, readlinkSync, existsSync, statSync, unlinkSync } from 'node:fs';
import { type Server as NetServer, connect, createServer as createNetServer } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation } from 'grpc-health-check';
import { blobServiceHandlers, directoryServiceHandlers } from './castore-server.js';
import { PACKAGE_PREFIXES, packageDefinition, qualifiedServiceName, tolerantServiceDefinition } from './protos.js';
import type { StoreServices } from '../store/import.js';
import { pathInfoServiceHandlers } from './store-server.js';

const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

export interface ServerOptions {
  /** Every write method (the three Puts) answers PERMISSION_DENIED and stores nothing. */
  readOnly?: boolean;
}

export function createServer(services: StoreServices, options: ServerOptions = {}): grpc.Server {
  const server = new grpc.Server({
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  });
  const guard = (service: string, handlers: grpc.UntypedServiceImplementation) => counted(service, options.readOnly ? withoutWrites(handlers) : handlers);
  const blobHandlers = guard('BlobService', blobServiceHandlers(services.blobs));
  const directoryHandlers = guard('DirectoryService', directoryServiceHandlers(services.directories));
  const serving: Record<string, 'SERVING'> = { '': 'SERVING' };
  for (const prefix of PACKAGE_PREFIXES) {
    server.addService(tolerantServiceDefinition(prefix, 'BlobService'), blobHandlers);
    server.addService(tolerantServiceDefinition(prefix, 'DirectoryService'), directoryHandlers);
    server.addService(tolerantServiceDefinition(prefix, 'PathInfoService'), guard('PathInfoService', pathInfoServiceHandlers(services, prefix)));
    for (const service of ['BlobService', 'DirectoryService', 'PathInfoService']) {
      serving[qualifiedServiceName(prefix, service)] = 'SERVING';
    }
  }
  new HealthImplementation(serving).addToServer(server);
  new ReflectionService(packageDefinition()).addToServer(server);
  return server;
}

/** Calls by method (Service/Method, whichever package), for metrics (cli/metrics.ts). */
export const grpcCallCounts = new Map<string, number>();

/** The same handlers, each counting its calls in grpcCallCounts first. */
function counted(service: string, handlers: grpc.UntypedServiceImplementation): grpc.UntypedServiceImplementation {
  const wrapped: grpc.UntypedServiceImplementation = {};
  for (const [method, handler] of Object.entries(handlers)) {
    const key = `${service}/${method}`;
    wrapped[method] = ((...args: unknown[]) => {
      grpcCallCounts.set(key, (grpcCallCounts.get(key) ?? 0) + 1);
      return (handler as (...a: unknown[]) => unknown)(...args);
    }) as grpc.UntypedHandleCall;
  }
  return wrapped;
}

/** The same handlers, with Put answering PERMISSION_DENIED before it reads anything. */
function withoutWrites(handlers: grpc.UntypedServiceImplementation): grpc.UntypedServiceImplementation {
  return {
    ...handlers,
    Put: (_call: unknown, callback: grpc.sendUnaryData<unknown>) =>
      callback({ code: grpc.status.PERMISSION_DENIED, details: 'this nixcas daemon serves this address read-only (--read-only, --listen-read-only or a socket named read-only): it stores nothing' } as grpc.ServiceError),
  };
}

/** A listen address: a unix socket path, or host:port (IPv6 hosts in brackets). */
export function grpcListenTarget(address: string): { target: string; socketPath?: string } {
  if (address.startsWith('unix:')) return { target: address, socketPath: address.replace(/^unix:(\/\/)?/, '') };
  if (address.includes('/')) return { target: `unix:${address}`, socketPath: address };
  if (!/^(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d+$/.test(address)) {
    throw new Error(`listen address must be host:port, [ipv6]:port or a unix socket path, got ${JSON.stringify(address)}`);
  }
  return { target: address };
}

/** Removes a socket file left by a daemon that is gone; refuses to steal a live one. */
async function clearStaleSocket(path: string): Promise<void> {
  if (!existsSync(path)) return;
  if (!statSync(path).isSocket()) throw new Error(`${path} exists and is not a socket`);
  const alive = await new Promise<boolean>((resolve) => {
    const probe = connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new Error(`${path}: another server is already listening there`);
  unlinkSync(path);
}

/**
 * Binds the server; resolves with the bound port (0 for unix sockets). A unix
 * socket gets permissions `socketMode` whatever the umask: it is bound 0600
 * (the umask is narrowed until the bind is done) and only then opened up.
 */
export interface TlsFiles {
  cert: string;
  key: string;
  /** Client certificates signed by this CA are required when given. */
  clientCa?: string;
}

/** Server credentials: TLS from PEM files (client certificates required with a CA), or none. */
export function serverCredentials(tls?: TlsFiles): grpc.ServerCredentials {
  if (!tls) return grpc.ServerCredentials.createInsecure();
  const read = (flag: string, path: string) => {
    try {
      return readFileSync(path);
    } catch (err) {
      throw new Error(`${flag} ${path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (err as Error).message}`);
    }
  };
  const clientCa = tls.clientCa ? read('--tls-client-ca', tls.clientCa) : null;
  return grpc.ServerCredentials.createSsl(clientCa, [{ cert_chain: read('--tls-cert', tls.cert), private_key: read('--tls-key', tls.key) }], clientCa !== null);
}

/** Whether a TCP listen address is on loopback only (unix sockets count as local too). */
export function isLocalListen(address: string): boolean {
  const { socketPath } = grpcListenTarget(address);
  if (socketPath) return true;
  const host = address.slice(0, address.lastIndexOf(':')).replace(/^\[|\]$/g, '');
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}

export async function listen(server: grpc.Server, address: string, socketMode = 0o600, credentials = grpc.ServerCredentials.createInsecure()): Promise<number> {
  quietBindFailures();
  const { target, socketPath } = grpcListenTarget(address);
  if (socketPath) await clearStaleSocket(socketPath);
  const umask = socketPath ? process.umask(0o177) : undefined;
  let port: number;
  try {
    port = await new Promise<number>((resolve, reject) => {
      server.bindAsync(target, credentials, (err, bound) => (err ? reject(err) : resolve(bound)));
    });
  } finally {
    if (umask !== undefined) process.umask(umask);
  }
  if (socketPath && socketMode !== 0o600) chmodSync(socketPath, socketMode);
  return port;
}

/** A listening socket someone else bound (systemd's socket activation), now serving gRPC. */
export interface HandedListener {
  listener: NetServer;
  /** host:port, or the unix socket's path. */
  where: string;
  tcp: boolean;
}

/**
 * Serves `server` on the listening socket `fd`: its connections are handed to
 * grpc-js one by one (grpc-js binds only addresses itself). `credentials` picks
 * TLS or not once the socket's kind is known.
 */
export async function serveHandedSocket(server: grpc.Server, fd: number, credentials: (tcp: boolean, where: string) => grpc.ServerCredentials): Promise<HandedListener> {
  const listener = createNetServer();
  await new Promise<void>((resolve, reject) => {
    listener.once('error', reject);
    listener.listen({ fd }, () => {
      listener.off('error', reject);
      resolve();
    });
  }).catch((err: Error) => {
    throw new Error(`cannot serve on the socket systemd handed over (fd ${fd}): ${err.message}`);
  });
  const bound = listener.address();
  const tcp = typeof bound === 'object' && bound !== null;
  const where = tcp ? `${bound.address.includes(':') ? `[${bound.address}]` : bound.address}:${bound.port}` : (bound ?? unixSocketPath(fd));
  const injector = server.createConnectionInjector(credentials(tcp, where));
  listener.on('connection', (socket) => injector.injectConnection(socket));
  return { listener, where, tcp };
}

/**
 * The path a unix socket descriptor is bound to, from /proc (Node's address() has none for a
 * socket it did not bind): its inode, looked up in /proc/net/unix.
 */
function unixSocketPath(fd: number): string {
  try {
    const inode = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/self/fd/${fd}`))?.[1];
    const line = readFileSync('/proc/self/net/unix', 'utf8').split('\n').find((row) => row.split(/\s+/)[6] === inode);
    const path = line?.split(/\s+/)[7];
    if (path) return path;
  } catch {
    // no /proc: the descriptor will do
  }
  return `unix socket fd ${fd}`;
}

let quiet = false;

/**
 * grpc-js also logs a failed bind itself ("E No address added out of total 1
 * resolved"); the error that reaches the caller says it better, once. Every
 * other line of its logger goes out as before.
 */
function quietBindFailures(): void {
  if (quiet) return;
  quiet = true;
  grpc.setLogger({
    error: (...args: unknown[]) => {
      if (typeof args[0] === 'string' && /No address added out of total/.test(args[0])) return;
      console.error(...args);
    },
  } as Partial<Console> as Console);
}

// Service URLs → backends. This is the composition root: the one place that
// knows every backend, so castore/ and grpc/ never need to know each other.
//
//   memory://                 in this process only
//   local:///path/to/store    the embedded local store (what --store selects)
//   grpc+unix:///run/x.sock   a remote store over gRPC on a unix socket
//   grpc+http://host:port     a remote store over gRPC on TCP
// gRPC URLs take ?package=snix to talk to snix.castore.v1 instead of tvix.castore.v1.
import { homedir } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import envPaths from 'env-paths';
import type { BlobService } from '../castore/blobservice.js';
import type { DirectoryService } from '../castore/directoryservice.js';
import type { PathInfoService } from '../store/pathinfoservice.js';

// Backends are loaded when a URL names them: a command that only uses the
// local store never pays for loading gRPC (or the other way round).
const memoryCastore = () => import('../castore/backends/memory.js');
const localCastore = () => import('../castore/backends/local.js');
const grpcCastore = () => import('../grpc/castore-client.js');

export interface ServiceAddresses {
  blob: string;
  directory: string;
  pathInfo: string;
  /** A local store kept in front of remote blob and directory services (--local-cache). */
  localCache?: string;
}

/** Where the local store lives unless --store or NIXCAS_STORE says otherwise. */
export function defaultStoreDir(): string {
  return envPaths('nixcas', { suffix: '' }).data || join(homedir(), '.local/share/nixcas');
}

export function localStoreUrl(dir: string): string {
  // `--store local:///x` would otherwise create a directory named `local:` here.
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(dir)) {
    throw new Error(`${dir}: --store and NIXCAS_STORE take a directory; give service URLs with --blob-service-addr, --directory-service-addr and --path-info-service-addr`);
  }
  return `local://${resolve(dir)}`;
}

export interface AddressOptions {
  store?: string;
  blobServiceAddr?: string;
  directoryServiceAddr?: string;
  pathInfoServiceAddr?: string;
  localCache?: string;
}

/**
 * Precedence, highest first: a --*-service-addr flag, --store, the
 * *_SERVICE_ADDR environment variable, NIXCAS_STORE, the default store.
 */
export function resolveAddresses(options: AddressOptions, env: NodeJS.ProcessEnv = process.env): ServiceAddresses {
  const flagStore = options.store && localStoreUrl(options.store);
  // A relative NIXCAS_STORE would name a different store from every directory it is used in.
  if (env.NIXCAS_STORE && !isAbsolute(env.NIXCAS_STORE)) throw new Error(`NIXCAS_STORE=${env.NIXCAS_STORE}: the store directory in the environment must be an absolute path`);
  const fallback = localStoreUrl(env.NIXCAS_STORE || defaultStoreDir());
  const addresses: ServiceAddresses = {
    blob: options.blobServiceAddr || flagStore || env.BLOB_SERVICE_ADDR || fallback,
    directory: options.directoryServiceAddr || flagStore || env.DIRECTORY_SERVICE_ADDR || fallback,
    pathInfo: options.pathInfoServiceAddr || flagStore || env.PATH_INFO_SERVICE_ADDR || fallback,
  };
  // A cache goes in front of remote services only: the flag says so when they are not; the
  // environment's (a host-wide setting) is left unused.
  const remote = isRemote(addresses.blob) || isRemote(addresses.directory);
  if (options.localCache && !remote) {
    throw new Error(`--local-cache ${options.localCache}: the blob and directory services are not remote (${addresses.blob}); a local cache goes in front of grpc+unix:// or grpc+http:// services`);
  }
  if (remote) addresses.localCache = localCacheDir(options.localCache || env.NIXCAS_LOCAL_CACHE);
  return addresses;
}

/** The store directory when all three services are one local store (what --store names), else undefined. */
export function singleLocalStore(addresses: ServiceAddresses): string | undefined {
  const { blob, directory, pathInfo } = addresses;
  if (blob !== directory || blob !== pathInfo) return undefined;
  const url = schemeOf(blob);
  return url.protocol === 'local:' ? localPath(url, blob) : undefined;
}

function localPath(url: URL, raw: string): string {
  const path = decodeURIComponent(url.pathname);
  if (!isAbsolute(path) || url.host) throw new Error(`${raw}: a local store URL is local:///absolute/path`);
  return path;
}

function schemeOf(raw: string): URL {
  try {
    return new URL(raw);
  } catch {
    throw new Error(`${JSON.stringify(raw)} is not a service URL (memory://, local:///path, grpc+unix:///path, grpc+http://host:port)`);
  }
}

function isRemote(raw: string): boolean {
  return /^grpc\+/.test(raw);
}

function localCacheDir(dir: string | undefined): string | undefined {
  if (!dir) return undefined;
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(dir)) throw new Error(`${dir}: --local-cache takes a directory`);
  return resolve(dir);
}

/**
 * Puts the local store at `cacheDir` in front of remote blob and directory
 * services: what they send is kept, and read from there from then on. A
 * service that is local already is left as it is.
 */
export async function withLocalCache(
  addresses: ServiceAddresses, blobs: BlobService, directories: DirectoryService,
): Promise<{ blobs: BlobService; directories: DirectoryService }> {
  const dir = addresses.localCache;
  if (!dir) return { blobs, directories };
  const { CachedBlobService, CachedDirectoryService } = await import('../castore/cache.js');
  const { LocalStore } = await localCastore();
  return {
    blobs: isRemote(addresses.blob) ? new CachedBlobService(LocalStore.blobService(dir, { create: true }), blobs) : blobs,
    directories: isRemote(addresses.directory) ? new CachedDirectoryService(LocalStore.directoryService(dir, { create: true }), directories) : directories,
  };
}

/** How a service is opened: `create` lets a local store be made where there is none (commands that write). */
export interface OpenServiceOptions {
  create?: boolean;
}

export async function openBlobService(raw: string, options: OpenServiceOptions = {}): Promise<BlobService> {
  const url = schemeOf(raw);
  switch (url.protocol) {
    case 'memory:': return new (await memoryCastore()).MemoryBlobService();
    case 'local:': return (await localCastore()).LocalStore.blobService(localPath(url, raw), options);
    case 'grpc+unix:':
    case 'grpc+http:':
    case 'grpc+https:': return new (await grpcCastore()).GrpcBlobService(raw);
    default: throw new Error(`${raw}: unknown blob service scheme ${url.protocol}`);
  }
}

export async function openDirectoryService(raw: string, options: OpenServiceOptions = {}): Promise<DirectoryService> {
  const url = schemeOf(raw);
  switch (url.protocol) {
    case 'memory:': return new (await memoryCastore()).MemoryDirectoryService();
    case 'local:': return (await localCastore()).LocalStore.directoryService(localPath(url, raw), options);
    case 'grpc+unix:':
    case 'grpc+http:':
    case 'grpc+https:': return new (await grpcCastore()).GrpcDirectoryService(raw);
    default: throw new Error(`${raw}: unknown directory service scheme ${url.protocol}`);
  }
}

export async function openPathInfoService(raw: string, options: OpenServiceOptions = {}): Promise<PathInfoService> {
  const url = schemeOf(raw);
  switch (url.protocol) {
    case 'memory:': return new (await import('../store/backends/memory.js')).MemoryPathInfoService();
    case 'local:': return new (await import('../store/backends/local.js')).LocalPathInfoService(localPath(url, raw), options);
    case 'grpc+unix:':
    case 'grpc+http:':
    case 'grpc+https:': return new (await import('../grpc/store-client.js')).GrpcPathInfoService(raw);
    case 'nix+http:':
    case 'nix+https:': throw new Error(`${raw}: a binary cache as the path info service needs castore services to substitute into; open it with the other services`);
    default: throw new Error(`${raw}: unknown path info service scheme ${url.protocol}`);
  }
}

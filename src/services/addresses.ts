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
import { MemoryBlobService, MemoryDirectoryService } from '../castore/backends/memory.js';
import { LocalStore } from '../castore/backends/local.js';
import { GrpcBlobService, GrpcDirectoryService } from '../grpc/castore-client.js';
import type { PathInfoService } from '../store/pathinfoservice.js';
import { MemoryPathInfoService } from '../store/backends/memory.js';
import { LocalPathInfoService } from '../store/backends/local.js';
import { GrpcPathInfoService } from '../grpc/store-client.js';

export interface ServiceAddresses {
  blob: string;
  directory: string;
  pathInfo: string;
}

/** Where the local store lives unless --store or NIXCAS_STORE says otherwise. */
export function defaultStoreDir(): string {
  return envPaths('nixcas', { suffix: '' }).data || join(homedir(), '.local/share/nixcas');
}

export function localStoreUrl(dir: string): string {
  return `local://${resolve(dir)}`;
}

export interface AddressOptions {
  store?: string;
  blobServiceAddr?: string;
  directoryServiceAddr?: string;
  pathInfoServiceAddr?: string;
}

/**
 * Precedence, highest first: a --*-service-addr flag, --store, the
 * *_SERVICE_ADDR environment variable, NIXCAS_STORE, the default store.
 */
export function resolveAddresses(options: AddressOptions, env: NodeJS.ProcessEnv = process.env): ServiceAddresses {
  const flagStore = options.store && localStoreUrl(options.store);
  const fallback = localStoreUrl(env.NIXCAS_STORE || defaultStoreDir());
  return {
    blob: options.blobServiceAddr || flagStore || env.BLOB_SERVICE_ADDR || fallback,
    directory: options.directoryServiceAddr || flagStore || env.DIRECTORY_SERVICE_ADDR || fallback,
    pathInfo: options.pathInfoServiceAddr || flagStore || env.PATH_INFO_SERVICE_ADDR || fallback,
  };
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

export function openBlobService(raw: string): BlobService {
  const url = schemeOf(raw);
  switch (url.protocol) {
    case 'memory:': return new MemoryBlobService();
    case 'local:': return LocalStore.blobService(localPath(url, raw));
    case 'grpc+unix:':
    case 'grpc+http:': return new GrpcBlobService(raw);
    default: throw new Error(`${raw}: unknown blob service scheme ${url.protocol}`);
  }
}

export function openDirectoryService(raw: string): DirectoryService {
  const url = schemeOf(raw);
  switch (url.protocol) {
    case 'memory:': return new MemoryDirectoryService();
    case 'local:': return LocalStore.directoryService(localPath(url, raw));
    case 'grpc+unix:':
    case 'grpc+http:': return new GrpcDirectoryService(raw);
    default: throw new Error(`${raw}: unknown directory service scheme ${url.protocol}`);
  }
}

export function openPathInfoService(raw: string): PathInfoService {
  const url = schemeOf(raw);
  switch (url.protocol) {
    case 'memory:': return new MemoryPathInfoService();
    case 'local:': return new LocalPathInfoService(localPath(url, raw));
    case 'grpc+unix:':
    case 'grpc+http:': return new GrpcPathInfoService(raw);
    default: throw new Error(`${raw}: unknown path info service scheme ${url.protocol}`);
  }
}

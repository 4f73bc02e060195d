// `nixcas import`: a local tree becomes a store path, the same one
// `nix-store --add` would create, in one pass that fills castore and
// computes the NAR hash together.
import { createHash } from 'node:crypto';
import { basename, resolve } from 'node:path';
import type { BlobService } from '../castore/blobservice.js';
import type { DirectoryService } from '../castore/directoryservice.js';
import { importTree } from '../castore/import.js';
import { NarEncoder } from './nar/encoder.js';
import type { PathInfo } from './pathinfo.js';
import type { PathInfoService } from './pathinfoservice.js';
import { type StorePath, formatBasename, makeSourcePath, storePathNameProblem, InvalidStorePathError } from './storepath.js';

export interface StoreServices {
  blobs: BlobService;
  directories: DirectoryService;
  pathInfos: PathInfoService;
}

export interface ImportedPath {
  storePath: StorePath;
  info: PathInfo;
}

export async function importPath(
  path: string,
  services: StoreServices,
  options: { name?: string; onProgress?: (bytes: number, files: number) => void } = {},
): Promise<ImportedPath> {
  const name = options.name ?? basename(resolve(path));
  const problem = storePathNameProblem(name);
  if (problem) throw new InvalidStorePathError(`${path}: cannot be a store path: ${problem}`);
  const narHash = createHash('sha256');
  const encoder = new NarEncoder((chunk) => narHash.update(chunk));
  const root = await importTree(path, Buffer.from(name), services, { observer: encoder, onProgress: options.onProgress });
  encoder.flush();
  const narSha256 = narHash.digest();
  const storePath = makeSourcePath(narSha256, name);
  root.node.name = Buffer.from(formatBasename(storePath));
  const info: PathInfo = {
    node: root,
    references: [],
    narSize: encoder.size,
    narSha256,
    signatures: [],
    ca: { type: 'NAR_SHA256', digest: narSha256 },
  };
  await services.pathInfos.put(info);
  return { storePath, info };
}

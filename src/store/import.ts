// `nixcas import`: a local tree becomes a store path, the same one
// `nix-store --add` would create, in one pass that fills castore and
// computes the NAR hash together.
import { basename, resolve } from 'node:path';
import type { BlobService } from '../castore/blobservice.js';
import type { DirectoryService } from '../castore/directoryservice.js';
import { importTree } from '../castore/import.js';
import type { Node } from '../castore/model.js';
import { NarHasher } from './nar/hasher.js';
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
  if (problem) {
    // A name that was given is the flag's fault, not the file's.
    if (options.name !== undefined) throw new InvalidStorePathError(`--name ${JSON.stringify(options.name)}: not a store path name: ${problem}`);
    throw new InvalidStorePathError(`${path}: cannot be a store path: ${problem}`);
  }
  const nar = new NarHasher();
  let root: Node;
  try {
    root = await importTree(path, Buffer.from(name), services, { observer: nar, onProgress: options.onProgress });
  } catch (err) {
    nar.abandon();
    throw err;
  }
  const { narSha256, narSize } = await nar.finish();
  const storePath = makeSourcePath(narSha256, name);
  root.node.name = Buffer.from(formatBasename(storePath));
  const info: PathInfo = {
    node: root,
    references: [],
    narSize,
    narSha256,
    signatures: [],
    ca: { type: 'NAR_SHA256', digest: narSha256 },
  };
  await services.pathInfos.put(info);
  return { storePath, info };
}

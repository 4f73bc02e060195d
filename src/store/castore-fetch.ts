// Substituting from another nixcas's nar-bridge object by object: its narinfo names the path's
// root directory (CastoreDirectory), the bridge serves that directory's closure
// (castore/directories/<hex>) and each blob (castore/blob/<hex>), and only the blobs the local
// store lacks are fetched. Every directory is checked against the digest its parent (or the
// narinfo) names and every blob against its digest and size as it is stored; the caller then
// checks the tree's NAR against the signed NarHash before it registers anything, so an upstream
// that lies here gets nothing registered. What was stored and not registered is garbage (gc).
import { type B3Digest, blake3, digestKey, formatDigest } from '../castore/digest.js';
import { type Directory, type Node, directorySize } from '../castore/model.js';
import { validateDirectory } from '../castore/validate.js';
import { decodeDirectory } from '../castore/wire.js';
import type { BinaryCache } from './binary-cache.js';
import type { StoreServices } from './import.js';

export interface TreeFetchOptions {
  /** Directory records larger than this in all are refused (the NAR's size bounds them). */
  maxDirectoryBytes: number;
  /** Blobs fetched at once. */
  jobs: number;
  /** Called with blob and directory bytes as they arrive (progress). */
  onBytes?: (bytes: number) => void;
}

export interface FetchedTree {
  /** The root, unnamed. */
  root: Node;
  /** Blobs the local store had, and their bytes: what the NAR would have sent again. */
  blobsPresent: number;
  bytesPresent: number;
  blobsFetched: number;
  bytesFetched: number;
}

export class TreeFetchError extends Error {}

/** Fetches the tree under `rootDigest` from `cache` into `local`, blobs the local store has excepted. */
export async function fetchTree(cache: BinaryCache, rootDigest: B3Digest, local: StoreServices, options: TreeFetchOptions): Promise<FetchedTree> {
  const directories = await fetchDirectories(cache, rootDigest, options);
  const blobs = new Map<string, { digest: B3Digest; size: number }>();
  for (const directory of directories.values()) {
    for (const file of directory.files) blobs.set(digestKey(file.digest), { digest: file.digest, size: Number(file.size) });
  }
  const fetched: FetchedTree = { root: undefined as unknown as Node, blobsPresent: 0, bytesPresent: 0, blobsFetched: 0, bytesFetched: 0 };
  const queue = [...blobs.values()];
  const worker = async () => {
    for (let blob = queue.shift(); blob; blob = queue.shift()) {
      if (await local.blobs.has(blob.digest)) {
        fetched.blobsPresent++;
        fetched.bytesPresent += blob.size;
        continue;
      }
      await fetchBlob(cache, blob.digest, blob.size, local, options);
      fetched.blobsFetched++;
      fetched.bytesFetched += blob.size;
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, options.jobs) }, worker));
  // Leaves to root, as a directory Put takes them.
  await local.directories.put(postOrder(directories, rootDigest));
  const root = directories.get(digestKey(rootDigest))!;
  fetched.root = { kind: 'directory', node: { name: Buffer.alloc(0), digest: rootDigest, size: directorySize(root) } };
  return fetched;
}

/** The closure of `rootDigest`, each record checked against the digest a record before it (or the caller) names. */
async function fetchDirectories(cache: BinaryCache, rootDigest: B3Digest, options: TreeFetchOptions): Promise<Map<string, Directory>> {
  const path = `directories/${rootDigest.toString('hex')}`;
  const expected = new Set([digestKey(rootDigest)]);
  const received = new Map<string, Directory>();
  let pending = Buffer.alloc(0);
  let total = 0;
  for await (const chunk of cache.castore(path)) {
    total += chunk.length;
    if (total > options.maxDirectoryBytes) throw new TreeFetchError(`${cache.url}/castore/${path}: more than ${options.maxDirectoryBytes} bytes of directories for this path`);
    options.onBytes?.(chunk.length);
    pending = pending.length ? Buffer.concat([pending, chunk]) : Buffer.from(chunk);
    while (pending.length >= 4) {
      const length = pending.readUInt32LE(0);
      if (pending.length < 4 + length) break;
      const encoded = pending.subarray(4, 4 + length);
      pending = pending.subarray(4 + length);
      const key = digestKey(blake3(encoded));
      if (!expected.has(key) || received.has(key)) throw new TreeFetchError(`${cache.url}/castore/${path}: sent directory ${key}, which nothing before it names`);
      let directory: Directory;
      try {
        directory = decodeDirectory(Buffer.from(encoded));
        validateDirectory(directory);
      } catch (err) {
        throw new TreeFetchError(`${cache.url}/castore/${path}: directory ${key}: ${(err as Error).message}`);
      }
      received.set(key, directory);
      for (const child of directory.directories) expected.add(digestKey(child.digest));
    }
  }
  if (pending.length) throw new TreeFetchError(`${cache.url}/castore/${path}: ends inside a directory record`);
  for (const key of expected) if (!received.has(key)) throw new TreeFetchError(`${cache.url}/castore/${path}: directory ${key} is named but was not sent`);
  return received;
}

async function fetchBlob(cache: BinaryCache, digest: B3Digest, size: number, local: StoreServices, options: TreeFetchOptions): Promise<void> {
  const path = `blob/${digest.toString('hex')}`;
  const writer = local.blobs.openWriter();
  let length = 0;
  try {
    for await (const chunk of cache.castore(path)) {
      length += chunk.length;
      if (length > size) throw new TreeFetchError(`${cache.url}/castore/${path}: longer than the ${size} bytes its directory says`);
      options.onBytes?.(chunk.length);
      await writer.write(Buffer.from(chunk));
    }
    if (length !== size) throw new TreeFetchError(`${cache.url}/castore/${path}: ${length} bytes, its directory says ${size}`);
  } catch (err) {
    await writer.abort();
    throw err;
  }
  const stored = await writer.close();
  if (!stored.equals(digest)) throw new TreeFetchError(`${cache.url}/castore/${path}: the bytes sent hash to ${formatDigest(stored)}`);
}

/** The directories below `rootDigest`, every one after all its children. */
function postOrder(directories: Map<string, Directory>, rootDigest: B3Digest): Directory[] {
  const ordered: Directory[] = [];
  const done = new Set<string>();
  const visit = (key: string) => {
    if (done.has(key)) return;
    done.add(key);
    const directory = directories.get(key)!;
    for (const child of directory.directories) visit(digestKey(child.digest));
    ordered.push(directory);
  };
  visit(digestKey(rootDigest));
  return ordered;
}

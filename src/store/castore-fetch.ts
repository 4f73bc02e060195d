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

/** A directory record larger than this is not one a store would send (a million entries is ~60 MB). */
const MAX_RECORD_BYTES = 64 * 1024 * 1024;

/** Fetches the tree under `rootDigest` from `cache` into `local`, blobs the local store has excepted. */
export async function fetchTree(cache: BinaryCache, rootDigest: B3Digest, local: StoreServices, options: TreeFetchOptions): Promise<FetchedTree> {
  const path = `directories/${rootDigest.toString('hex')}`;
  const directories = await readDirectoryClosure(cache.castore(path), rootDigest, options.maxDirectoryBytes, `${cache.url}/castore/${path}`, options.onBytes);
  const blobs = new Map<string, { digest: B3Digest; size: number }>();
  for (const directory of directories.values()) {
    for (const file of directory.files) blobs.set(digestKey(file.digest), { digest: file.digest, size: Number(file.size) });
  }
  const counts = { blobsPresent: 0, bytesPresent: 0, blobsFetched: 0, bytesFetched: 0 };
  const queue = [...blobs.values()];
  let next = 0;
  const worker = async () => {
    for (let blob = queue[next++]; blob; blob = queue[next++]) {
      if (await local.blobs.has(blob.digest)) {
        counts.blobsPresent++;
        counts.bytesPresent += blob.size;
        continue;
      }
      await fetchBlob(cache, blob.digest, blob.size, local, options);
      counts.blobsFetched++;
      counts.bytesFetched += blob.size;
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, options.jobs) }, worker));
  // Leaves to root, as a directory Put takes them.
  await local.directories.put(postOrder(directories, rootDigest));
  const root = directories.get(digestKey(rootDigest))!;
  return { root: { kind: 'directory', node: { name: Buffer.alloc(0), digest: rootDigest, size: directorySize(root) } }, ...counts };
}

/**
 * The closure of `rootDigest` from `body` (4-byte little-endian lengths, each followed by a
 * directory's canonical encoding, root first): each record checked against the digest a record
 * before it (or the caller) names, each decoded and validated, every named one present.
 * Throws TreeFetchError naming `source` for anything else.
 */
export async function readDirectoryClosure(
  body: AsyncIterable<Uint8Array>,
  rootDigest: B3Digest,
  maxBytes: number,
  source: string,
  onBytes?: (bytes: number) => void,
): Promise<Map<string, Directory>> {
  const expected = new Set([digestKey(rootDigest)]);
  const received = new Map<string, Directory>();
  let pending = Buffer.alloc(0); // unread bytes, joined
  let waiting: Buffer[] = []; // chunks of a record still arriving, joined once it is whole
  let waitingBytes = 0;
  let needed = 0;
  let total = 0;
  for await (const chunk of body) {
    total += chunk.length;
    if (total > maxBytes) throw new TreeFetchError(`${source}: more than ${maxBytes} bytes of directories for this path`);
    onBytes?.(chunk.length);
    if (needed > 0) {
      waiting.push(Buffer.from(chunk));
      waitingBytes += chunk.length;
      if (pending.length + waitingBytes < needed) continue;
      pending = Buffer.concat([pending, ...waiting]);
      waiting = [];
      waitingBytes = 0;
      needed = 0;
    } else {
      pending = pending.length ? Buffer.concat([pending, chunk]) : Buffer.from(chunk);
    }
    while (pending.length >= 4) {
      const length = pending.readUInt32LE(0);
      if (length > MAX_RECORD_BYTES) throw new TreeFetchError(`${source}: a directory record of ${length} bytes (at most ${MAX_RECORD_BYTES})`);
      if (pending.length < 4 + length) {
        needed = 4 + length;
        break;
      }
      const encoded = pending.subarray(4, 4 + length);
      pending = pending.subarray(4 + length);
      const key = digestKey(blake3(encoded));
      if (!expected.has(key) || received.has(key)) throw new TreeFetchError(`${source}: sent directory ${key}, which nothing before it names`);
      let directory: Directory;
      try {
        directory = decodeDirectory(Buffer.from(encoded));
        validateDirectory(directory);
      } catch (err) {
        throw new TreeFetchError(`${source}: directory ${key}: ${(err as Error).message}`);
      }
      received.set(key, directory);
      for (const child of directory.directories) expected.add(digestKey(child.digest));
    }
  }
  if (pending.length || waitingBytes) throw new TreeFetchError(`${source}: ends inside a directory record`);
  for (const key of expected) if (!received.has(key)) throw new TreeFetchError(`${source}: directory ${key} is named but was not sent`);
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

/** The directories below `rootDigest`, every one after all its children (iteratively: a chain may be deep). */
function postOrder(directories: Map<string, Directory>, rootDigest: B3Digest): Directory[] {
  const ordered: Directory[] = [];
  const seen = new Set<string>([digestKey(rootDigest)]);
  const stack: { directory: Directory; next: number }[] = [{ directory: directories.get(digestKey(rootDigest))!, next: 0 }];
  while (stack.length) {
    const top = stack[stack.length - 1]!;
    const child = top.directory.directories[top.next++];
    if (!child) {
      ordered.push(top.directory);
      stack.pop();
      continue;
    }
    const key = digestKey(child.digest);
    if (seen.has(key)) continue;
    seen.add(key);
    stack.push({ directory: directories.get(key)!, next: 0 });
  }
  return ordered;
}

// Renders a castore node as a NAR, streaming: file contents are read from the
// blob service chunk by chunk as the consumer pulls, never held whole.
import { createHash } from 'node:crypto';
import { type BlobService, DEFAULT_CHUNK_SIZE, streamBlobReader } from '../../castore/blobservice.js';
import { digestKey, formatDigest } from '../../castore/digest.js';
import { type DirectoryService, directoryDigest } from '../../castore/directoryservice.js';
import { DataLossError, NotFoundError } from '../../castore/errors.js';
import type { Directory, DirectoryNode, FileNode, Node } from '../../castore/model.js';
import { displayName, sortedEntries } from '../../castore/model.js';
import { NarEncoder, type SlabSource } from './encoder.js';

export interface CastoreServices {
  blobs: BlobService;
  directories: DirectoryService;
}

/** Every directory below `root`, fetched in one recursive request. */
async function fetchTree(services: CastoreServices, root: DirectoryNode): Promise<Map<string, Directory>> {
  const tree = new Map<string, Directory>();
  for await (const directory of services.directories.getRecursive(root.digest)) {
    tree.set(digestKey(directoryDigest(directory)), directory);
  }
  return tree;
}

/** A byte range of a NAR: `start` inclusive, `end` exclusive. */
export interface ByteRange {
  start: number;
  end: number;
}

/**
 * Delivers `[from, to)` of a file's contents to the consumer by another way
 * than the stream (a zero-copy send); resolves false to have them streamed.
 * Called only once everything yielded before has been consumed.
 */
export type ContentsDelivery = (node: FileNode, from: number, to: number) => Promise<boolean>;

/** Smaller files always stream: copying them costs less than a detour through another path. */
const DELIVERY_MIN = 64 * 1024;

export interface RenderOptions {
  /**
   * Only these bytes of the NAR: files wholly outside the range are not read
   * at all, and files it cuts are read from the first byte it needs.
   */
  range?: ByteRange;
  deliver?: ContentsDelivery;
  /** How much framing and small-file data is gathered into one chunk (64 KiB by default). */
  chunkSize?: number;
  /** Where the buffers chunks are gathered in come from (new ones by default). */
  slabs?: SlabSource;
}

/**
 * The NAR of `root` as a stream of chunks. Throws NotFoundError when a blob
 * or directory is missing.
 */
export async function* renderNar(root: Node, services: CastoreServices, options: RenderOptions = {}): AsyncGenerator<Buffer> {
  const { range, deliver } = options;
  const out: Buffer[] = [];
  let position = 0; // NAR offset of the next byte the encoder hands over
  const wanted = range ?? { start: 0, end: Number.MAX_SAFE_INTEGER };
  const done = () => position >= wanted.end;
  const encoder = new NarEncoder((chunk) => {
    const from = position;
    position += chunk.length;
    if (position <= wanted.start || from >= wanted.end) return;
    out.push(from >= wanted.start && position <= wanted.end ? chunk : chunk.subarray(Math.max(0, wanted.start - from), Math.min(chunk.length, wanted.end - from)));
  }, options.chunkSize, options.slabs);
  const tree = root.kind === 'directory' ? await fetchTree(services, root.node) : new Map<string, Directory>();
  const where: Buffer[] = []; // names from the root to the current node, formatted only for errors
  const here = () => (where.length ? where.map((name) => displayName(name).slice(1, -1)).join('/') : 'root');

  async function contents(node: FileNode, from: number, to: number): Promise<AsyncIterable<Buffer>> {
    const missing = () => new NotFoundError(`${here()}: blob ${formatDigest(node.digest)} is missing`);
    if (from === 0 && to === node.size) {
      const stream = await services.blobs.readStream(node.digest);
      if (!stream) throw missing();
      return stream;
    }
    const reader = await services.blobs.openReader(node.digest);
    if (!reader) throw missing();
    return streamBlobReader(reader, DEFAULT_CHUNK_SIZE, from, to);
  }

  const readInline = services.blobs.readInline?.bind(services.blobs);
  /** A whole file the blob service hands over at once: no stream, no promise. False when it cannot. */
  function inlineFile(node: FileNode): boolean {
    if (!readInline || node.size === 0) return false;
    return readInline(node.digest, (contents) => {
      if (contents.length !== node.size) {
        throw new Error(`${here()}: blob ${formatDigest(node.digest)} has ${contents.length} bytes, its node says ${node.size}`);
      }
      encoder.fileStart(node.executable, node.size);
      encoder.fileData(contents, true);
      encoder.fileEnd();
    });
  }

  const skip = (length: number) => {
    encoder.fileSkip(length);
    position += length;
  };

  async function* file(node: FileNode): AsyncGenerator<Buffer> {
    encoder.fileStart(node.executable, node.size);
    if (node.size > 0) {
      let from = 0;
      let to = node.size;
      if (range) {
        encoder.flush(); // so that `position` is where the contents start
        // The part of the contents the range needs; the rest is skipped unread.
        from = Math.min(node.size, Math.max(0, wanted.start - position));
        to = Math.max(from, Math.min(node.size, wanted.end - position));
        if (from > 0) skip(from);
      }
      let delivered = false;
      if (to > from && deliver && node.size >= DELIVERY_MIN) {
        encoder.flush();
        yield* out.splice(0); // the consumer has everything before the contents when deliver() is called
        delivered = await deliver(node, from, to);
      }
      if (delivered) {
        skip(to - from);
      } else if (to > from) {
        let seen = from;
        for await (const chunk of await contents(node, from, to)) {
          seen += chunk.length;
          if (seen > to) throw new Error(`${here()}: blob ${formatDigest(node.digest)} is longer than the ${node.size} bytes its node says`);
          encoder.fileData(chunk);
          if (out.length) yield* out.splice(0);
        }
        if (seen < to) throw new Error(`${here()}: blob ${formatDigest(node.digest)} has ${seen} bytes, its node says ${node.size}`);
      }
      if (node.size > to) skip(node.size - to);
    }
    encoder.fileEnd();
  }

  // Depth first with an explicit stack: nested async generators would pass
  // every chunk through each level of the tree, a promise per level.
  const stack: { entries: Node[]; next: number }[] = [];
  let node: Node | undefined = root;
  while (node) {
    if (node.kind === 'directory') {
      const listing = tree.get(digestKey(node.node.digest));
      if (!listing) throw new NotFoundError(`${here()}: directory ${formatDigest(node.node.digest)} is missing`);
      encoder.directoryStart();
      stack.push({ entries: sortedEntries(listing), next: 0 });
    } else {
      if (node.kind === 'file') {
        try {
          if (range || !inlineFile(node.node)) yield* file(node.node);
        } catch (err) {
          // The blob service names the damaged blob; the path names the file that holds it.
          throw err instanceof DataLossError ? new DataLossError(`${here()}: ${err.message}`, { cause: err }) : err;
        }
      }
      else encoder.symlink(node.node.target);
      if (out.length) yield* out.splice(0);
      if (stack.length) closeEntry();
    }
    node = undefined;
    // The next entry: a sibling, or one of an ancestor's once a directory is finished.
    while (stack.length && !done()) {
      const top = stack[stack.length - 1]!;
      if (top.next < top.entries.length) {
        node = top.entries[top.next++]!;
        encoder.entryStart(node.node.name);
        where.push(node.node.name);
        break;
      }
      stack.pop();
      encoder.directoryEnd();
      if (stack.length) closeEntry();
    }
  }
  encoder.flush();
  yield* out.splice(0);

  function closeEntry() {
    where.pop();
    encoder.entryEnd();
  }
}

export interface NarSummary {
  size: number;
  sha256: Buffer;
}

/** The NAR's size and SHA-256, without keeping it. */
export async function calculateNar(root: Node, services: CastoreServices): Promise<NarSummary> {
  const hash = createHash('sha256');
  let size = 0;
  for await (const chunk of renderNar(root, services)) {
    hash.update(chunk);
    size += chunk.length;
  }
  return { size, sha256: hash.digest() };
}

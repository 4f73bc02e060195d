// Building a castore tree from something walked in order (a filesystem, a
// NAR): blobs are written as they come, their digests arrive later, and the
// directories are computed and stored in one batch at the end, leaves to
// root, so a tree is either stored whole or not at all.
import type { BlobService, BlobWriter } from './blobservice.js';
import type { B3Digest } from './digest.js';
import { type DirectoryService, directoryDigest } from './directoryservice.js';
import { type Directory, type Node, directorySize, emptyDirectory } from './model.js';

export type PendingNode =
  | { kind: 'file'; name: Buffer; size: number; executable: boolean; digest: Promise<B3Digest> }
  | { kind: 'symlink'; name: Buffer; target: Buffer }
  | { kind: 'directory'; name: Buffer; entries: PendingNode[] };

/**
 * Lets blob writes finish in the background, a bounded number at a time, so
 * that many small files do not each wait for their own fsync and rename.
 */
export class BlobWriteWindow {
  private readonly pending = new Set<Promise<unknown>>();
  private failure: unknown;

  constructor(private readonly maxPending = 64) {}

  /**
   * Tracks `writer.close()`, waiting only while too many are pending.
   * Returns the digest to come, wrapped so that awaiting this does not await it.
   */
  async finish(writer: BlobWriter): Promise<{ digest: Promise<B3Digest> }> {
    const digest = writer.close();
    const tracked: Promise<void> = digest.then(
      () => {
        this.pending.delete(tracked);
      },
      (err) => {
        this.pending.delete(tracked);
        this.failure ??= err;
      },
    );
    this.pending.add(tracked);
    if (this.failure) throw this.failure;
    while (this.pending.size >= this.maxPending) await Promise.race(this.pending);
    return { digest };
  }

  /** Waits for every tracked write; throws the first failure. */
  async drain(): Promise<void> {
    await Promise.all(this.pending);
    if (this.failure) throw this.failure;
  }
}

/** Writes `chunks` as one blob; aborts the writer if the source fails. */
export async function writeBlob(
  blobs: BlobService,
  window: BlobWriteWindow,
  chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>,
): Promise<{ digest: Promise<B3Digest> }> {
  const writer = blobs.openWriter();
  try {
    for await (const chunk of chunks) await writer.write(chunk);
  } catch (err) {
    await writer.abort();
    throw err;
  }
  return window.finish(writer);
}

/**
 * Computes every directory below `root` (whose entries must be sorted by
 * name), stores them in one batch, and returns the root as a Node.
 */
export async function finishTree(root: PendingNode, directories: DirectoryService): Promise<Node> {
  const batch: Directory[] = [];

  async function resolve(pending: PendingNode): Promise<Node> {
    switch (pending.kind) {
      case 'file':
        return { kind: 'file', node: { name: pending.name, digest: await pending.digest, size: pending.size, executable: pending.executable } };
      case 'symlink':
        return { kind: 'symlink', node: { name: pending.name, target: pending.target } };
      case 'directory': {
        const directory = emptyDirectory();
        for (const entry of pending.entries) {
          const child = await resolve(entry);
          if (child.kind === 'directory') directory.directories.push(child.node);
          else if (child.kind === 'file') directory.files.push(child.node);
          else directory.symlinks.push(child.node);
        }
        batch.push(directory);
        return { kind: 'directory', node: { name: pending.name, digest: directoryDigest(directory), size: directorySize(directory) } };
      }
    }
  }

  const node = await resolve(root);
  if (batch.length > 0) await directories.put(batch);
  return node;
}

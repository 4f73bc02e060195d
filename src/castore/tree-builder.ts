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
 * that many small files do not each wait for their own commit or fsync: the
 * local store commits the small blobs that wait together in one LMDB
 * transaction, so a wider window means fewer, larger commits.
 */
export class BlobWriteWindow {
  /** Pending closes, with the memory each may still hold. */
  private readonly pending = new Map<Promise<unknown>, number>();
  private pendingBytes = 0;
  private failure: unknown;

  constructor(
    private readonly maxPending = 256,
    private readonly maxPendingBytes = 64 * 1024 * 1024,
  ) {}

  /**
   * Tracks `writer.close()` of a blob of `size` bytes, waiting only while too
   * many, or too many bytes, are pending. Returns the digest to come, wrapped
   * so that awaiting this does not await it.
   */
  async finish(writer: BlobWriter, size: number): Promise<{ digest: Promise<B3Digest> }> {
    const digest = writer.close();
    // A small blob is held whole until committed; a large one holds at most its write queue.
    await this.track(digest, Math.min(size, QUEUED_BYTES_PER_WRITER));
    return { digest };
  }

  /**
   * Tracks a blob being stored that holds `held` bytes until it is. Returns
   * a promise to wait for only while too many, or too many bytes, are
   * pending; throws the first failure so far.
   */
  track(digest: Promise<B3Digest>, held: number): Promise<void> | undefined {
    const tracked: Promise<void> = digest.then(
      () => this.settled(tracked),
      (err) => {
        this.settled(tracked);
        this.failure ??= err;
      },
    );
    this.pending.set(tracked, held);
    this.pendingBytes += held;
    if (this.failure) throw this.failure;
    return this.full() ? this.room() : undefined;
  }

  private full(): boolean {
    return this.pending.size >= this.maxPending || (this.pendingBytes > this.maxPendingBytes && this.pending.size > 1);
  }

  private async room(): Promise<void> {
    while (this.full()) await Promise.race(this.pending.keys());
  }

  private settled(tracked: Promise<void>): void {
    this.pendingBytes -= this.pending.get(tracked) ?? 0;
    this.pending.delete(tracked);
  }

  /** Waits for every tracked write; throws the first failure. */
  async drain(): Promise<void> {
    await Promise.all(this.pending.keys());
    if (this.failure) throw this.failure;
  }
}

/** What a blob writer may still hold once close() is called on a large blob (its slabs on their way to the disk). */
const QUEUED_BYTES_PER_WRITER = 8 * 1024 * 1024;

/** Writes `chunks` as one blob; aborts the writer if the source fails. */
export async function writeBlob(
  blobs: BlobService,
  window: BlobWriteWindow,
  chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>,
): Promise<{ digest: Promise<B3Digest> }> {
  const writer = blobs.openWriter();
  let size = 0;
  try {
    for await (const chunk of chunks) {
      size += chunk.length;
      await writer.write(chunk);
    }
  } catch (err) {
    await writer.abort();
    throw err;
  }
  return window.finish(writer, size);
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

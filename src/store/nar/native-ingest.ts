// A substituted NAR into the local store through the native ingest
// (store/nar/native/nar-ingest.c): the body's chunks go to libuv's pool in
// batches, where they are hashed, decoded, hashed again and parsed, and large
// files written to temp files; here each batch's events become the pending
// tree, small blobs are put and large ones moved to their addresses. The
// same outcome as ingest.ts (the reference, which also serves every other
// case): nothing is registered here, and on any error the tree is not stored.
import type { B3Digest } from '../../castore/digest.js';
import type { DirectoryService } from '../../castore/directoryservice.js';
import type { Node } from '../../castore/model.js';
import { BlobWriteWindow, type PendingNode, finishTree } from '../../castore/tree-builder.js';
import { lentSlabOf } from '../../castore/lent-slabs.js';
import type { BlobService } from '../../castore/blobservice.js';
import { type NarIngestAddon, type NarIngestSums, narIngestAddon } from '../../native/ingest.js';
import { DecompressionError } from './decompress.js';
import { NarFormatError } from './ingest.js';

/** Bytes of the body handed to the pool at once: a hand-off costs tens of µs, a batch of this ~1 ms of work. */
const BATCH_BYTES = 1024 * 1024;
const DIGEST_LENGTH = 32;

const enum Event {
  Directory = 1,
  EndDirectory = 2,
  SmallFile = 3,
  LargeFile = 4,
  Symlink = 5,
}

/** What the native ingest needs of the blob service: the local store's (castore/backends/local.ts). */
export interface FileAdoptingBlobService extends BlobService {
  tempFilePrefix(): string;
  adoptTempFile(tmpPath: string, digest: B3Digest): Promise<void>;
  putHashed(digest: B3Digest, data: Buffer): Promise<void>;
}

function adoptsFiles(blobs: BlobService): blobs is FileAdoptingBlobService {
  const candidate = blobs as Partial<FileAdoptingBlobService>;
  return typeof candidate.tempFilePrefix === 'function' && typeof candidate.adoptTempFile === 'function' && typeof candidate.putHashed === 'function';
}

/** The blob service, when the native ingest can write into it (the addon is built and it is the local store's). */
export function nativeIngestTarget(blobs: BlobService): FileAdoptingBlobService | undefined {
  return narIngestAddon() && adoptsFiles(blobs) ? blobs : undefined;
}

export interface NativeIngestOptions {
  compression: 'zstd' | 'none';
  /** Whether to hash the body as fed (a narinfo's FileHash). */
  hashFile: boolean;
  /** More decoded bytes than this fail with tooLarge(). */
  narSizeMax: number;
  tooLarge: () => Error;
  blobs: FileAdoptingBlobService;
  directories: DirectoryService;
  /** Bytes per batch (tests split the body at every byte with 1). */
  batchBytes?: number;
}

export interface NativeIngested extends NarIngestSums {
  root: Node;
}

/** Turns a batch's events into pending nodes, storing each blob as its file completes. */
class EventTree {
  root?: PendingNode;
  private readonly open: Extract<PendingNode, { kind: 'directory' }>[] = [];

  constructor(
    private readonly blobs: FileAdoptingBlobService,
    private readonly window: BlobWriteWindow,
    private readonly tempPrefix: string,
  ) {}

  private add(node: PendingNode): void {
    const parent = this.open[this.open.length - 1];
    if (parent) parent.entries.push(node);
    else this.root = node;
  }

  /** Applies the events; returns a wait for room in the write window, if it is full. */
  apply(events: Buffer): Promise<void> | undefined {
    let room: Promise<void> | undefined;
    for (let at = 0; at < events.length; ) {
      const type = events[at++];
      if (type === Event.EndDirectory) {
        const done = this.open.pop()!;
        this.add(done);
        continue;
      }
      const executable = type === Event.SmallFile || type === Event.LargeFile ? events[at++] === 1 : false;
      const nameLength = events.readUInt16LE(at);
      const name = Buffer.from(events.subarray(at + 2, at + 2 + nameLength));
      at += 2 + nameLength;
      switch (type) {
        case Event.Directory: {
          const directory = { kind: 'directory' as const, name, entries: [] };
          this.open.push(directory);
          break;
        }
        case Event.Symlink: {
          const targetLength = events.readUInt16LE(at);
          this.add({ kind: 'symlink', name, target: Buffer.from(events.subarray(at + 2, at + 2 + targetLength)) });
          at += 2 + targetLength;
          break;
        }
        case Event.SmallFile:
        case Event.LargeFile: {
          const size = Number(events.readBigUInt64LE(at));
          const digest = Buffer.from(events.subarray(at + 8, at + 8 + DIGEST_LENGTH));
          at += 8 + DIGEST_LENGTH;
          let stored: Promise<void>;
          if (type === Event.SmallFile) {
            stored = this.blobs.putHashed(digest, events.subarray(at, at + size));
            at += size;
          } else {
            stored = this.blobs.adoptTempFile(`${this.tempPrefix}${events.readUInt32LE(at)}`, digest);
            at += 4;
          }
          const stores = stored.then(() => digest);
          room = this.window.track(stores, type === Event.SmallFile ? size : 0) ?? room;
          this.add({ kind: 'file', name, size, executable, digest: stores });
          break;
        }
        default:
          throw new Error(`nixcas ingest: unknown event ${type} at ${at - 1} of ${events.length}`);
      }
    }
    return room;
  }
}

/** The native error as the TypeScript reader would throw it. */
function translated(err: unknown, options: NativeIngestOptions): unknown {
  const { code, message } = err as { code?: string; message: string };
  switch (code) {
    case 'NAR_FORMAT':
      return new NarFormatError(message);
    case 'NAR_SIZE':
      return options.tooLarge();
    case 'ZSTD':
      return new DecompressionError(`the body is not valid zstd: ${message}`);
    default:
      return err;
  }
}

export async function ingestNarNatively(body: AsyncIterable<Uint8Array>, options: NativeIngestOptions): Promise<NativeIngested> {
  const addon = narIngestAddon() as NarIngestAddon;
  const tempPrefix = options.blobs.tempFilePrefix();
  const handle = addon.create(options.compression === 'zstd', options.hashFile, options.narSizeMax, tempPrefix);
  const window = new BlobWriteWindow();
  const tree = new EventTree(options.blobs, window, tempPrefix);
  const batchBytes = options.batchBytes ?? BATCH_BYTES;
  let fed: Promise<Buffer> | undefined;
  /** The holds on lent slabs (a producer's memory: http-body.ts) of the batch on the pool, and of the one being gathered. */
  let fedHolds: (() => void)[] = [];
  let holds: (() => void)[] = [];
  const feed = (batch: Buffer[]) => {
    fed = addon.feed(handle, batch);
    fedHolds = holds;
    holds = [];
  };
  /** Waits for the batch on the pool, lets its slabs go, and applies its events. */
  const settle = async (): Promise<void> => {
    if (!fed) return;
    try {
      const events = await fed;
      fed = undefined;
      await tree.apply(events);
    } finally {
      for (const release of fedHolds.splice(0)) release();
    }
  };
  try {
    let batch: Buffer[] = [];
    let batched = 0;
    for await (const chunk of body) {
      if (chunk.length === 0) continue;
      batch.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length));
      const slab = lentSlabOf(chunk);
      if (slab) holds.push(slab.hold());
      batched += chunk.length;
      if (batched < batchBytes) continue;
      await settle();
      feed(batch);
      batch = [];
      batched = 0;
    }
    await settle();
    if (batch.length) {
      feed(batch);
      await settle();
    }
    const sums = addon.finish(handle);
    await window.drain();
    const root = await finishTree(tree.root!, options.directories);
    return { root, ...sums };
  } catch (err) {
    await fed?.catch(() => {}); // the pool must be done with the handle (and the slabs) before they are released
    await window.drain().catch(() => {});
    throw translated(err, options);
  } finally {
    for (const release of [...fedHolds, ...holds]) release();
    addon.release(handle);
  }
}

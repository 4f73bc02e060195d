// BlobService: content-addressed byte strings, identified by their BLAKE3.
import { type B3Digest, createBlake3, formatDigest } from './digest.js';
import { DataLossError } from './errors.js';

/**
 * Where bytes are to go without being gathered first: `count` pieces, piece i
 * being `spans[3i + 2]` bytes of `buffers[spans[3i]]` from `spans[3i + 1]`,
 * filled in turn (a reply's pages in guest memory). Plain numbers in one
 * typed array, so that making one allocates nothing per piece.
 */
export interface ScatterList {
  buffers: Uint8Array[];
  spans: Uint32Array;
  count: number;
}

/** Random access to one blob without ever holding it whole in memory. */
export interface BlobReader {
  readonly size: number;
  /**
   * Reads up to `length` bytes of the blob at `position` into
   * `target[offset..]`. Returns the number of bytes read: 0 at the end.
   */
  read(target: Uint8Array, offset: number, length: number, position: number): Promise<number>;
  /**
   * Optional: reads `length` bytes at `position` (fewer only at the end of
   * the blob) into `targets`, filled in turn, if that can be done without
   * waiting (bytes in memory or in the page cache). Returns the bytes read,
   * or undefined, having promised nothing about `targets`, when it would
   * have to wait: then use `read`.
   */
  tryReadv?(targets: ScatterList, length: number, position: number): number | undefined;
  /**
   * Optional: the open file that holds the whole blob, for readers that read one (checked as
   * every read is); whoever reads it directly reads only what `read` would, and never closes it.
   */
  readonly fd?: number;
  close(): Promise<void>;
}

/** Hashes while it writes; the blob becomes visible only when close() resolves. */
export interface BlobWriter {
  /**
   * Appends `chunk`. The writer may hold on to the chunk until close()
   * resolves, as a Node Writable does: do not modify it after passing it.
   * A chunk in a lent slab (lent-slabs.ts) is the exception: the writer keeps
   * one past this call's promise only by holding its slab, or as a copy.
   */
  write(chunk: Uint8Array): Promise<void>;
  /** Makes the blob visible under its digest and returns the digest. */
  close(): Promise<B3Digest>;
  /** Discards what was written. Safe to call after a failure or twice. */
  abort(): Promise<void>;
}

export interface BlobStat {
  size: number;
}

/** A blob kept whole in a local file: an open descriptor, for sending it without copying (sendfile). */
export interface BlobFile {
  fd: number;
  size: number;
  close(): Promise<void>;
}

export interface BlobService {
  has(digest: B3Digest): Promise<boolean>;
  stat(digest: B3Digest): Promise<BlobStat | undefined>;
  openReader(digest: B3Digest): Promise<BlobReader | undefined>;
  /** The blob as a stream of chunks of at most `chunkSize` bytes. */
  readStream(digest: B3Digest, chunkSize?: number): Promise<AsyncIterable<Buffer> | undefined>;
  openWriter(): BlobWriter;
  /**
   * Optional: stores a blob given whole (a small file's), without what a
   * writer costs per blob. Resolves to its digest once stored, as a writer's
   * close() does. `data` is given away: the caller does not modify it.
   */
  put?(data: Buffer): Promise<B3Digest>;
  /**
   * Only for blobs the backend can read without waiting (the local store's
   * small blobs, mapped from LMDB): calls `use` at once with the contents, a
   * view valid only during the call, and returns true. Returns false without
   * calling it for any other blob.
   */
  readInline?(digest: B3Digest, use: (contents: Buffer) => void): boolean;
  /** Only where blobs are local files, and only for blobs kept as one: undefined otherwise. */
  openFile?(digest: B3Digest): Promise<BlobFile | undefined>;
  close(): Promise<void>;
}

export const DEFAULT_CHUNK_SIZE = 1024 * 1024;

/**
 * A chunked stream over any BlobReader; closes the reader when done or
 * abandoned. The next chunk is read while the consumer handles the current
 * one, so disk reads overlap with whatever the consumer does (writing to a
 * pipe or socket). `start` and `end` select a byte range of the blob.
 */
export async function* streamBlobReader(
  reader: BlobReader, chunkSize = DEFAULT_CHUNK_SIZE, start = 0, end = reader.size,
): AsyncGenerator<Buffer> {
  const readChunk = async (position: number): Promise<Buffer> => {
    const chunk = Buffer.allocUnsafe(Math.min(chunkSize, end - position));
    let filled = 0;
    while (filled < chunk.length) {
      const n = await reader.read(chunk, filled, chunk.length - filled, position + filled);
      if (n === 0) throw new Error(`blob ended after ${position + filled} of ${reader.size} bytes`);
      filled += n;
    }
    return chunk;
  };
  let next: Promise<Buffer> | undefined;
  try {
    let position = start;
    next = position < end ? readChunk(position) : undefined;
    while (next) {
      const chunk = await next;
      position += chunk.length;
      next = position < end ? readChunk(position) : undefined;
      next?.catch(() => {}); // awaited on the next turn, or abandoned with the stream
      yield chunk;
    }
  } finally {
    await next?.catch(() => {});
    await reader.close();
  }
}

/** A reader over a blob held in memory. */
export function bufferReader(blob: Buffer): BlobReader {
  return {
    size: blob.length,
    read: async (target, offset, length, position) => {
      if (position >= blob.length) return 0;
      return blob.copy(target, offset, position, Math.min(blob.length, position + length));
    },
    tryReadv: (targets, length, position) => copyToScatter(blob, position, Math.min(length, blob.length - position), targets),
    close: async () => {},
  };
}

/** Copies `length` bytes of `source` from `position` into `targets` in turn; returns the bytes copied (0 past the end). */
export function copyToScatter(source: Uint8Array, position: number, length: number, targets: ScatterList): number {
  let copied = 0;
  const { buffers, spans } = targets;
  for (let i = 0; i < targets.count && copied < length; i++) {
    const take = Math.min(spans[3 * i + 2], length - copied);
    buffers[spans[3 * i]].set(source.subarray(position + copied, position + copied + take), spans[3 * i + 1]);
    copied += take;
  }
  return Math.max(0, copied);
}

/**
 * Writes a whole buffer as one blob (a small file, tests, small metadata),
 * with the service's put where it has one. `data` must not change until this
 * resolves.
 */
export async function putBlob(service: BlobService, data: Uint8Array): Promise<B3Digest> {
  if (service.put) return service.put(Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  return writeWhole(service, data);
}

/** `data` as one blob through a writer of `service` (aborted if it fails). */
export async function writeWhole(service: BlobService, data: Uint8Array): Promise<B3Digest> {
  const writer = service.openWriter();
  try {
    await writer.write(data);
    return await writer.close();
  } catch (err) {
    await writer.abort();
    throw err;
  }
}

/** Reads a whole blob into memory (tests, small metadata); undefined when absent. */
export async function getBlob(service: BlobService, digest: B3Digest): Promise<Buffer | undefined> {
  const stream = await service.readStream(digest);
  if (!stream) return undefined;
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk);
  return Buffer.concat(chunks);
}

/**
 * Passes a blob's chunks on while hashing them, holding each back until the
 * next arrives and the last until the whole matched `digest`: whoever reads
 * the stream to its end got exactly the blob, and one that does not match
 * never arrives complete (a DataLossError instead of its last chunk).
 */
export async function* verifiedStream(chunks: AsyncIterable<Buffer>, digest: B3Digest, source: string): AsyncGenerator<Buffer> {
  const hasher = createBlake3();
  let held: Buffer | undefined;
  for await (const chunk of chunks) {
    hasher.update(chunk);
    if (held) yield held;
    held = chunk;
  }
  const found = hasher.digest();
  if (!found.equals(digest)) {
    throw new DataLossError(`${source} sent blob ${formatDigest(digest)} with contents that hash to ${formatDigest(found)}; its end was held back`);
  }
  if (held) yield held;
}

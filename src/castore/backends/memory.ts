// In-memory services: for tests and short-lived daemons (`memory://`).
import { type BlobReader, type BlobService, type BlobWriter, bufferReader, streamBlobReader } from '../blobservice.js';
import { type B3Digest, createBlake3, digestKey } from '../digest.js';
import { type DirectoryService, checkBatch, walkDirectories } from '../directoryservice.js';
import type { Directory } from '../model.js';
import { decodeDirectory } from '../wire.js';

export class MemoryBlobService implements BlobService {
  private readonly blobs = new Map<string, Buffer>();

  async has(digest: B3Digest) {
    return this.blobs.has(digestKey(digest));
  }

  async stat(digest: B3Digest) {
    const blob = this.blobs.get(digestKey(digest));
    return blob ? { size: blob.length } : undefined;
  }

  async openReader(digest: B3Digest): Promise<BlobReader | undefined> {
    const blob = this.blobs.get(digestKey(digest));
    return blob && bufferReader(blob);
  }

  async readStream(digest: B3Digest, chunkSize?: number) {
    const reader = await this.openReader(digest);
    return reader && streamBlobReader(reader, chunkSize);
  }

  openWriter(): BlobWriter {
    const hasher = createBlake3();
    let chunks: Buffer[] | undefined = [];
    return {
      write: async (chunk) => {
        if (!chunks) throw new Error('blob writer already closed');
        hasher.update(chunk);
        chunks.push(Buffer.from(chunk));
      },
      close: async () => {
        if (!chunks) throw new Error('blob writer already closed');
        const digest = hasher.digest();
        this.blobs.set(digestKey(digest), Buffer.concat(chunks));
        chunks = undefined;
        return digest;
      },
      abort: async () => {
        chunks = undefined;
      },
    };
  }

  async close() {}
}

export class MemoryDirectoryService implements DirectoryService {
  // Canonical encodings, so callers can never mutate what is stored.
  private readonly directories = new Map<string, Buffer>();

  async get(digest: B3Digest): Promise<Directory | undefined> {
    const encoded = this.directories.get(digestKey(digest));
    return encoded && decodeDirectory(encoded);
  }

  getRecursive(digest: B3Digest) {
    return walkDirectories((d) => this.get(d), digest);
  }

  async put(batch: Iterable<Directory>): Promise<B3Digest> {
    const { root, ordered } = await checkBatch(batch, (d) => this.get(d));
    for (const { digest, encoded } of ordered) this.directories.set(digestKey(digest), encoded);
    return root.digest;
  }

  async close() {}
}

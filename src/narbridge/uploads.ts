// Uploads: a NAR arrives first (PUT /nar/<file hash>.nar[.xz|.zst]) and is
// stored in castore while it streams in; its narinfo follows (PUT
// /<hash>.narinfo) and only then is a PathInfo registered. In between, the
// received NAR waits here, in memory, keyed by its NAR hash.
import { createHash } from 'node:crypto';
import type { Node } from '../castore/model.js';
import * as nixbase32 from '../store/nixbase32.js';
import { type CastoreServices } from '../store/nar/render.js';
import { ingestNar } from '../store/nar/ingest.js';
import { ReferenceScanner } from '../store/reference-scan.js';
import { decompress } from '../store/nar/decompress.js';
import { BadRequestError, type Compression } from './routes.js';

export interface ReceivedNar {
  /** The root node, with an empty name. */
  root: Node;
  narSize: number;
  narSha256: Buffer;
  /** Where the hash parts of this NAR's possible references were recorded. */
  references: ReferenceScanner;
}

/** A run of nixbase32 text kept per NAR to check references against; beyond it the check is skipped. */
const SCAN_LIMIT = 256 * 1024;

/** The NAR's bytes as they arrive (decompressed), scanned for references and counted against `maxNarSize`. */
async function* scanned(chunks: AsyncIterable<Uint8Array>, scanner: ReferenceScanner, maxNarSize: number): AsyncGenerator<Uint8Array> {
  let size = 0;
  for await (const chunk of chunks) {
    size += chunk.length;
    if (size > maxNarSize) throw new BadRequestError(`the NAR is larger than this bridge takes (--max-nar-size ${maxNarSize} bytes)`, 413);
    scanner.update(chunk);
    yield chunk;
  }
  scanner.finish();
}

/**
 * Stores the NAR in `body` and checks that the SHA-256 of the bytes as
 * uploaded is `fileSha256`. Throws (and registers nothing) on a malformed
 * or truncated NAR, bad compression, a hash mismatch or a broken connection.
 */
export async function receiveNar(
  body: AsyncIterable<Uint8Array> & NodeJS.ReadableStream,
  compression: Compression,
  fileSha256: Buffer,
  services: CastoreServices,
  maxNarSize: number,
): Promise<ReceivedNar> {
  const scanner = new ReferenceScanner(SCAN_LIMIT);
  const fileHash = compression === 'none' ? undefined : createHash('sha256');
  const nar = compression === 'none' ? body : decompress(body, compression, (chunk) => fileHash!.update(chunk));
  const ingested = await ingestNar(scanned(nar, scanner, maxNarSize), services);
  const uploaded = fileHash ? fileHash.digest() : ingested.narSha256;
  if (!uploaded.equals(fileSha256)) {
    throw new BadRequestError(`the uploaded file's SHA-256 is ${nixbase32.encode(uploaded)}, but its URL names ${nixbase32.encode(fileSha256)}`);
  }
  return { root: ingested.root, narSize: ingested.narSize, narSha256: ingested.narSha256, references: scanner };
}

/**
 * NARs received and not yet claimed by a narinfo, by NAR hash and by the
 * URL they were uploaded to. Bounded: the oldest are forgotten first, and
 * none is kept longer than `maxAgeMs`.
 */
export class ReceivedNars {
  private readonly byNarHash = new Map<string, ReceivedNar & { receivedAt: number }>();
  private readonly byFile = new Map<string, string>();

  constructor(private readonly maxEntries = 1024, private readonly maxAgeMs = 60 * 60 * 1000) {}

  private static fileKey(compression: Compression, fileSha256: Buffer): string {
    return `${compression}:${fileSha256.toString('hex')}`;
  }

  add(compression: Compression, fileSha256: Buffer, nar: ReceivedNar): void {
    const key = nar.narSha256.toString('hex');
    this.byNarHash.delete(key); // re-inserted as the newest
    this.byNarHash.set(key, { ...nar, receivedAt: Date.now() });
    this.byFile.set(ReceivedNars.fileKey(compression, fileSha256), key);
    this.expire();
  }

  private expire(): void {
    const oldest = Date.now() - this.maxAgeMs;
    for (const [key, nar] of this.byNarHash) {
      if (this.byNarHash.size <= this.maxEntries && nar.receivedAt >= oldest) break;
      this.byNarHash.delete(key);
    }
    for (const [file, key] of this.byFile) if (!this.byNarHash.has(key)) this.byFile.delete(file);
  }

  byHash(narSha256: Buffer): ReceivedNar | undefined {
    this.expire();
    return this.byNarHash.get(narSha256.toString('hex'));
  }

  byUpload(compression: Compression, fileSha256: Buffer): ReceivedNar | undefined {
    this.expire();
    const key = this.byFile.get(ReceivedNars.fileKey(compression, fileSha256));
    return key === undefined ? undefined : this.byNarHash.get(key);
  }
}

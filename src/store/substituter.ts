// Substitution: a store path the store lacks is fetched from binary caches
// the user trusts, verified, and kept. A narinfo is taken only with a valid
// signature by a trusted key (unless signatures are explicitly not required)
// and only for the path asked for; its NAR is checked against FileHash,
// FileSize, NarHash and NarSize while it is ingested, and cut off once it is
// longer than it should be. A path is registered only after every path it
// refers to is, as `nixcas copy` does, so a reader never sees a path whose
// closure is incomplete. Lookups of the same missing path at once share one
// fetch; a path no cache has is remembered as missing for a short time.
import { createHash } from 'node:crypto';
import { type Node, withName } from '../castore/model.js';
import { fetchTree } from './castore-fetch.js';
import { calculateNar } from './nar/render.js';
import type { BinaryCache } from './binary-cache.js';
import type { StoreServices } from './import.js';
import { type NarCompression, decompress, isNarCompression } from './nar/decompress.js';
import { ingestNar } from './nar/ingest.js';
import { ingestNarNatively, nativeIngestTarget } from './nar/native-ingest.js';
import { type NarInfo, formatNarHash, narInfoFingerprint } from './narinfo.js';
import * as nixbase32 from './nixbase32.js';
import type { PathInfo } from './pathinfo.js';
import type { PathInfoService } from './pathinfoservice.js';
import { type PublicKey, parsePublicKey, verifyFingerprint } from './signing.js';
import { type StorePath, formatBasename, formatStorePath } from './storepath.js';

export interface SubstituterOptions {
  caches: BinaryCache[];
  /** Public keys in Nix's form, `<name>:<base64>`. */
  trustedKeys: string[];
  /** As Nix's require-sigs: a narinfo without a valid signature by a trusted key is refused. */
  requireSigs: boolean;
  /** How long a path no cache has is remembered as missing, in ms. */
  negativeTtlMs: number;
  /** NARs downloaded at once. */
  jobs: number;
  /** One line per refusal or failure, naming the upstream and the path. */
  log: (line: string) => void;
  /** Called once per path registered from a cache. */
  onSubstituted?: (path: string, info: PathInfo, from: string) => void;
  /** Called with NAR bytes as they arrive (progress). */
  onBytes?: (bytes: number) => void;
}

export class SubstitutionError extends Error {}

/** A counting semaphore. */
class Slots {
  private waiting: (() => void)[] = [];
  constructor(private free: number) {}
  async acquire(): Promise<void> {
    if (this.free > 0) {
      this.free--;
      return;
    }
    await new Promise<void>((resolve) => this.waiting.push(resolve));
  }
  release(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.free++;
  }
}

/**
 * Paths fetched, refused (signature, wrong path) and failed (upstream, bad NAR) by every
 * substituter, and the blob bytes another nixcas did not have to send, for metrics.
 */
export const substitutionCounts = { fetched: 0, refused: 0, failed: 0, objectBytesSkipped: 0 };

export class Substituter {
  private readonly inFlight = new Map<string, Promise<PathInfo | undefined>>();
  private readonly missingUntil = new Map<string, number>();
  private readonly downloads: Slots;
  private readonly keys: PublicKey[];

  constructor(
    /** The local services: what is fetched is stored and registered here. */
    private readonly local: StoreServices,
    readonly options: SubstituterOptions,
  ) {
    this.downloads = new Slots(options.jobs);
    this.keys = options.trustedKeys.map(parsePublicKey);
    if (options.requireSigs && options.trustedKeys.length === 0 && options.caches.length > 0) {
      throw new SubstitutionError('substituters need at least one --trusted-public-key (or --no-require-sigs to take unsigned paths)');
    }
  }

  /** The PathInfo of `digest`: the local one, or one fetched from a cache now; undefined when no cache has it. */
  get(digest: Buffer): Promise<PathInfo | undefined> {
    return this.fetchOnce(digest, new Set());
  }

  private async fetchOnce(digest: Buffer, trail: Set<string>): Promise<PathInfo | undefined> {
    const local = await this.local.pathInfos.get(digest);
    if (local) return local;
    const key = digest.toString('hex');
    const until = this.missingUntil.get(key);
    if (until !== undefined) {
      if (Date.now() < until) return undefined;
      this.missingUntil.delete(key);
    }
    let pending = this.inFlight.get(key);
    if (!pending) {
      pending = this.fetchFromCaches(digest, trail).finally(() => this.inFlight.delete(key));
      this.inFlight.set(key, pending);
    }
    return pending;
  }

  private async fetchFromCaches(digest: Buffer, trail: Set<string>): Promise<PathInfo | undefined> {
    const hashPart = nixbase32.encode(digest);
    let failure: Error | undefined;
    for (const cache of this.options.caches) {
      let narInfo: NarInfo | undefined;
      try {
        narInfo = await cache.narInfo(hashPart);
      } catch (err) {
        this.options.log(`substituter ${cache.url}: ${hashPart}: ${(err as Error).message}`);
        failure = err as Error;
        continue;
      }
      if (!narInfo) continue;
      const path = formatStorePath(narInfo.storePath);
      const refusal = this.refusal(narInfo, digest);
      if (refusal) {
        substitutionCounts.refused++;
        this.options.log(`substituter ${cache.url}: ${path}: refused: ${refusal}`);
        failure = new SubstitutionError(refusal);
        continue;
      }
      try {
        const info = await this.substitute(cache, narInfo, trail);
        substitutionCounts.fetched++;
        return info;
      } catch (err) {
        substitutionCounts.failed++;
        this.options.log(`substituter ${cache.url}: ${path}: ${(err as Error).message}`);
        failure = err as Error;
      }
    }
    // A path that failed is not remembered as missing: the next lookup tries again.
    if (!failure) this.missingUntil.set(digest.toString('hex'), Date.now() + this.options.negativeTtlMs);
    this.forgetExpired();
    return undefined;
  }

  /** Why this narinfo is not taken, or undefined when it is. */
  private refusal(narInfo: NarInfo, digest: Buffer): string | undefined {
    if (!narInfo.storePath.digest.equals(digest)) return `the narinfo for ${nixbase32.encode(digest)} is for ${formatStorePath(narInfo.storePath)}`;
    if (!isNarCompression(narInfo.compression)) return `Compression ${JSON.stringify(narInfo.compression)} is not one this store reads`;
    if (!this.options.requireSigs) return undefined;
    const fingerprint = narInfoFingerprint(narInfo.storePath, narInfo.narSha256, narInfo.narSize, narInfo.references);
    const trusted = narInfo.signatures.some((signature) =>
      this.keys.some((key) => verifyFingerprint(key, fingerprint, signature)),
    );
    if (trusted) return undefined;
    if (narInfo.signatures.length === 0) return 'it is not signed, and signatures are required';
    return `no valid signature by a trusted key (signed by ${narInfo.signatures.map((s) => s.name).join(', ')})`;
  }

  private async substitute(cache: BinaryCache, narInfo: NarInfo, trail: Set<string>): Promise<PathInfo> {
    const path = formatStorePath(narInfo.storePath);
    const below = new Set(trail).add(path);
    const references = narInfo.references.filter((ref) => !ref.digest.equals(narInfo.storePath.digest));
    // The references are fetched while this NAR downloads; only registration waits for them.
    const referencesReady = Promise.all(references.map((ref) => this.reference(ref, below)));
    referencesReady.catch(() => undefined); // awaited below; not unhandled meanwhile
    await this.downloads.acquire();
    let root;
    try {
      root = await this.download(cache, narInfo);
    } catch (err) {
      // What the references fetched is kept: they are registered even when this path is not.
      await referencesReady.catch(() => undefined);
      throw err;
    } finally {
      this.downloads.release();
    }
    await referencesReady;
    const info = await this.local.pathInfos.put({
      node: withName(root, Buffer.from(formatBasename(narInfo.storePath))),
      references: narInfo.references,
      narSize: narInfo.narSize,
      narSha256: narInfo.narSha256,
      signatures: narInfo.signatures,
      deriver: narInfo.deriver,
      ca: narInfo.ca,
    });
    this.options.onSubstituted?.(path, info, cache.url);
    return info;
  }

  private async reference(ref: StorePath, trail: Set<string>): Promise<void> {
    const path = formatStorePath(ref);
    if (trail.has(path)) throw new SubstitutionError(`its references loop back to ${path}`);
    const info = await this.fetchOnce(ref.digest, trail);
    if (!info) throw new SubstitutionError(`its reference ${path} is neither in the store nor in any substituter`);
  }

  /** Fetches, checks and stores the path's tree; returns its root (unnamed). */
  private async download(cache: BinaryCache, narInfo: NarInfo): Promise<Node> {
    if (narInfo.castoreDirectory && cache.servesCastore) {
      try {
        return await this.downloadObjects(cache, narInfo, narInfo.castoreDirectory);
      } catch (err) {
        this.options.log(`substituter ${cache.url}: ${formatStorePath(narInfo.storePath)}: fetching its objects failed (${(err as Error).message}); fetching the NAR instead`);
      }
    }
    return this.downloadNar(cache, narInfo);
  }

  /**
   * From another nixcas: only the blobs the store lacks (castore-fetch.ts), then the tree's NAR
   * is rendered here and must be the one the signed narinfo names.
   */
  private async downloadObjects(cache: BinaryCache, narInfo: NarInfo, rootDigest: Buffer): Promise<Node> {
    const tree = await fetchTree(cache, rootDigest, this.local, {
      maxDirectoryBytes: narInfo.narSize + 65536,
      jobs: 4,
      onBytes: this.options.onBytes,
    });
    const nar = await calculateNar(tree.root, this.local);
    if (nar.size !== narInfo.narSize || !nar.sha256.equals(narInfo.narSha256)) {
      throw new SubstitutionError(`its objects make a NAR of ${nar.size} bytes hashing to ${formatNarHash(nar.sha256)}, its narinfo says ${narInfo.narSize} bytes, ${formatNarHash(narInfo.narSha256)}`);
    }
    substitutionCounts.objectBytesSkipped += tree.bytesPresent;
    return tree.root;
  }

  /** Fetches, checks and stores the NAR; returns its root (unnamed). */
  private async downloadNar(cache: BinaryCache, narInfo: NarInfo): Promise<Node> {
    const { url, body } = cache.nar(narInfo.url);
    const compression = narInfo.compression as NarCompression;
    const checksFile = narInfo.fileSha256 !== undefined && compression !== 'none';
    const file = limited(body, compression === 'none' ? narInfo.narSize : narInfo.fileSize, `${url} is longer than its narinfo's ${compression === 'none' ? 'NarSize' : 'FileSize'}`);
    let fileBytes = 0;
    // Into the local store the native ingest parses the NAR, and decodes zstd itself; other
    // compressions are decoded as before and the decoded bytes handed to it.
    const native = nativeIngestTarget(this.local.blobs);
    const nativeDecodes = native !== undefined && (compression === 'zstd' || compression === 'none');
    const fileHash = checksFile && !nativeDecodes ? createHash('sha256') : undefined;
    const counted = tap(file, (chunk) => {
      fileBytes += chunk.length;
      fileHash?.update(chunk);
      this.options.onBytes?.(chunk.length);
    });
    const tooLarge = `${url} decompresses to more than its narinfo's NarSize`;
    let ingested: { root: Node; narSize: number; narSha256: Buffer; fileSha256?: Buffer };
    if (native) {
      const input = nativeDecodes ? counted : decompress(counted, compression as Exclude<NarCompression, 'none'>, () => undefined);
      ingested = await ingestNarNatively(input, {
        compression: compression === 'zstd' ? 'zstd' : 'none',
        hashFile: checksFile && nativeDecodes,
        narSizeMax: narInfo.narSize,
        tooLarge: () => new SubstitutionError(tooLarge),
        blobs: native,
        directories: this.local.directories,
      });
      if (!nativeDecodes) ingested.fileSha256 = fileHash?.digest();
    } else {
      const nar = compression === 'none' ? counted : decompress(counted, compression, () => undefined);
      ingested = await ingestNar(limited(nar, narInfo.narSize, tooLarge), this.local);
      ingested.fileSha256 = fileHash?.digest();
    }
    if (narInfo.fileSize !== undefined && compression !== 'none' && fileBytes !== narInfo.fileSize) {
      throw new SubstitutionError(`${url} is ${fileBytes} bytes, its narinfo's FileSize says ${narInfo.fileSize}`);
    }
    if (checksFile && !ingested.fileSha256!.equals(narInfo.fileSha256!)) {
      throw new SubstitutionError(`${url} does not hash to its narinfo's FileHash`);
    }
    if (ingested.narSize !== narInfo.narSize) {
      throw new SubstitutionError(`the NAR is ${ingested.narSize} bytes, its narinfo's NarSize says ${narInfo.narSize}`);
    }
    if (!ingested.narSha256.equals(narInfo.narSha256)) {
      throw new SubstitutionError(`the NAR hashes to ${formatNarHash(ingested.narSha256)}, its narinfo's NarHash says ${formatNarHash(narInfo.narSha256)}`);
    }
    return ingested.root;
  }

  private forgetExpired(): void {
    if (this.missingUntil.size < 10_000) return;
    const now = Date.now();
    for (const [key, until] of this.missingUntil) if (until <= now) this.missingUntil.delete(key);
  }
}

/** The chunks of `body`, failing once they add up to more than `max` bytes (no limit when undefined). */
async function* limited(body: AsyncIterable<Uint8Array>, max: number | undefined, message: string): AsyncGenerator<Uint8Array> {
  let total = 0;
  for await (const chunk of body) {
    total += chunk.length;
    if (max !== undefined && total > max) throw new SubstitutionError(message);
    yield chunk;
  }
}

async function* tap(body: AsyncIterable<Uint8Array>, see: (chunk: Uint8Array) => void): AsyncGenerator<Uint8Array> {
  for await (const chunk of body) {
    see(chunk);
    yield chunk;
  }
}

/**
 * A PathInfoService whose get() substitutes what the local one lacks: every
 * reader of the store (the filesystem, gRPC, nar-bridge) sees a path the
 * moment a trusted cache has it.
 */
export function substitutingPathInfos(local: PathInfoService, substituter: Substituter): PathInfoService {
  return {
    get: (digest) => substituter.get(digest),
    put: (info) => local.put(info),
    holdForPut: () => local.holdForPut?.(),
    list: () => local.list(),
    close: () => local.close(),
  };
}

// Loads the native NAR ingest (src/store/nar/native/nar-ingest.c, built by
// node-gyp as nixcas_ingest.node where libzstd's header was installed).
import { createRequire } from 'node:module';

export interface NarIngestHandle {
  readonly __narIngest: unique symbol;
}

export interface NarIngestSums {
  narSize: number;
  narSha256: Buffer;
  /** Bytes fed, before decoding. */
  fileSize: number;
  /** Of the bytes fed, when asked for at create(). */
  fileSha256?: Buffer;
}

export interface NarIngestAddon {
  /** An ingest of one NAR: zstd-compressed or not, hashing the body as fed or not, refusing more than `narSizeMax` decoded bytes; large files go to `<tempPrefix><n>`. */
  create(zstd: boolean, hashFile: boolean, narSizeMax: number, tempPrefix: string): NarIngestHandle;
  /**
   * Takes the next chunks of the body, on libuv's pool; resolves to the events they completed
   * (layout in nar-ingest.h). Rejects with an error whose code is NAR_FORMAT, NAR_SIZE, ZSTD or
   * an errno name. One batch at a time.
   */
  feed(handle: NarIngestHandle, chunks: Buffer[]): Promise<Buffer>;
  /** The sums once the body ended; throws when the NAR or the zstd frame is incomplete. */
  finish(handle: NarIngestHandle): NarIngestSums;
  /** Frees the ingest now, removing an unfinished temp file; not while a batch is being fed. */
  release(handle: NarIngestHandle): void;
}

let loaded: NarIngestAddon | false | undefined;

/** The addon, or undefined where it was not built or NIXCAS_NATIVE_INGEST=0 turns it off. */
export function narIngestAddon(env: NodeJS.ProcessEnv = process.env): NarIngestAddon | undefined {
  if (env.NIXCAS_NATIVE_INGEST === '0') return undefined;
  if (loaded === undefined) {
    try {
      // Both src/native/ (tsx) and dist/cli/ (the bundle) sit two levels below the package root.
      const addon = createRequire(import.meta.url)('../../build/Release/nixcas_ingest.node') as Partial<NarIngestAddon>;
      loaded = typeof addon.feed === 'function' ? (addon as NarIngestAddon) : false;
    } catch {
      loaded = false;
    }
  }
  return loaded || undefined;
}

// Loads the zstd decoder addon (src/native/zstd.c) where it was built.
import { createRequire } from 'node:module';

export interface ZstdDecoder {
  readonly __zstd: unique symbol;
}

interface ZstdAddon {
  decoder(): ZstdDecoder;
  /** The bytes `input` decompresses to; throws (code ZSTD_ERROR) on corrupt input. */
  decode(decoder: ZstdDecoder, input: Uint8Array): Buffer[];
  /** Whether everything so far ends at the end of a frame. */
  finished(decoder: ZstdDecoder): boolean;
}

let loaded: ZstdAddon | false | undefined;

/** The addon, or undefined where libzstd was missing at build time. */
export function zstdAddon(): ZstdAddon | undefined {
  if (loaded === undefined) {
    try {
      // Both src/native/ (tsx) and dist/native/ sit two levels below the package root.
      const addon = createRequire(import.meta.url)('../../build/Release/nixcas_zstd.node') as Partial<ZstdAddon>;
      loaded = typeof addon.decoder === 'function' ? (addon as ZstdAddon) : false;
    } catch {
      loaded = false;
    }
  }
  return loaded || undefined;
}

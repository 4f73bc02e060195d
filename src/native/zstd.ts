// Loads the zstd decoder addon (src/native/zstd.c) where it was built.
import { createRequire } from 'node:module';

export interface ZstdDecoder {
  readonly __zstd: unique symbol;
}

interface ZstdAddon {
  decoder(): ZstdDecoder;
  /**
   * Decompresses input[inputOffset..] into output[outputOffset..] until the output is full, or the
   * input is consumed with room to spare (nothing left inside the decoder); returns the new offsets.
   * Throws (code ZSTD_ERROR) on corrupt input.
   */
  decodeInto(decoder: ZstdDecoder, input: Uint8Array, inputOffset: number, output: Uint8Array, outputOffset: number): [number, number];
  /** Whether everything so far ends at the end of a frame. */
  finished(decoder: ZstdDecoder): boolean;
  /** Frees the decoder's memory now (its window is invisible to V8's collector); unusable afterwards. */
  release(decoder: ZstdDecoder): void;
}

let loaded: ZstdAddon | false | undefined;

/** The addon, or undefined where libzstd was missing at build time. */
export function zstdAddon(): ZstdAddon | undefined {
  if (loaded === undefined) {
    try {
      // Both src/native/ (tsx) and dist/native/ sit two levels below the package root.
      const addon = createRequire(import.meta.url)('../../build/Release/nixcas_zstd.node') as Partial<ZstdAddon>;
      loaded = typeof addon.decodeInto === 'function' && typeof addon.release === 'function' ? (addon as ZstdAddon) : false;
    } catch {
      loaded = false;
    }
  }
  return loaded || undefined;
}

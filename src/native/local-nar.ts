// Loads the native NAR renderer for the local store
// (src/store/nar/native/local-nar.c, built by node-gyp as nixcas_nar.node).
import { createRequire } from 'node:module';

export interface LocalNarAddon {
  /**
   * Writes the NAR of the store path with this 20-byte digest and basename
   * (<hash>-<name>), from the local store at `storeRoot`, to `fd`, blocking
   * until it is written. 'not-found': the path is not registered, or is under
   * another name; 'fallback': nothing was written and the
   * TypeScript renderer must do it (no store there yet, a layout or format
   * this build does not read, LMDB refusing the environment). Throws with
   * the cause when rendering failed, possibly after part of the NAR was written.
   */
  renderLocalNar(storeRoot: string, pathDigest: Buffer, basename: Buffer, fd: number): 'rendered' | 'not-found' | 'fallback';
}

/**
 * The renderer, or undefined when it is not built or NIXCAS_NATIVE_NAR=0 turns
 * it off. Never load it in a process that has the same store open through
 * lmdb-js: two LMDB copies must not hold one environment in one process.
 */
export function localNarAddon(env: NodeJS.ProcessEnv = process.env): LocalNarAddon | undefined {
  if (env.NIXCAS_NATIVE_NAR === '0') return undefined;
  try {
    // Both src/native/ (tsx) and dist/cli/ (the bundle) sit two levels below the package root.
    return createRequire(import.meta.url)('../../build/Release/nixcas_nar.node') as LocalNarAddon;
  } catch {
    return undefined;
  }
}

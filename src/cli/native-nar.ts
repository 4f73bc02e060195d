// `nixcas nar` through the native renderer, shared by the nar subcommand and
// the entry point's fast path (entry.ts). Kept free of commander and of every
// other subcommand's modules, so that the fast path loads almost nothing.
import { localNarAddon } from '../native/local-nar.js';
import { type AddressOptions, resolveAddresses, singleLocalStore } from '../services/addresses.js';
import { type StorePath, formatBasename, formatStorePath, parseStorePath } from '../store/storepath.js';

/** STORE_PATH as `nixcas nar` takes it: /nix/store/<hash>-<name>, or only the basename. */
export function narArgument(raw: string) {
  return parseStorePath(raw.includes('/') ? raw : `/nix/store/${raw}`);
}

/** The name the path's root node carries: <hash>-<name>, as bytes (store path names are ASCII). */
export function rootName(storePath: StorePath): Buffer {
  return Buffer.from(formatBasename(storePath), 'latin1');
}

/**
 * Writes the NAR to stdout with the native renderer when the services are
 * one local store and the renderer is built: true when it did. False when
 * nothing was written and the TypeScript renderer must do it. Throws when the
 * path is not in the store or rendering failed.
 *
 * NIXCAS_NATIVE_NAR=0 turns the native renderer off; =1 requires it (an error
 * instead of the TypeScript renderer), which is how tests know which one ran.
 */
export function writeNarNatively(raw: string, options: AddressOptions, env: NodeJS.ProcessEnv = process.env): boolean {
  const storePath = narArgument(raw);
  const addresses = resolveAddresses(options, env);
  const localStore = singleLocalStore(addresses);
  const addon = localStore === undefined ? undefined : localNarAddon(env);
  const outcome = addon?.renderLocalNar(localStore!, storePath.digest, rootName(storePath), 1) ?? 'fallback';
  if (outcome === 'not-found') throw notInStore(storePath, addresses.pathInfo);
  if (outcome === 'fallback' && env.NIXCAS_NATIVE_NAR === '1') {
    const why = localStore === undefined ? 'serves only one local store (--store)' : addon ? `cannot read the store at ${localStore}` : 'is not built';
    throw new Error(`NIXCAS_NATIVE_NAR=1, but the native NAR renderer ${why}`);
  }
  return outcome === 'rendered';
}

export function notInStore(storePath: StorePath, pathInfoAddress: string): Error {
  return new Error(`${formatStorePath(storePath)} is not in the store (${pathInfoAddress})`);
}

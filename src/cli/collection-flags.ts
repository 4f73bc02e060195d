// What `gc`, `delete` and `root` share: the one local store they work on, and store paths as users type them.
import { realpathSync } from 'node:fs';
import { type AddressOptions, resolveAddresses, singleLocalStore } from '../services/addresses.js';
import { type StorePath, parseStorePath } from '../store/storepath.js';
import { narArgument } from './native-nar.js';

/** The local store the flags name; collecting a remote store is its own daemon's business. */
export function localStoreOf(options: AddressOptions, command: string): string {
  const root = singleLocalStore(resolveAddresses(options));
  if (!root) throw new Error(`${command} works on a local store only: name it with --store DIR (or NIXCAS_STORE)`);
  return root;
}

/**
 * A store path as typed: /nix/store/HASH-NAME (anything below it names the
 * path), HASH-NAME, or a symlink into /nix/store such as ./result.
 */
export function storePathArgument(raw: string): StorePath {
  let text = raw;
  if (!text.startsWith('/nix/store/') && text.includes('/')) {
    try {
      text = realpathSync(text);
    } catch (err) {
      throw new Error(`${raw}: not a store path, and not a link to one (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
    }
  }
  if (text.startsWith('/nix/store/')) return parseStorePath(text.split('/').slice(0, 4).join('/'));
  return narArgument(text);
}

/** 10G, 500M, 64K, or bytes; powers of 1024 as Nix's --max-freed takes them. */
export function parseSize(text: string): number {
  const match = /^([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?$/i.exec(text.trim());
  if (!match) throw new Error(`${JSON.stringify(text)} is not a size (bytes, or a number with K, M, G or T)`);
  const power = ' KMGT'.indexOf(match[2]!.toUpperCase() || ' ');
  return Math.floor(Number(match[1]) * 1024 ** power);
}

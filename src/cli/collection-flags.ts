// What `gc`, `delete` and `root` share: the one local store they work on, and sizes as users type them.
import { type AddressOptions, resolveAddresses, singleLocalStore } from '../services/addresses.js';

/** The local store the flags name; collecting a remote store is its own daemon's business. */
export function localStoreOf(options: AddressOptions, command: string): string {
  const root = singleLocalStore(resolveAddresses(options));
  if (!root) throw new Error(`${command} works on a local store only: name it with --store DIR (or NIXCAS_STORE)`);
  return root;
}

/** 10G, 500M, 64K, or bytes; powers of 1024 as Nix's --max-freed takes them. */
export function parseSize(text: string): number {
  const match = /^([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?$/i.exec(text.trim());
  if (!match) throw new Error(`${JSON.stringify(text)} is not a size (bytes, or a number with K, M, G or T)`);
  const power = ' KMGT'.indexOf(match[2]!.toUpperCase() || ' ');
  return Math.floor(Number(match[1]) * 1024 ** power);
}

/** 30d, 12h, 90m, 45s, or seconds: a duration in seconds. */
export function parseDuration(text: string): number {
  const match = /^([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)$/i.exec(text.trim());
  if (!match) throw new Error(`${JSON.stringify(text)} is not a duration (seconds, or a number with s, m, h, d or w)`);
  const unit = { '': 1, s: 1, m: 60, h: 3600, d: 86400, w: 604800 }[match[2]!.toLowerCase() as '' | 's' | 'm' | 'h' | 'd' | 'w'];
  return Number(match[1]) * unit;
}

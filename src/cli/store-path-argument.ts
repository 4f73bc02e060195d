// STORE_PATH[/SUBPATH] as `nixcas path-info`, `ls` and `cat` take it: a full
// store path (/nix/store/<hash>-<name>, maybe with a path inside it), its bare
// basename, or a local path that leads into /nix/store through symlinks
// (`./result`, `./result/bin/hello`), as Nix's commands accept.
import { lstatSync, readlinkSync } from 'node:fs';
import { resolve } from 'node:path';
import type { PathInfo } from '../store/pathinfo.js';
import { STORE_DIR, type StorePath, formatStorePath } from '../store/storepath.js';
import { narArgument, notInStore, rootName } from './native-nar.js';
import type { OpenServices } from './store-options.js';

/** Symlinks followed before giving up, as the kernel's limit. */
const MAX_LINKS = 40;

export interface StorePathArgument {
  storePath: StorePath;
  /** The components of the path inside the store path (none for the store path itself). */
  subpath: string[];
}

function inStore(path: string): boolean {
  return path.startsWith(`${STORE_DIR}/`);
}

/** Follows symlinks outside /nix/store until the path leads into it; symlinks inside the store are left alone. */
function followIntoStore(raw: string): string {
  let pending = resolve(raw).split('/').filter(Boolean);
  let current = '';
  let links = 0;
  for (;;) {
    const whole = `${current}/${pending.join('/')}`;
    if (inStore(whole)) return whole;
    const name = pending.shift();
    if (name === undefined) throw new Error(`${raw} is not in ${STORE_DIR}, nor a symlink into it`);
    const next = `${current}/${name}`;
    let isLink: boolean;
    try {
      isLink = lstatSync(next).isSymbolicLink();
    } catch (err) {
      throw new Error(`${raw}: cannot follow ${next} into ${STORE_DIR}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    if (isLink) {
      if (++links > MAX_LINKS) throw new Error(`${raw}: too many symlinks on the way into ${STORE_DIR}`);
      pending = [...resolve(current || '/', readlinkSync(next)).split('/').filter(Boolean), ...pending];
      current = '';
    } else {
      current = next;
    }
  }
}

function exists(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

export function storePathArgument(raw: string): StorePathArgument {
  let full: string;
  if (inStore(raw)) full = raw;
  else if (!raw.includes('/') && !exists(raw)) full = `${STORE_DIR}/${raw}`; // a bare basename, as `nixcas nar` takes it
  else full = followIntoStore(raw);
  const [basename, ...rest] = full.slice(STORE_DIR.length + 1).split('/');
  const subpath = rest.filter((c) => c !== '' && c !== '.');
  if (subpath.includes('..')) throw new Error(`${raw}: '..' is not allowed inside a store path`);
  return { storePath: narArgument(basename!), subpath };
}

/** The PathInfo registered for exactly `storePath`; throws notInStore otherwise. */
export async function registeredPath(services: OpenServices, storePath: StorePath): Promise<PathInfo> {
  const info = await services.pathInfos.get(storePath.digest);
  // Registered under its hash part; a path of that hash with another name is not this one.
  if (!info || !info.node.node.name.equals(rootName(storePath))) throw notInStore(storePath, services.addresses.pathInfo);
  return info;
}

/** The argument as a path for messages: /nix/store/<hash>-<name>[/subpath]. */
export function displayPath({ storePath, subpath }: StorePathArgument, depth = subpath.length): string {
  return [formatStorePath(storePath), ...subpath.slice(0, depth)].join('/');
}

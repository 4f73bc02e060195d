// What `nixcas path-info` shows: PathInfos looked up by store path, their
// closures through references, closure sizes, the order Nix lists paths in,
// and the JSON `nix path-info --json` (Nix 2.8) prints for one path.
import { NotFoundError } from '../castore/errors.js';
import { formatContentAddress, formatSignature } from './narinfo.js';
import { type PathInfo, referencePaths, storePathOf } from './pathinfo.js';
import type { PathInfoService } from './pathinfoservice.js';
import { type StorePath, formatBasename, formatStorePath } from './storepath.js';

/** A path the store does not have: asked for, or (with `referrer`) a reference of a path it has. */
export class MissingPathError extends NotFoundError {
  constructor(
    readonly path: StorePath,
    readonly referrer?: StorePath,
  ) {
    super(`${formatStorePath(path)} is not in the store${referrer ? ` (a reference of ${formatStorePath(referrer)})` : ''}`);
  }
}

/** Looks PathInfos up by store path, each once. */
export class PathInfoLookup {
  private readonly found = new Map<string, Promise<PathInfo | undefined>>();

  constructor(private readonly service: PathInfoService) {}

  /** Records an info the caller has already (from list()), so it is not asked for again. */
  remember(info: PathInfo): void {
    this.found.set(formatBasename(storePathOf(info)), Promise.resolve(info));
  }

  /** The PathInfo of exactly `path`: registered under its hash part and its name; else undefined. */
  find(path: StorePath): Promise<PathInfo | undefined> {
    const key = formatBasename(path);
    let pending = this.found.get(key);
    if (!pending) {
      const name = Buffer.from(key, 'latin1');
      pending = this.service.get(path.digest).then((info) => (info && info.node.node.name.equals(name) ? info : undefined));
      this.found.set(key, pending);
    }
    return pending;
  }

  /**
   * The closure of `roots` through their references, roots included, each
   * path once. Throws MissingPathError for a reference the store lacks.
   */
  async closure(roots: PathInfo[]): Promise<PathInfo[]> {
    const seen = new Map<string, PathInfo>();
    let frontier = roots.filter((info) => {
      const key = formatBasename(storePathOf(info));
      if (seen.has(key)) return false;
      seen.set(key, info);
      return true;
    });
    while (frontier.length) {
      const wanted = new Map<string, { path: StorePath; referrer: StorePath }>();
      for (const info of frontier) {
        for (const ref of info.references) {
          const key = formatBasename(ref);
          if (!seen.has(key) && !wanted.has(key)) wanted.set(key, { path: ref, referrer: storePathOf(info) });
        }
      }
      frontier = await Promise.all(
        [...wanted.entries()].map(async ([key, { path, referrer }]) => {
          const info = await this.find(path);
          if (!info) throw new MissingPathError(path, referrer);
          seen.set(key, info);
          return info;
        }),
      );
    }
    return [...seen.values()];
  }

  /** The sum of the NAR sizes of the path's closure, as `nix path-info -S` gives it. */
  async closureSize(info: PathInfo): Promise<number> {
    let size = 0;
    for (const member of await this.closure([info])) size += member.narSize;
    return size;
  }
}

const byBasename = (a: PathInfo, b: PathInfo) => compareText(formatBasename(storePathOf(a)), formatBasename(storePathOf(b)));

function compareText(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Each path once, sorted by basename: the order of a Nix StorePathSet (what `--json` lists). */
export function sortedPaths(infos: PathInfo[]): PathInfo[] {
  const unique = new Map(infos.map((info) => [formatBasename(storePathOf(info)), info]));
  return [...unique.values()].sort(byBasename);
}

/**
 * The order `nix path-info` prints paths in without --json: references
 * before the paths that refer to them (among the paths given), ties by
 * basename. Nix's topoSortPaths, reversed: a depth-first walk in basename
 * order, each path printed after its references.
 */
export function referencesFirst(infos: PathInfo[]): PathInfo[] {
  const sorted = sortedPaths(infos);
  const byKey = new Map(sorted.map((info) => [formatBasename(storePathOf(info)), info]));
  const done = new Set<string>();
  const out: PathInfo[] = [];
  const visit = (key: string, info: PathInfo) => {
    if (done.has(key)) return;
    done.add(key);
    for (const ref of info.references.map(formatBasename).sort(compareText)) {
      const child = byKey.get(ref);
      if (child && ref !== key) visit(ref, child);
    }
    out.push(info);
  };
  for (const [key, info] of byKey) visit(key, info);
  return out;
}

/**
 * One element of `nix path-info --json` as Nix 2.8 prints it, keys in its
 * order. Nix's registrationTime and ultimate are not kept by the store and
 * are left out.
 */
export function pathInfoJson(info: PathInfo, closureSize?: number): Record<string, unknown> {
  const json: Record<string, unknown> = {
    path: formatStorePath(storePathOf(info)),
    narHash: `sha256-${info.narSha256.toString('base64')}`,
    narSize: info.narSize,
    references: referencePaths(info),
  };
  if (info.ca) json.ca = formatContentAddress(info.ca);
  if (closureSize !== undefined) json.closureSize = closureSize;
  // The store keeps the deriver without its .drv suffix (as tvix does).
  if (info.deriver) json.deriver = `${formatStorePath(info.deriver)}.drv`;
  if (info.signatures.length) json.signatures = info.signatures.map(formatSignature).sort(compareText);
  return json;
}

/** What Nix 2.8 prints for a path the store does not have. */
export function invalidPathJson(path: StorePath): Record<string, unknown> {
  return { path: formatStorePath(path), valid: false };
}

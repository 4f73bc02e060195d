// Garbage collection of a local store: GC roots (STORE/roots/), `delete` of
// unreferenced paths, and `gc`. Under the GC lock held exclusively
// (castore/backends/gc-lock.ts): mark the paths to keep, then every
// directory and blob they reach (directories read verified: a damaged one
// stops the collection before anything is removed), unregister the other
// paths in one transaction, then sweep (castore/backends/sweep.ts).
// A SIGKILL at any step leaves every registered path complete: a path is
// unregistered before anything only it used is removed.
import { existsSync, promises as fs } from 'node:fs';
import { join } from 'node:path';
import { digestKey, formatDigest } from '../castore/digest.js';
import { lockForCollection } from '../castore/backends/gc-lock.js';
import { LocalStore } from '../castore/backends/local.js';
import { type LiveObjects, type SweepReport, sweepLocalStore } from '../castore/backends/sweep.js';
import type { Node } from '../castore/model.js';
import { LocalPathInfoService } from './backends/local.js';
import { type PathInfo, storePathOf } from './pathinfo.js';
import { type StorePath, formatBasename, formatStorePath, parseBasename } from './storepath.js';

const ROOTS_DIR = 'roots';

// ---------------------------------------------------------------- roots

/** The store's GC roots: one file per rooted path in STORE/roots/, named by its basename. */
export async function listRoots(root: string): Promise<StorePath[]> {
  let names: string[];
  try {
    names = await fs.readdir(join(root, ROOTS_DIR));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const roots: StorePath[] = [];
  for (const name of names.sort()) {
    try {
      roots.push(parseBasename(name));
    } catch {
      // Not a root nixcas made (an editor's backup, say): not ours to read or remove.
    }
  }
  return roots;
}

/** Makes each path a GC root; each must be registered. Returns the ones that were not roots yet. */
export async function addRoots(root: string, paths: StorePath[]): Promise<StorePath[]> {
  const pathInfos = new LocalPathInfoService(root, { create: false });
  try {
    for (const path of paths) {
      if (!(await pathInfos.get(path.digest))) throw new Error(`${formatStorePath(path)} is not in the store at ${root}: only registered paths can be roots`);
    }
  } finally {
    await pathInfos.close();
  }
  await fs.mkdir(join(root, ROOTS_DIR), { recursive: true, mode: 0o755 });
  const added: StorePath[] = [];
  for (const path of paths) {
    try {
      await fs.writeFile(join(root, ROOTS_DIR, formatBasename(path)), `${formatStorePath(path)}\n`, { flag: 'wx', mode: 0o644 });
      added.push(path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
  return added;
}

/** Removes each path's GC root; a path that is no root is an error naming it. */
export async function removeRoots(root: string, paths: StorePath[]): Promise<void> {
  const rooted = new Set((await listRoots(root)).map(formatBasename));
  for (const path of paths) if (!rooted.has(formatBasename(path))) throw new Error(`${formatStorePath(path)} is not a GC root of the store at ${root}`);
  for (const path of paths) await fs.unlink(join(root, ROOTS_DIR, formatBasename(path)));
}

// ---------------------------------------------------------------- collection

export interface CollectionReport extends SweepReport {
  roots: number;
  /** Paths kept registered, and the paths unregistered (or, dry, that would be). */
  kept: number;
  removed: string[];
}

export interface CollectionOptions {
  dryRun?: boolean;
  /** Paths registered less than this many seconds ago are kept, with their closures, as if rooted. */
  keepNewerThan?: number;
  maxFreed?: number;
  /** Called once when writers hold the store and the collection waits for them. */
  onWait?: () => void;
  onProgress?: (what: string) => void;
}

/** `nixcas gc`: keeps the closure of the roots, removes every other path and every object nothing kept reaches. */
export function collectGarbage(root: string, options: CollectionOptions = {}): Promise<CollectionReport> {
  return collect(root, options, async (registered, registeredAt) => {
    const roots = await listRoots(root);
    if (options.keepNewerThan !== undefined) {
      // A path whose registration time the store does not know (registered before it kept them) counts as old.
      const since = Date.now() / 1000 - options.keepNewerThan;
      for (const [key, at] of registeredAt) if (at >= since) roots.push(storePathOf(registered.get(key)!));
    }
    return { roots: roots.length, keep: closure(registered, roots) };
  });
}

/**
 * `nixcas delete`: unregisters `paths` and removes what only they used.
 * Refuses (removing nothing) a path that is a root, or that a registered
 * path outside `paths` refers to, naming it.
 */
export function deletePaths(root: string, paths: StorePath[], options: CollectionOptions = {}): Promise<CollectionReport> {
  return collect(root, options, async (registered) => {
    const doomed = new Set(paths.map((p) => digestKey(p.digest)));
    for (const path of paths) {
      if (!registered.has(digestKey(path.digest))) throw new Error(`${formatStorePath(path)} is not in the store at ${root}`);
    }
    const rooted = new Set((await listRoots(root)).map((p) => digestKey(p.digest)));
    for (const path of paths) {
      if (rooted.has(digestKey(path.digest))) throw new Error(`${formatStorePath(path)} is a GC root; \`nixcas root remove\` it first`);
    }
    for (const [key, info] of registered) {
      if (doomed.has(key)) continue;
      for (const ref of info.references) {
        if (doomed.has(digestKey(ref.digest))) {
          throw new Error(`${formatStorePath(ref)} is still referenced by ${formatStorePath(storePathOf(info))}; delete that too, or leave both`);
        }
      }
    }
    return { roots: rooted.size, keep: new Set([...registered.keys()].filter((key) => !doomed.has(key))) };
  });
}

/** Registered paths reachable from `roots` through references, by hex digest. */
function closure(registered: Map<string, PathInfo>, roots: StorePath[]): Set<string> {
  const keep = new Set<string>();
  const queue = roots.map((r) => digestKey(r.digest));
  while (queue.length) {
    const key = queue.pop()!;
    if (keep.has(key)) continue;
    const info = registered.get(key);
    if (!info) continue; // a root whose path is gone keeps nothing
    keep.add(key);
    for (const ref of info.references) queue.push(digestKey(ref.digest));
  }
  return keep;
}

async function collect(
  root: string,
  options: CollectionOptions,
  choose: (registered: Map<string, PathInfo>, registeredAt: Map<string, number>) => Promise<{ roots: number; keep: Set<string> }>,
): Promise<CollectionReport> {
  // Collecting writes, but never makes a store (nor a lock file) where there is none.
  if (!existsSync(join(root, 'nixcas-store'))) throw new Error(`${root} holds no nixcas store (there is no nixcas-store file in it): there is nothing to collect`);
  const unlock = await lockForCollection(root, options.onWait ?? (() => {}));
  try {
    const pathInfos = new LocalPathInfoService(root);
    const directories = LocalStore.directoryService(root);
    try {
      const registered = new Map<string, PathInfo>();
      const registeredAt = new Map<string, number>();
      for await (const { info, registeredAt: at } of pathInfos.listWithTimes()) {
        const key = digestKey(storePathOf(info).digest);
        registered.set(key, info);
        if (at !== undefined) registeredAt.set(key, at);
      }
      options.onProgress?.(`${registered.size} registered paths`);
      const { roots, keep } = await choose(registered, registeredAt);
      const live: LiveObjects = { directories: new Set(), blobs: new Set() };
      let marked = 0;
      for (const key of keep) {
        const info = registered.get(key)!;
        await mark(info.node, live, directories, formatStorePath(storePathOf(info)));
        if (++marked % 100 === 0) options.onProgress?.(`marked ${marked} of ${keep.size} paths to keep`);
      }
      const removed = [...registered].filter(([key]) => !keep.has(key)).map(([, info]) => storePathOf(info));
      if (!options.dryRun && removed.length) await pathInfos.remove(removed.map((p) => p.digest));
      const swept = await sweepLocalStore(root, live, {
        dryRun: options.dryRun,
        maxFreed: options.maxFreed,
        onProgress: (r) => options.onProgress?.(`removed ${r.directories} directories, ${r.smallBlobs} small blobs, ${r.blobFiles} blob files`),
      });
      return { ...swept, roots, kept: keep.size, removed: removed.map(formatStorePath).sort() };
    } finally {
      await directories.close();
      await pathInfos.close();
    }
  } finally {
    unlock();
  }
}

/** Marks a node and everything under it live; a missing or damaged directory stops the collection before anything is removed. */
async function mark(node: Node, live: LiveObjects, directories: ReturnType<typeof LocalStore.directoryService>, path: string): Promise<void> {
  if (node.kind === 'file') {
    live.blobs.add(digestKey(node.node.digest));
    return;
  }
  if (node.kind !== 'directory') return;
  const stack = [node.node.digest];
  while (stack.length) {
    const digest = stack.pop()!;
    const key = digestKey(digest);
    if (live.directories.has(key)) continue;
    let directory;
    try {
      directory = await directories.get(digest);
    } catch (err) {
      throw new Error(`${path}: ${(err as Error).message}; nothing was collected (run \`nixcas verify --repair\`, then import what it names again)`, { cause: err });
    }
    if (!directory) throw new Error(`${path} is incomplete: directory ${formatDigest(digest)} is missing; nothing was collected (run \`nixcas verify\`)`);
    live.directories.add(key);
    for (const file of directory.files) live.blobs.add(digestKey(file.digest));
    for (const child of directory.directories) stack.push(child.digest);
  }
}

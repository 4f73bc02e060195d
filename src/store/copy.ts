// Copies a closure from a local Nix store directory into the store. Each
// path is read from disk, hashed as a NAR in the same pass, and verified
// against the closure description before its PathInfo is registered. Paths
// are read several at a time, but a PathInfo is registered only after every
// path it refers to is, so no reader ever sees a path with an incomplete
// closure.
import { lstatSync } from 'node:fs';
import { join } from 'node:path';
import { importTree } from '../castore/import.js';
import { InvalidInputError } from '../castore/errors.js';
import type { Node } from '../castore/model.js';
import type { ClosureEntry } from './closure.js';
import type { StoreServices } from './import.js';
import { NarHasher } from './nar/hasher.js';
import * as nixbase32 from './nixbase32.js';
import type { PathInfo } from './pathinfo.js';
import { STORE_DIR, formatBasename, formatStorePath } from './storepath.js';

export type CopyOutcome = 'copied' | 'present';

export interface CopyOptions {
  /** Where the paths are read from; /nix/store unless testing. */
  sourceDir?: string;
  /** How many paths are read at once. */
  concurrency?: number;
  onBytes?: (bytes: number) => void;
  onPathDone?: (path: string, outcome: CopyOutcome) => void;
  onPathFailed?: (path: string, error: Error) => void;
}

export interface CopySummary {
  copied: string[];
  present: string[];
  failed: { path: string; error: Error }[];
}

export class CopyError extends InvalidInputError {}

/** References before referrers (self-references ignored); input order otherwise. */
function topologicalOrder(entries: ClosureEntry[]): ClosureEntry[] {
  const byPath = new Map(entries.map((e) => [formatStorePath(e.path), e]));
  const done = new Set<string>();
  const ordered: ClosureEntry[] = [];
  const visit = (entry: ClosureEntry, trail: Set<string>) => {
    const key = formatStorePath(entry.path);
    if (done.has(key) || trail.has(key)) return;
    trail.add(key);
    for (const ref of entry.references) {
      const child = byPath.get(formatStorePath(ref));
      if (child && child !== entry) visit(child, trail);
    }
    trail.delete(key);
    done.add(key);
    ordered.push(entry);
  };
  for (const entry of entries) visit(entry, new Set());
  return ordered;
}

/** A counting semaphore. */
class Slots {
  private waiting: (() => void)[] = [];
  constructor(private free: number) {}
  async acquire(): Promise<void> {
    if (this.free > 0) {
      this.free--;
      return;
    }
    await new Promise<void>((resolve) => this.waiting.push(resolve));
  }
  release(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.free++;
  }
}

function hashText(digest: Buffer): string {
  return `sha256:${nixbase32.encode(digest)}`;
}

export async function copyClosure(entries: ClosureEntry[], services: StoreServices, options: CopyOptions = {}): Promise<CopySummary> {
  const sourceDir = options.sourceDir ?? STORE_DIR;
  const slots = new Slots(options.concurrency ?? 4);
  const summary: CopySummary = { copied: [], present: [], failed: [] };
  const registered = new Map<string, Promise<void>>();
  let bytes = 0;

  async function ingest(entry: ClosureEntry): Promise<PathInfo> {
    const basename = formatBasename(entry.path);
    const source = join(sourceDir, basename);
    try {
      lstatSync(source);
    } catch (err) {
      throw new CopyError(`cannot read ${source}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such path' : (err as Error).message}`);
    }
    const nar = new NarHasher();
    let lastBytes = 0;
    let root: Node;
    try {
      root = await importTree(source, Buffer.from(basename), services, {
        observer: nar,
        onProgress: (pathBytes) => {
          bytes += pathBytes - lastBytes;
          lastBytes = pathBytes;
          options.onBytes?.(bytes);
        },
      });
    } catch (err) {
      nar.abandon();
      throw err;
    }
    const { narSha256, narSize } = await nar.finish();
    if (!narSha256.equals(entry.narSha256)) {
      throw new CopyError(`NAR hash mismatch: the closure says ${hashText(entry.narSha256)}, the path on disk hashes to ${hashText(narSha256)}`);
    }
    if (narSize !== entry.narSize) {
      throw new CopyError(`NAR size mismatch: the closure says ${entry.narSize} bytes, the path on disk is ${narSize}`);
    }
    return {
      node: root,
      references: entry.references,
      narSize: entry.narSize,
      narSha256,
      signatures: entry.signatures,
      deriver: entry.deriver,
      ca: entry.ca,
    };
  }

  async function referenceReady(entry: ClosureEntry, index: number): Promise<void> {
    const ref = entry.references[index]!;
    if (ref.digest.equals(entry.path.digest)) return; // a self-reference
    const key = formatStorePath(ref);
    const pending = registered.get(key);
    if (pending) {
      await pending.catch(() => {
        throw new CopyError(`its reference ${key} could not be copied`);
      });
      return;
    }
    if (!(await services.pathInfos.get(ref.digest))) {
      throw new CopyError(`its reference ${key} is neither in the closure nor in the store`);
    }
  }

  async function copyOne(entry: ClosureEntry): Promise<void> {
    const path = formatStorePath(entry.path);
    if (await services.pathInfos.get(entry.path.digest)) {
      summary.present.push(path);
      options.onPathDone?.(path, 'present');
      return;
    }
    await slots.acquire();
    let info: PathInfo;
    try {
      info = await ingest(entry);
    } finally {
      slots.release();
    }
    await Promise.all(entry.references.map((_, i) => referenceReady(entry, i)));
    await services.pathInfos.put(info);
    summary.copied.push(path);
    options.onPathDone?.(path, 'copied');
  }

  const ordered = topologicalOrder(entries);
  for (const entry of ordered) {
    const path = formatStorePath(entry.path);
    const task = copyOne(entry);
    task.catch((error: Error) => {
      summary.failed.push({ path, error });
      options.onPathFailed?.(path, error);
    });
    registered.set(path, task);
  }
  await Promise.allSettled(registered.values());
  return summary;
}

// The store's garbage-collection lock, STORE/gc.lock (flock(2)).
//
// A writer publishes objects first and registers the path that uses them
// last; in between, the objects are reachable from nothing, and a collector
// that marked before the registration would sweep them. So every process that
// writes to a store holds the lock *shared* from its first write (or its first
// check that an object is already there, which it then relies on) until it has
// written nothing for the write lease (default 60 s): long enough to get from
// its last object to the registration. `nixcas gc` holds it *exclusively*
// while it marks and sweeps, and waits for the writers to go idle first;
// writers that come while it runs wait for it. flock locks die with their
// process, so a killed writer or collector never leaves the store locked.
// (docs/design-notes.md, "garbage collection".)
import { closeSync, constants, openSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { native, optionalNative } from '../../native/index.js';

export const GC_LOCK_FILE = 'gc.lock';
const DEFAULT_LEASE_SECONDS = 60;
/** How often a writer (or the collector) looks again at a lock held the other way. */
const RETRY_MS = 50;
const EWOULDBLOCK = osConstants.errno.EWOULDBLOCK;

/** The write lease in ms: NIXCAS_WRITE_LEASE_SECONDS, or 60 s. */
export function writeLeaseMs(env: NodeJS.ProcessEnv = process.env): number {
  const text = env.NIXCAS_WRITE_LEASE_SECONDS;
  if (text === undefined || text === '') return DEFAULT_LEASE_SECONDS * 1000;
  const seconds = Number(text);
  if (!Number.isFinite(seconds) || seconds <= 0) throw new Error(`NIXCAS_WRITE_LEASE_SECONDS=${JSON.stringify(text)}: a positive number of seconds, please`);
  return seconds * 1000;
}

function openLockFile(root: string): number {
  return openSync(join(root, GC_LOCK_FILE), constants.O_RDWR | constants.O_CREAT, 0o644);
}

/** One process's shared hold on a store's GC lock, taken on write and let go once writes stop. */
export class WriteLease {
  private fd?: number;
  private held = false;
  private taking?: Promise<void>;
  private lastUse = 0;
  private timer?: NodeJS.Timeout;

  constructor(
    private readonly root: string,
    private readonly leaseMs = writeLeaseMs(),
  ) {}

  /**
   * Makes sure this process holds the lock shared (waiting while a collector
   * runs), and keeps it for the lease from now. Without the native addon
   * there is no lock, and `nixcas gc` refuses to run.
   */
  hold(): Promise<void> | undefined {
    this.lastUse = Date.now();
    if (this.held) return undefined;
    const addon = optionalNative();
    if (!addon) return undefined;
    return (this.taking ??= this.take(addon.flock.bind(addon)).finally(() => (this.taking = undefined)));
  }

  private async take(flock: (fd: number, exclusive: boolean, wait: boolean) => number): Promise<void> {
    this.fd ??= openLockFile(this.root);
    for (;;) {
      const r = flock(this.fd, false, false);
      if (r === 0) break;
      if (r !== -EWOULDBLOCK) throw new Error(`${join(this.root, GC_LOCK_FILE)}: cannot lock it (errno ${-r})`);
      await delay(RETRY_MS); // a collector runs: writes wait for it
    }
    this.held = true;
    this.lastUse = Date.now();
    this.arm(this.leaseMs);
  }

  private arm(ms: number): void {
    this.timer = setTimeout(() => {
      const idle = Date.now() - this.lastUse;
      if (idle < this.leaseMs) return this.arm(this.leaseMs - idle);
      this.release();
    }, ms);
    this.timer.unref(); // a lease never keeps a process alive
  }

  /** Lets go of the lock (a store being closed, or the lease run out). */
  release(): void {
    clearTimeout(this.timer);
    if (this.fd === undefined) return;
    if (this.held) optionalNative()?.unflock(this.fd);
    this.held = false;
    closeSync(this.fd);
    this.fd = undefined;
  }
}

/**
 * Takes the lock exclusively for a collection: waits (calling `onWait` once)
 * while writers hold it. Returns what lets it go.
 */
export async function lockForCollection(root: string, onWait: () => void): Promise<() => void> {
  const addon = native();
  const fd = openLockFile(root);
  let told = false;
  for (;;) {
    const r = addon.flock(fd, true, false);
    if (r === 0) break;
    if (r !== -EWOULDBLOCK) {
      closeSync(fd);
      throw new Error(`${join(root, GC_LOCK_FILE)}: cannot lock it (errno ${-r})`);
    }
    if (!told) onWait();
    told = true;
    await delay(RETRY_MS);
  }
  return () => {
    addon.unflock(fd);
    closeSync(fd);
  };
}

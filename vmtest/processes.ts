// Child processes (QEMU, virtio-fs backends) that must not outlive the test process.
//
// Each caller stops its own children and removes its temporary files in `finally`; this is the
// safety net for when the Node process ends some other way (process.exit() from a signal handler).

import type { ChildProcess } from 'node:child_process';

const exitHooks = new Set<() => void>();

/**
 * Runs fn (synchronously) if the process exits before the returned function is called. Note that
 * Node does not run exit hooks when killed by a signal it does not handle: programs should turn
 * SIGINT/SIGTERM into process.exit(), as smoke.ts does.
 */
export function atExit(fn: () => void): () => void {
  if (exitHooks.size === 0) process.once('exit', runExitHooks);
  exitHooks.add(fn);
  return () => {
    exitHooks.delete(fn);
    if (exitHooks.size === 0) process.off('exit', runExitHooks);
  };
}

function runExitHooks(): void {
  for (const fn of exitHooks) {
    try {
      fn();
    } catch {
      // Best effort: the process is going away.
    }
  }
}

const tracked = new Set<ChildProcess>();

/** Makes sure the child is SIGKILLed if this process exits first. */
export function track(child: ChildProcess): ChildProcess {
  const forgetHook = atExit(() => child.kill('SIGKILL'));
  const forget = () => {
    forgetHook();
    tracked.delete(child);
  };
  tracked.add(child);
  child.once('exit', forget);
  child.once('error', forget); // never started
  return child;
}

/**
 * Stops every tracked child that is still running (SIGTERM, then SIGKILL after graceMs) and waits
 * for them: for a signal handler, before process.exit(). Backends then shut down cleanly and no
 * child is left for init to reap.
 */
export async function stopAll(graceMs = 2000): Promise<void> {
  await Promise.all([...tracked].map((child) => stop(child, graceMs)));
}

/** Resolves once the child has exited (at once if it already has). */
export function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

/** SIGTERM, then SIGKILL if the child has not exited after graceMs. */
export async function stop(child: ChildProcess, graceMs = 2000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited(child);
  clearTimeout(timer);
}

/** Keeps the last maxBytes of a stream's output (enough for an error message, bounded for long runs). */
export class OutputTail {
  private text = '';
  constructor(private readonly maxBytes = 64 * 1024) {}
  push(chunk: string): void {
    this.text += chunk;
    if (this.text.length > 2 * this.maxBytes) this.text = this.text.slice(-this.maxBytes);
  }
  toString(): string {
    return this.text.slice(-this.maxBytes);
  }
}

// vhost-user backends: a process that listens on a Unix socket QEMU connects to. Used for the
// reference virtiofsd now and for `nixcas virtiofs SOCKET` later.

import { type ChildProcess, spawn } from 'node:child_process';
import { lstatSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { VIRTIOFSD } from './packages.js';
import { OutputTail, stop, track } from './processes.js';

export interface BackendOptions {
  command: string;
  args: string[];
  /** Where the backend will listen; startBackend resolves once this socket exists. */
  socketPath: string;
  /** Defaults to 10 s. */
  readyTimeoutMs?: number;
}

export interface Backend {
  socketPath: string;
  process: ChildProcess;
  /** The backend's stdout and stderr so far (the tail of it). */
  output(): string;
  /** SIGTERM, then SIGKILL; safe to call more than once. */
  stop(): Promise<void>;
}

export async function startBackend(options: BackendOptions): Promise<Backend> {
  const child = track(spawn(options.command, options.args, { stdio: ['ignore', 'pipe', 'pipe'] }));
  const output = new OutputTail();
  child.stdout!.setEncoding('utf8').on('data', (s: string) => output.push(s));
  child.stderr!.setEncoding('utf8').on('data', (s: string) => output.push(s));
  let spawnError: Error | undefined;
  child.once('error', (e) => (spawnError = e));

  const backend: Backend = { socketPath: options.socketPath, process: child, output: () => output.toString(), stop: () => stop(child) };
  try {
    await waitForSocket(child, options.socketPath, options.readyTimeoutMs ?? 10_000, () => spawnError);
  } catch (e) {
    await backend.stop();
    throw new Error(`${options.command}: ${(e as Error).message}\n--- backend output ---\n${output.toString().trim()}`);
  }
  return backend;
}

export interface VirtiofsdOptions {
  /** The directory to share. */
  source: string;
  socketPath: string;
  /** virtiofsd's cache mode: "auto", "always" or "none". Defaults to "always". */
  cache?: string;
  extraArgs?: string[];
}

/** QEMU 7.2's C virtiofsd (/usr/lib/qemu/virtiofsd), the reference backend. Needs root. */
export function startVirtiofsd(o: VirtiofsdOptions): Promise<Backend> {
  return startBackend({
    command: VIRTIOFSD,
    // This version takes libfuse-style "-o" options; only the socket path is a long option.
    args: [`--socket-path=${o.socketPath}`, '-o', `source=${o.source}`, '-o', `cache=${o.cache ?? 'always'}`, ...(o.extraArgs ?? [])],
    socketPath: o.socketPath,
  });
}

// QEMU's chardev connects once, at startup, and gives up if nobody listens yet; so wait for the socket.
// Only its existence is checked: a probing connect() would use up virtiofsd's one and only connection.
async function waitForSocket(child: ChildProcess, path: string, timeoutMs: number, error: () => Error | undefined): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const e = error();
    if (e) throw e;
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`exited (${child.exitCode ?? child.signalCode}) before listening on ${path}`);
    if (isSocket(path)) return;
    if (Date.now() > deadline) throw new Error(`not listening on ${path} after ${timeoutMs} ms`);
    await sleep(10);
  }
}

function isSocket(path: string): boolean {
  try {
    return lstatSync(path).isSocket();
  } catch {
    return false;
  }
}

// vhost-user backends: a process that listens on a Unix socket QEMU connects to: QEMU's reference
// virtiofsd, and `nixcas virtiofs SOCKET`.

import { type ChildProcess, spawn } from 'node:child_process';
import { lstatSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { VIRTIOFSD } from './packages.js';
import { OutputTail, stop, track } from './processes.js';

export interface BackendOptions {
  command: string;
  args: string[];
  /** Where the backend will listen; startBackend resolves once this socket exists. */
  socketPath: string;
  /** Defaults to 10 s. */
  readyTimeoutMs?: number;
  /** Also wait until the backend's stdout or stderr contains this text. */
  readyText?: string;
  /** Added to the environment. */
  env?: NodeJS.ProcessEnv;
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
  const env = options.env ? { ...process.env, ...options.env } : process.env;
  const child = track(spawn(options.command, options.args, { stdio: ['ignore', 'pipe', 'pipe'], env }));
  const output = new OutputTail();
  child.stdout!.setEncoding('utf8').on('data', (s: string) => output.push(s));
  child.stderr!.setEncoding('utf8').on('data', (s: string) => output.push(s));
  let spawnError: Error | undefined;
  child.once('error', (e) => (spawnError = e));

  const backend: Backend = { socketPath: options.socketPath, process: child, output: () => output.toString(), stop: () => stop(child) };
  try {
    const ready = () => isSocket(options.socketPath) && (options.readyText === undefined || output.toString().includes(options.readyText));
    await waitUntilReady(child, options.socketPath, options.readyTimeoutMs ?? 10_000, ready, () => spawnError);
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

export interface NixcasVirtiofsOptions {
  socketPath: string;
  /** The embedded local store directory (--store). */
  store?: string;
  /** --list-root: let the guest list /nix/store. */
  listRoot?: boolean;
  /** --num-request-queues. */
  numRequestQueues?: number;
  /** More arguments, e.g. --blob-service-addr URL. */
  extraArgs?: string[];
  env?: NodeJS.ProcessEnv;
  /** Defaults to the repository's dist/cli/nixcas.cjs (run `npm run build` first). */
  cli?: string;
  /** Flags for node itself, before the script (e.g. --cpu-prof, which NODE_OPTIONS may not carry). */
  nodeArgs?: string[];
  readyTimeoutMs?: number;
}

/** The repository's built CLI. */
export const NIXCAS_CLI = join(dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli', 'nixcas.cjs');

/**
 * `nixcas virtiofs SOCKET`, started with this Node.js. Ready once it says it listens. Unlike
 * virtiofsd it keeps listening after a front end disconnects, so one backend serves many boots.
 */
export function startNixcasVirtiofs(o: NixcasVirtiofsOptions): Promise<Backend> {
  const args = [...(o.nodeArgs ?? []), o.cli ?? NIXCAS_CLI, 'virtiofs', o.socketPath];
  if (o.listRoot) args.push('--list-root');
  if (o.numRequestQueues !== undefined) args.push('--num-request-queues', String(o.numRequestQueues));
  if (o.store !== undefined) args.push('--store', o.store);
  args.push(...(o.extraArgs ?? []));
  return startBackend({
    command: process.execPath,
    args,
    socketPath: o.socketPath,
    readyText: 'listening on',
    readyTimeoutMs: o.readyTimeoutMs ?? 20_000,
    env: o.env,
  });
}

// QEMU's chardev connects once, at startup, and gives up if nobody listens yet; so wait for the socket.
// Only its existence (and the backend's own word) is checked: a probing connect() would use up
// virtiofsd's one and only connection.
async function waitUntilReady(child: ChildProcess, path: string, timeoutMs: number, ready: () => boolean, error: () => Error | undefined): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const e = error();
    if (e) throw e;
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`exited (${child.exitCode ?? child.signalCode}) before listening on ${path}`);
    if (ready()) return;
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

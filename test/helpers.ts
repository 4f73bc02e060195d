// Shared test plumbing: temp dirs, a real `nixcas daemon` process, store checks.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { createServer as createNetServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { blake3, digestKey } from '../src/castore/digest.js';
import { LocalStore } from '../src/castore/backends/local.js';
import { MemoryBlobService, MemoryDirectoryService } from '../src/castore/backends/memory.js';
import { putBlob } from '../src/castore/blobservice.js';
import type { Node } from '../src/castore/model.js';
import { ReadOnlyFilesystem } from '../src/fs/filesystem.js';

export const ROOT = fileURLToPath(new URL('..', import.meta.url));
export const CLI = join(ROOT, 'dist/cli/nixcas.cjs');

export function tempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), `nixcas-${prefix}-`));
}

export interface Daemon {
  process: ChildProcess;
  output: () => string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Starts `nixcas daemon` with `args` and waits until it says it listens. */
export function startDaemon(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Daemon> {
  return startNixcas(['daemon', ...args], 'listening on', env);
}

/**
 * Starts a long-running `nixcas ARGS…` and waits until its stderr says
 * `ready`; `wrapper` runs it through another command (setpriv, to change user).
 */
export async function startNixcas(args: string[], ready: string, env: NodeJS.ProcessEnv = {}, wrapper: string[] = []): Promise<Daemon> {
  const argv = [...wrapper, process.execPath, CLI, ...args];
  const child = spawn(argv[0], argv.slice(1), { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (d) => (output += d));
  child.stderr!.on('data', (d) => (output += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`nixcas ${args[0]} did not start: ${output}`)), 15000);
    const check = () => {
      if (output.includes(ready)) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stderr!.on('data', check);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`nixcas ${args[0]} exited with ${code}: ${output}`));
    });
  });
  return {
    process: child,
    output: () => output,
    stop: async (signal = 'SIGTERM') => {
      if (child.exitCode === null) child.kill(signal);
      return exited;
    },
  };
}

/**
 * Checks a local store directory from the outside: every blob file's BLAKE3
 * is its name (no partial blob), and every stored directory's children are
 * stored (complete closures). Returns the counts.
 */
export async function verifyLocalStore(dir: string): Promise<{ blobs: number; directories: number; problems: string[] }> {
  const problems: string[] = [];
  let blobs = 0;
  const blobRoot = join(dir, 'blobs');
  for (const prefix of existsSync(blobRoot) ? readdirSync(blobRoot) : []) {
    for (const name of readdirSync(join(blobRoot, prefix))) {
      blobs++;
      const actual = digestKey(blake3(readFileSync(join(blobRoot, prefix, name))));
      if (actual !== name) problems.push(`blob file ${name} holds content with digest ${actual}`);
    }
  }
  const directories = LocalStore.directoryService(dir);
  const blobService = LocalStore.blobService(dir);
  let count = 0;
  try {
    for (const { digest, data } of blobService.smallBlobEntries()) {
      blobs++;
      const actual = digestKey(blake3(data));
      if (actual !== digestKey(digest)) problems.push(`small blob ${digestKey(digest)} holds content with digest ${actual}`);
    }
    for (const digest of directories.digests()) {
      count++;
      const directory = (await directories.get(digest))!;
      for (const child of directory.directories) {
        if (!(await directories.get(child.digest))) problems.push(`directory ${digestKey(digest)} lacks child ${digestKey(child.digest)}`);
      }
      for (const file of directory.files) {
        const stat = await blobService.stat(file.digest);
        if (!stat) problems.push(`directory ${digestKey(digest)} lacks blob ${digestKey(file.digest)}`);
        else if (stat.size !== file.size) problems.push(`blob ${digestKey(file.digest)} has size ${stat.size}, not ${file.size}`);
      }
    }
  } finally {
    await directories.close();
    await blobService.close();
  }
  return { blobs, directories: count, problems };
}

/** An empty local store at `dir` (read-only commands do not make one). */
export async function makeEmptyStore(dir: string): Promise<void> {
  const { LocalStore } = await import('../src/castore/backends/local.js');
  await LocalStore.blobService(dir).close();
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

export interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `nixcas ARGS…` to completion. */
export function nixcas(args: string[], options: { env?: NodeJS.ProcessEnv; input?: string | Buffer } = {}): Run {
  const result = spawnSync(process.execPath, [CLI, ...args], {
    env: { ...process.env, ...options.env },
    input: options.input,
    maxBuffer: 1 << 30,
    timeout: 300_000,
  });
  if (result.error) throw result.error;
  return { status: result.status, stdout: result.stdout.toString('latin1'), stderr: result.stderr.toString() };
}

/** Runs `nixcas ARGS…` and returns stdout as bytes (for NARs). */
export function nixcasBytes(args: string[], env: NodeJS.ProcessEnv = {}): Buffer {
  const result = spawnSync(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, maxBuffer: 1 << 30, timeout: 300_000 });
  if (result.status !== 0) throw new Error(`nixcas ${args.join(' ')} failed: ${result.stderr}`);
  return result.stdout;
}

/** Runs a Nix command; fails the test with its stderr when it fails. */
export function nix(command: string, args: string[]): Buffer {
  const result = spawnSync(command, args, { maxBuffer: 1 << 30, timeout: 300_000 });
  if (result.error) throw new Error(`${command}: ${result.error.message} (is nix-bin installed?)`);
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed: ${result.stderr}`);
  return result.stdout;
}

/** Builds test/fixtures/closure.nix with real Nix; returns the .attrs.json path. */
export function buildClosureFixture(outLink: string): string {
  nix('nix-build', [
    '--option', 'sandbox', 'false', '--option', 'substituters', '',
    join(ROOT, 'test/fixtures/closure.nix'), '-o', outLink,
  ]);
  return outLink;
}

/**
 * A seeded source of random numbers for a test (mulberry32). The seed is NIXCAS_TEST_SEED when set,
 * otherwise a new one, and is printed with `what`, so that a failure can be run again exactly.
 */
export function seededRandom(what: string): { seed: number; float(): number; int(min: number, max: number): number } {
  const given = process.env.NIXCAS_TEST_SEED;
  const seed = given !== undefined && given !== '' ? Number(given) >>> 0 : Math.floor(Math.random() * 2 ** 32);
  console.log(`${what}: seed ${seed} (NIXCAS_TEST_SEED=${seed} runs it again)`);
  let state = seed;
  const float = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
  return { seed, float, int: (min, max) => min + Math.floor(float() * (max - min)) };
}

/** Bytes from a fixed-seed xorshift32: incompressible, the same on every run. */
export function seededBytes(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** The port a started nar-bridge listens on, and the URL of the NAR its narinfo for `storePath` names. */
export async function bridgeNarUrl(bridge: Daemon, storePath: string): Promise<{ port: string; url: string }> {
  const port = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(bridge.output())![1]!;
  const hash = storePath.slice('/nix/store/'.length, '/nix/store/'.length + 32);
  const narinfo = await fetch(`http://127.0.0.1:${port}/${hash}.narinfo`);
  if (narinfo.status !== 200) throw new Error(`GET ${hash}.narinfo: ${narinfo.status}`);
  return { port, url: /^URL: (.*)$/m.exec(await narinfo.text())![1]! };
}

/** An in-memory store with one store path, `<32 zeros>-hello`, a 6-byte file, as the filesystem core sees it (FUSE protocol tests). */
export async function oneFileFilesystem(): Promise<{ fs: ReadOnlyFilesystem; file: Node }> {
  const blobs = new MemoryBlobService();
  const digest = await putBlob(blobs, Buffer.from('hello\n'));
  const file: Node = { kind: 'file', node: { name: Buffer.from(`${'0'.repeat(32)}-hello`), digest, size: 6, executable: false } };
  const fs = new ReadOnlyFilesystem(blobs, new MemoryDirectoryService(), {
    lookup: async (name) => (name.equals(file.node.name) ? file : undefined),
    async *list() {
      yield file;
    },
  });
  return { fs, file };
}

/** Python stubs of protos/ (tvix and snix), compiled by Debian's python3-grpc-tools into `dir`. */
export function compilePythonStubs(dir: string): string {
  const protoc = spawnSync('/usr/bin/python3', [
    '-c', 'import os,sys; os.makedirs(sys.argv[1], exist_ok=True); from grpc_tools import protoc; sys.exit(protoc.main(["protoc", "-I", sys.argv[2], "--python_out=" + sys.argv[1], "--grpc_python_out=" + sys.argv[1]] + sys.argv[3:]))',
    dir, join(ROOT, 'protos'),
    ...['tvix', 'snix'].flatMap((p) => [
      ...['castore', 'rpc_blobstore', 'rpc_directory'].map((f) => join(ROOT, 'protos', p, 'castore/v1', `${f}.proto`)),
      ...['pathinfo', 'rpc_pathinfo'].map((f) => join(ROOT, 'protos', p, 'store/v1', `${f}.proto`)),
    ]),
  ], { encoding: 'utf8' });
  if (protoc.status !== 0) throw new Error(`grpc_tools.protoc failed: ${protoc.stderr}`);
  return dir;
}

/**
 * Runs test/python/read_only_client.py (Debian's grpcio) against a daemon's unix socket: it tries
 * the three Puts and reads the blob `digest`. Returns its output; fails the test if it failed.
 */
export function pythonReadOnlyChecks(socket: string, generated: string, digest: string): string {
  if (!existsSync(generated)) compilePythonStubs(generated);
  const client = spawnSync('/usr/bin/python3', [join(ROOT, 'test/python/read_only_client.py'), socket, generated, digest], { encoding: 'utf8', timeout: 60_000 });
  if (client.status !== 0) throw new Error(`read_only_client.py failed (${client.status ?? client.signal}): ${client.stderr}`);
  return client.stdout;
}

let accessLogMarkers = 0;

/**
 * The length of a nar-bridge's output once every request answered so far is logged in it: it logs
 * a request when it is answered, so a marker request's line comes after all earlier ones.
 */
export async function settledAccessLog(base: string, output: () => string, timeoutMs = 10_000): Promise<number> {
  const marker = `/nix-cache-info?marker=${++accessLogMarkers}`;
  await (await fetch(`${base}${marker}`)).text();
  for (const deadline = Date.now() + timeoutMs; !output().includes(`GET ${marker} `); ) {
    if (Date.now() > deadline) throw new Error(`the bridge never logged ${marker}`);
    await new Promise((resolve) => setTimeout(resolve, 20)); // another process's output
  }
  return output().length;
}

/** A TCP port on 127.0.0.1 that nothing listens on now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createNetServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

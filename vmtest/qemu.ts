// Booting the initramfs in QEMU (TCG) and collecting what the guest reports.
//
// Two serial ports: ttyS0 is the console (kernel messages and the guest script's stdout/stderr),
// streamed from QEMU's stdout; ttyS1 is the results channel (RESULT lines and the exit marker),
// written by QEMU to a file that is read once QEMU has exited.

import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Backend } from './backend.js';
import type { Initramfs } from './initramfs.js';
import { QEMU } from './packages.js';
import { atExit, exited, OutputTail, track } from './processes.js';

export interface BootOptions {
  initramfs: Initramfs;
  /**
   * A running vhost-user-fs backend; the guest then sees a virtio-fs device with tag virtiofsTag.
   * If the backend exits while the guest runs, QEMU is stopped at once instead of at the timeout.
   */
  backend?: Backend;
  /** Or just the socket of a backend started some other way. */
  virtiofsSocket?: string;
  /** Defaults to "nixstore". */
  virtiofsTag?: string;
  /** virtio-fs request queues (the device's num-request-queues); QEMU's default is 1. */
  numRequestQueues?: number;
  /** Guest RAM, shared with the vhost-user backend. Defaults to 512. */
  memoryMiB?: number;
  /** vCPUs. Defaults to 1. */
  cpus?: number;
  /** QEMU is killed after this long and bootGuest rejects with the console output so far. */
  timeoutMs: number;
  /** Appended to the kernel command line. */
  kernelArgs?: string[];
  extraQemuArgs?: string[];
  /** Called with each console line as it arrives. With $VMTEST_VERBOSE=1 lines also go to stderr. */
  onConsoleLine?: (line: string) => void;
}

export interface BootTimings {
  /** QEMU start until /init runs (firmware and kernel boot). */
  kernelMs: number;
  /** Loading the modules. */
  modulesMs: number;
  /** The guest script. */
  scriptMs: number;
  /** The script's end until QEMU has exited. */
  shutdownMs: number;
  totalMs: number;
}

export interface BootResult {
  /** The guest script's exit status. */
  exitStatus: number;
  /** Everything on the console. */
  output: string;
  /** RESULT lines by key; a key reported more than once has its values joined with "\n". */
  results: Record<string, string>;
  /** RESULT lines in the order they came. */
  resultList: Array<[key: string, value: string]>;
  timings: BootTimings;
}

export class VmError extends Error {
  constructor(message: string, readonly output: string, readonly qemuStderr: string) {
    super(`${message}\n--- console (last lines) ---\n${lastLines(output, 60)}${qemuStderr.trim() ? `\n--- qemu stderr ---\n${qemuStderr.trim()}` : ''}`);
    this.name = 'VmError';
  }
}

type Marker = 'INIT' | 'BEGIN' | 'EXIT' | 'SETUP-FAILED';

export async function bootGuest(options: BootOptions): Promise<BootResult> {
  if (options.backend && options.virtiofsSocket !== undefined) throw new Error('give backend or virtiofsSocket, not both');
  const nonce = randomBytes(8).toString('hex');
  const dir = mkdtempSync(join(tmpdir(), 'nixcas-vm-'));
  const resultsFile = join(dir, 'results');
  const removeDir = () => rmSync(dir, { recursive: true, force: true });
  const forgetDir = atExit(removeDir);
  try {
    const seen = new Map<Marker, number>();
    const consoleReader = new ConsoleReader(nonce, options.onConsoleLine, (marker) => seen.set(marker, performance.now()));
    const run = await runQemu(qemuArgs(options, nonce, resultsFile), options, consoleReader);
    const output = consoleReader.text();
    const fail = (message: string) => new VmError(message, output, run.stderr);

    // The results channel decides: a guest that finished counts as finished, whatever happened after.
    const channel = parseResults(readIfExists(resultsFile), nonce);
    if (channel.setupFailed !== undefined) throw fail(`guest setup failed: ${channel.setupFailed}`);
    if (channel.exitStatus === undefined) {
      if (run.backendExit !== undefined) {
        throw fail(`the vhost-user backend exited (${run.backendExit}) while the guest was running\n--- backend output ---\n${options.backend!.output().trim()}`);
      }
      if (run.timedOut) throw fail(`guest did not finish within ${options.timeoutMs} ms`);
      throw fail(`QEMU exited (${run.exit}) before the guest script finished`);
    }
    return {
      exitStatus: channel.exitStatus,
      output,
      results: joinResults(channel.resultList),
      resultList: channel.resultList,
      timings: timings(run.start, run.end, seen),
    };
  } finally {
    forgetDir();
    removeDir();
  }
}

interface QemuRun {
  start: number;
  end: number;
  /** Exit code or signal name. */
  exit: string;
  stderr: string;
  timedOut: boolean;
  /** Set when the backend exited while QEMU was still running. */
  backendExit?: string;
}

/** Runs QEMU to its end, killing it on timeout or when the backend dies (a guest waiting on a dead backend never finishes). */
async function runQemu(args: string[], options: BootOptions, consoleReader: ConsoleReader): Promise<QemuRun> {
  const backend = options.backend?.process;
  if (backend && !running(backend)) throw new Error(`the vhost-user backend has already exited (${exitOf(backend)})`);
  const stderr = new OutputTail();
  const start = performance.now();
  const qemu = track(spawn(QEMU, args, { stdio: ['ignore', 'pipe', 'pipe'] }));
  qemu.stdout!.setEncoding('utf8').on('data', (chunk: string) => consoleReader.push(chunk));
  qemu.stderr!.setEncoding('utf8').on('data', (chunk: string) => stderr.push(chunk));
  const spawnError = new Promise<never>((_, reject) => qemu.once('error', reject));

  const run: QemuRun = { start, end: start, exit: '', stderr: '', timedOut: false };
  const timer = setTimeout(() => {
    run.timedOut = true;
    qemu.kill('SIGKILL');
  }, options.timeoutMs);
  // A backend normally exits only after QEMU has closed the socket; give QEMU a moment in case
  // the two exit notifications arrive in the other order.
  let grace: NodeJS.Timeout | undefined;
  const onBackendExit = () => {
    if (!running(qemu)) return;
    run.backendExit = exitOf(backend!);
    grace = setTimeout(() => qemu.kill('SIGKILL'), 500);
  };
  backend?.once('exit', onBackendExit);
  try {
    await Promise.race([exited(qemu), spawnError]);
  } finally {
    clearTimeout(timer);
    clearTimeout(grace);
    backend?.off('exit', onBackendExit);
    qemu.kill('SIGKILL'); // no-op once exited; covers a rejected spawn
  }
  run.end = performance.now();
  run.exit = exitOf(qemu);
  run.stderr = stderr.toString();
  consoleReader.flush();
  return run;
}

// Host-side times between the guest's markers; a missing marker counts as zero-length.
function timings(start: number, end: number, seen: Map<Marker, number>): BootTimings {
  const init = seen.get('INIT') ?? start;
  const begin = seen.get('BEGIN') ?? init;
  const exit = seen.get('EXIT') ?? end;
  return { kernelMs: init - start, modulesMs: begin - init, scriptMs: exit - begin, shutdownMs: end - exit, totalMs: end - start };
}

function running(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null;
}

function exitOf(child: ChildProcess): string {
  return String(child.exitCode ?? child.signalCode);
}

function accel(): string {
  const wanted = process.env.NIXCAS_VMTEST_ACCEL || 'tcg';
  if (wanted !== 'tcg' && wanted !== 'kvm') throw new Error(`NIXCAS_VMTEST_ACCEL=${wanted}: tcg or kvm`);
  return wanted;
}

function qemuArgs(o: BootOptions, nonce: string, resultsFile: string): string[] {
  const mem = o.memoryMiB ?? 512;
  const kernelArgs = ['console=ttyS0', 'quiet', 'panic=-1', `vmtest.nonce=${nonce}`, ...(o.kernelArgs ?? [])];
  const args = [
    // No default NIC/VGA/monitor: less to emulate and no option ROMs to load.
    '-nodefaults', '-no-user-config', '-display', 'none',
    // Nested KVM is unusable on the CI hosts; TCG everywhere keeps timings comparable. A host with
    // working KVM asks for it with NIXCAS_VMTEST_ACCEL=kvm (nix/: mkVMTest's accel).
    '-accel', accel(),
    '-smp', String(o.cpus ?? 1),
    // vhost-user backends map guest RAM, so it must be a shareable memfd.
    '-m', `${mem}M`,
    '-object', `memory-backend-memfd,id=mem,size=${mem}M,share=on`,
    '-numa', 'node,memdev=mem',
    '-kernel', o.initramfs.kernelImage,
    '-initrd', o.initramfs.path,
    '-append', kernelArgs.join(' '),
    // The guest powers off when done; a reboot (panic=-1, triple fault) also ends QEMU instead of looping.
    '-no-reboot',
    '-serial', 'stdio',
    '-serial', `file:${resultsFile}`,
  ];
  const socket = o.backend?.socketPath ?? o.virtiofsSocket;
  if (socket !== undefined) {
    const queues = o.numRequestQueues !== undefined ? `,num-request-queues=${o.numRequestQueues}` : '';
    args.push(
      '-chardev', `socket,id=fs0,path=${socket}`,
      '-device', `vhost-user-fs-pci,chardev=fs0,tag=${o.virtiofsTag ?? 'nixstore'},queue-size=1024${queues}`,
    );
  }
  return [...args, ...(o.extraQemuArgs ?? [])];
}

/** Splits the console stream into lines and spots the boot markers as they arrive (for timings). */
class ConsoleReader {
  private readonly lines: string[] = [];
  private partial = '';
  private readonly markerRe: RegExp;
  private readonly verbose = process.env.VMTEST_VERBOSE === '1';

  constructor(nonce: string, private readonly onLine: ((line: string) => void) | undefined, private readonly onMarker: (m: Marker) => void) {
    // Not anchored: a kernel message can land in front of a marker on the same line.
    this.markerRe = new RegExp(`VMTEST-${nonce} (INIT|BEGIN|EXIT|SETUP-FAILED)\\b`);
  }

  push(chunk: string): void {
    const parts = (this.partial + chunk).split('\n');
    this.partial = parts.pop()!;
    for (const part of parts) this.line(part);
  }

  flush(): void {
    if (this.partial) this.line(this.partial);
    this.partial = '';
  }

  text(): string {
    return this.lines.join('\n');
  }

  private line(raw: string): void {
    const line = raw.replace(/\r/g, '');
    this.lines.push(line);
    const m = this.markerRe.exec(line);
    if (m) this.onMarker(m[1] as Marker);
    if (this.verbose) process.stderr.write(`guest| ${line}\n`);
    this.onLine?.(line);
  }
}

interface Channel {
  resultList: Array<[string, string]>;
  exitStatus?: number;
  setupFailed?: string;
}

function parseResults(text: string, nonce: string): Channel {
  const channel: Channel = { resultList: [] };
  const marker = `VMTEST-${nonce} `;
  for (const raw of text.split('\n')) {
    const line = raw.replace(/\r$/, '');
    if (line.startsWith('RESULT ')) {
      const rest = line.slice('RESULT '.length);
      const space = rest.indexOf(' ');
      channel.resultList.push(space < 0 ? [rest, ''] : [rest.slice(0, space), rest.slice(space + 1)]);
    } else if (line.startsWith(marker + 'EXIT ')) {
      channel.exitStatus = Number(line.slice((marker + 'EXIT ').length));
    } else if (line.startsWith(marker + 'SETUP-FAILED')) {
      channel.setupFailed = line.slice((marker + 'SETUP-FAILED').length).trim();
    }
  }
  return channel;
}

function joinResults(list: Array<[string, string]>): Record<string, string> {
  // No prototype: keys come from the guest, and "__proto__" must be just a key.
  const results: Record<string, string> = Object.create(null);
  for (const [key, value] of list) results[key] = key in results ? `${results[key]}\n${value}` : value;
  return results;
}

// QEMU creates the file at startup; it is missing when QEMU failed before that (bad arguments, no backend).
function readIfExists(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

function lastLines(text: string, n: number): string {
  return text.split('\n').slice(-n).join('\n');
}

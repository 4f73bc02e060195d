// The virtio-fs request path without a guest (issue #21): a scripted Linux-like
// driver (test/virtiofs-driver.ts) drives `nixcas virtiofs` and QEMU's C
// virtiofsd (`-o cache=always`) over the same tree, request for request, at
// depth 1 (one process) and 64 (a guest with a few busy processes). Under TCG
// a guest hides what the back end costs per request; here nothing does.
//
// Each round starts a fresh back end of each kind (alternating which goes
// first), runs every workload once unmeasured (warm-up: JIT, page cache, the
// back ends' inode tables), then measured. Reported per workload: ops/s, wall
// µs per op, the back end's CPU µs per op (schedstat of every thread of its
// process tree: virtiofsd forks into its sandbox), its peak RSS without shared
// memory (the guest RAM it writes into is RssShmem), and the ratio
// virtiofsd time ÷ nixcas time (above 1: nixcas is faster). Every reply is
// checked: bytes against the file, attributes against what each back end must
// say, listings entry by entry.
import { execFileSync, spawn } from 'node:child_process';
import { closeSync, linkSync, lstatSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, statSync, unlinkSync, writeFileSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';
import { type Backend, ensureVmPackages, startNixcasVirtiofs, startVirtiofsd } from '../vmtest/harness.js';
import { FUSE_OUT_HEADER, getattrArgs, nameArg, openArgs, readArgs } from '../test/vhost-user-frontend.js';
import { FuseOp, type Job, type Slot, VirtioFsDriver, writeRequest } from '../test/virtiofs-driver.js';
import { pseudoRandom } from './fuse.js';
import { type Row, median } from './nix.js';

const MIB = 1024 * 1024;
const READ_SIZE = 128 * 1024;
const DIRPLUS_SIZE = 64 * 1024;
const SMALL_SIZE = 4096;
/** Files per small-file set (BENCH_VIRTIOFS_REQUESTS_SMALL_FILES: more, for profiling the path of a file new to the back end). */
const SMALL_FILES = Number(process.env.BENCH_VIRTIOFS_REQUESTS_SMALL_FILES ?? 2000);
const DIR_ENTRIES = 1000;
const BIG_MIB = 64;
const DEPTHS = [1, 64] as const;
/** Request counts are multiplied by this (BENCH_VIRTIOFS_REQUESTS_SCALE; the test runs a small fraction). */
const DEFAULT_SCALE = Number(process.env.BENCH_VIRTIOFS_REQUESTS_SCALE ?? 1);
const ENOSYS = 38;
const S_IFMT = 0o170000;
const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;

/**
 * nixcas-unverified: nixcas with NIXCAS_VERIFY_READS=0, for what verified reads cost.
 * nixcas-metrics: nixcas with --metrics-listen, scraped every second, for what metrics cost
 * (only when BENCH_VIRTIOFS_REQUESTS_SIDES names it).
 */
export type Side = 'nixcas' | 'nixcas-unverified' | 'nixcas-metrics' | 'virtiofsd';

// ---------------------------------------------------------------- the tree

interface Tree {
  name: string;
  big: Buffer;
  /** Contents of dir1000's entries, by name. */
  dirEntries: Map<string, Buffer>;
  /**
   * small-<set>/fNNNN contents: sets for the warm-ups (one at depth 64, then one before each
   * depth's run) and one per depth, so that every file is new to the back end when it is read.
   */
  small: Map<string, Buffer[]>;
}

const SMALL_SETS = ['warm', 'warm-d1', 'warm-d64', 'd1', 'd64'];

function smallName(i: number): string {
  return `f${String(i).padStart(4, '0')}`;
}

function makeTree(root: string): Omit<Tree, 'name'> {
  mkdirSync(root, { recursive: true });
  const big = Buffer.concat(Array.from({ length: BIG_MIB }, (_, i) => pseudoRandom(MIB, 7_000_000 + i)));
  const fd = openSync(join(root, 'big.bin'), 'w');
  for (let at = 0; at < big.length; ) at += writeSync(fd, big, at);
  closeSync(fd);
  const dirEntries = new Map<string, Buffer>();
  mkdirSync(join(root, 'dir1000'));
  for (let i = 0; i < DIR_ENTRIES; i++) {
    const name = `e${String(i).padStart(4, '0')}`;
    const contents = Buffer.from(`entry ${i}\n`);
    writeFileSync(join(root, 'dir1000', name), contents);
    dirEntries.set(name, contents);
  }
  const small = new Map<string, Buffer[]>();
  SMALL_SETS.forEach((set, s) => {
    mkdirSync(join(root, `small-${set}`));
    const files: Buffer[] = [];
    for (let i = 0; i < SMALL_FILES; i++) {
      const contents = pseudoRandom(SMALL_SIZE, 100_000 * (s + 1) + i);
      writeFileSync(join(root, `small-${set}`, smallName(i)), contents);
      files.push(contents);
    }
    small.set(set, files);
  });
  return { big, dirEntries, small };
}

// ---------------------------------------------------------------- back-end processes

/** The process and every descendant (virtiofsd serves from a forked child). */
function processTree(pid: number): number[] {
  const out = [pid];
  for (let i = 0; i < out.length; i++) {
    for (const task of safeReaddir(`/proc/${out[i]}/task`)) {
      const children = safeRead(`/proc/${out[i]}/task/${task}/children`).trim();
      if (children) out.push(...children.split(/\s+/).map(Number));
    }
  }
  return out;
}

/** CPU time of every thread of the tree, in ns (schedstat's first field). */
export function cpuNs(pid: number): number {
  let total = 0;
  for (const p of processTree(pid)) {
    for (const task of safeReaddir(`/proc/${p}/task`)) total += Number(safeRead(`/proc/${p}/task/${task}/schedstat`).split(' ')[0] || 0);
  }
  return total;
}

export interface Rss {
  anon: number;
  file: number;
}

/** Resident memory of the tree without shared memory (guest RAM), in bytes: private, and file pages mapped (LMDB, the binary). */
function rssOf(pid: number): Rss {
  const rss = { anon: 0, file: 0 };
  for (const p of processTree(pid)) {
    const status = safeRead(`/proc/${p}/status`);
    const field = (name: string) => Number(new RegExp(`${name}:\\s+(\\d+)`).exec(status)?.[1] ?? 0) * 1024;
    rss.anon += field('RssAnon');
    rss.file += field('RssFile');
  }
  return rss;
}

/**
 * Pins every thread of these processes to one CPU. At depth 1 the driver and
 * the back end share CPU 0: a strict ping-pong has nothing to overlap, and on
 * this VM a wake-up across vCPUs costs ~30 µs of IPI and idle exit (an eventfd
 * round trip: 3.4 µs on one CPU, 74 µs across two), which a KVM-class host
 * does not charge and which would only add the same noise to both sides. At
 * depth 64 the back end gets CPU 1 to itself, so that it can work while the
 * driver reaps.
 */
function pin(pids: number[], cpu: number): void {
  for (const pid of pids) execFileSync('taskset', ['-a', '-p', '-c', String(cpu), String(pid)], { stdio: 'ignore' });
}

/** The blob file of `size` bytes under `blobs` (big.bin's: the tree's only large file). */
function blobFileOf(blobs: string, size: number): string {
  for (const prefix of readdirSync(blobs)) {
    for (const name of readdirSync(join(blobs, prefix))) {
      if (statSync(join(blobs, prefix, name)).size === size) return join(blobs, prefix, name);
    }
  }
  throw new Error(`no blob file of ${size} bytes under ${blobs}`);
}

function readTree(dir: string): void {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    if (entry.isDirectory()) readTree(join(dir, entry.name));
    else if (entry.isFile()) readFileSync(join(dir, entry.name));
  }
}

function safeReaddir(path: string): string[] {
  try {
    return readdirSync(path);
  } catch {
    return [];
  }
}

function safeRead(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

// ---------------------------------------------------------------- what each back end must answer

interface Expect {
  /** The mode of a regular file with these host permissions. */
  fileMode(hostMode: number): number;
  dirMode(hostMode: number): number;
}

const EXPECT: Record<Side, Expect> = {
  // The store's rules: files 0444 (0555 when executable), directories 0555.
  nixcas: { fileMode: (m) => S_IFREG | (m & 0o100 ? 0o555 : 0o444), dirMode: () => S_IFDIR | 0o555 },
  'nixcas-unverified': { fileMode: (m) => S_IFREG | (m & 0o100 ? 0o555 : 0o444), dirMode: () => S_IFDIR | 0o555 },
  'nixcas-metrics': { fileMode: (m) => S_IFREG | (m & 0o100 ? 0o555 : 0o444), dirMode: () => S_IFDIR | 0o555 },
  // Passthrough: the host's own modes.
  virtiofsd: { fileMode: (m) => m, dirMode: (m) => m },
};

/** Checks the size and mode of the fuse_attr at `at`. */
function checkAttr(what: string, b: Buffer, at: number, size: number, mode: number): void {
  const gotSize = b.readUInt32LE(at + 8) + b.readUInt32LE(at + 12) * 2 ** 32;
  const gotMode = b.readUInt32LE(at + 60);
  if (gotSize !== size || gotMode !== mode) {
    throw new Error(`${what}: size ${gotSize} mode 0${gotMode.toString(8)}, expected size ${size} mode 0${mode.toString(8)}`);
  }
}

function okBody(reply: Buffer, what: string, length?: number): Buffer {
  const error = reply.readInt32LE(4);
  if (error !== 0) throw new Error(`${what}: error ${-error}`);
  if (length !== undefined && reply.length !== FUSE_OUT_HEADER + length) throw new Error(`${what}: ${reply.length - FUSE_OUT_HEADER} reply bytes, expected ${length}`);
  return reply.subarray(FUSE_OUT_HEADER);
}

// ---------------------------------------------------------------- a connected guest

interface Nodes {
  top: bigint;
  big: bigint;
  /** fh of big.bin: 0 once OPEN answered ENOSYS (the kernel then stops opening files). */
  bigHandle: bigint;
  dir: bigint;
  dirHandle: bigint;
  small: Map<string, bigint>;
}

/** The kernel's view of one connection: what it learned (no OPEN, no FLUSH) and the nodes it holds. */
class Guest {
  noOpen = false;
  noFlush = false;
  nodes!: Nodes;
  constructor(
    readonly driver: VirtioFsDriver,
    readonly side: Side,
    readonly tree: Tree,
    readonly share: string,
  ) {}

  async lookup(parent: bigint, name: string): Promise<bigint> {
    const r = await this.driver.call(FuseOp.LOOKUP, parent, nameArg(name));
    if (r.error !== 0) throw new Error(`LOOKUP ${name}: error ${-r.error}`);
    return r.body.readBigUInt64LE(0);
  }

  /** OPEN as Linux does it: once ENOSYS, never again. Returns the handle (0 without). */
  async open(nodeid: bigint, opcode: number = FuseOp.OPEN): Promise<bigint> {
    if (opcode === FuseOp.OPEN && this.noOpen) return 0n;
    const r = await this.driver.call(opcode, nodeid, openArgs(0));
    if (r.error === -ENOSYS && opcode === FuseOp.OPEN) {
      this.noOpen = true;
      return 0n;
    }
    if (r.error !== 0) throw new Error(`OPEN: error ${-r.error}`);
    return r.body.readBigUInt64LE(0);
  }

  async setUp(): Promise<void> {
    const top = await this.lookup(1n, this.tree.name);
    const big = await this.lookup(top, 'big.bin');
    const dir = await this.lookup(top, 'dir1000');
    const small = new Map<string, bigint>();
    for (const set of SMALL_SETS) small.set(set, await this.lookup(top, `small-${set}`));
    this.nodes = { top, big, bigHandle: await this.open(big), dir, dirHandle: await this.open(dir, FuseOp.OPENDIR), small };
  }

  hostMode(relative: string): number {
    return lstatSync(join(this.share, this.tree.name, relative)).mode;
  }
}

// ---------------------------------------------------------------- workloads

export interface Workload {
  name: string;
  /** What one op is (request, or file). */
  unit: string;
  counts: Record<(typeof DEPTHS)[number], number>;
  /** A job doing `count` ops; `set` names the small-file set where that matters. */
  job(guest: Guest, count: number, set: string): Job;
}

/** Hands out op numbers to slots until `count` have been issued. */
function counter(count: number): () => number | undefined {
  let next = 0;
  return () => (next < count ? next++ : undefined);
}

const getattr: Workload = {
  name: 'GETATTR',
  unit: 'request',
  counts: { 1: 20_000, 64: 200_000 },
  job(guest, count) {
    const take = counter(count);
    const mode = EXPECT[guest.side].fileMode(guest.hostMode('big.bin'));
    const args = getattrArgs();
    return {
      issue: (slot) => {
        if (take() === undefined) return false;
        writeRequest(slot, FuseOp.GETATTR, guest.nodes.big, args, true);
        slot.replyLength = FUSE_OUT_HEADER + 104;
        return true;
      },
      complete: (slot, length) => checkAttr('GETATTR big.bin', okBody(slot.reply(length), 'GETATTR', 104), 16, BIG_MIB * MIB, mode),
    };
  },
};

const lookup: Workload = {
  name: 'LOOKUP',
  unit: 'request',
  counts: { 1: 20_000, 64: 200_000 },
  job(guest, count) {
    const take = counter(count);
    const names = [...guest.tree.dirEntries.keys()];
    const args = names.map((n) => nameArg(n));
    const modes = names.map((n) => EXPECT[guest.side].fileMode(guest.hostMode(`dir1000/${n}`)));
    const sizes = names.map((n) => guest.tree.dirEntries.get(n)!.length);
    return {
      issue: (slot) => {
        const n = take();
        if (n === undefined) return false;
        slot.state = n % names.length;
        writeRequest(slot, FuseOp.LOOKUP, guest.nodes.dir, args[slot.state as number], true);
        slot.replyLength = FUSE_OUT_HEADER + 128;
        return true;
      },
      complete: (slot, length) => {
        const i = slot.state as number;
        const body = okBody(slot.reply(length), `LOOKUP ${names[i]}`, 128);
        if (body.readUInt32LE(0) === 0 && body.readUInt32LE(4) === 0) throw new Error(`LOOKUP ${names[i]}: nodeid 0`);
        checkAttr(`LOOKUP ${names[i]}`, body, 40, sizes[i], modes[i]);
      },
    };
  },
};

function readWorkload(pages: boolean): Workload {
  return {
    name: pages ? 'READ 128 KiB, sequential, 4 KiB pages through an indirect table' : 'READ 128 KiB, sequential',
    unit: 'request',
    counts: { 1: 2048, 64: 4096 },
    job(guest, count) {
      const take = counter(count);
      const big = guest.tree.big;
      const args = readArgs(guest.nodes.bigHandle, 0, READ_SIZE);
      return {
        issue: (slot) => {
          const n = take();
          if (n === undefined) return false;
          const offset = (n * READ_SIZE) % big.length;
          slot.state = offset;
          args.writeBigUInt64LE(BigInt(offset), 8);
          writeRequest(slot, FuseOp.READ, guest.nodes.big, args);
          slot.layout = pages ? 'pages' : 'single';
          slot.replyLength = FUSE_OUT_HEADER + READ_SIZE;
          return true;
        },
        complete: (slot, length) => {
          const offset = slot.state as number;
          okBody(slot.header(), `READ big.bin at ${offset}`);
          if (length !== FUSE_OUT_HEADER + READ_SIZE) throw new Error(`READ big.bin at ${offset}: ${length - FUSE_OUT_HEADER} bytes, expected ${READ_SIZE}`);
          if (!slot.bodyEquals(big.subarray(offset, offset + READ_SIZE))) throw new Error(`READ big.bin at ${offset}: wrong bytes`);
        },
      };
    },
  };
}

/** fuse_direntplus entries: checks each against the tree; returns how many. */
function checkDirentPlus(guest: Guest, body: Buffer, modes: Map<string, number>): number {
  let at = 0;
  let count = 0;
  const seen = new Set<string>();
  while (at < body.length) {
    const d = at + 128;
    const namelen = body.readUInt32LE(d + 16);
    const name = body.subarray(d + 24, d + 24 + namelen).toString('latin1');
    if (seen.has(name)) throw new Error(`READDIRPLUS: ${name} twice`);
    seen.add(name);
    if (name !== '.' && name !== '..') {
      const contents = guest.tree.dirEntries.get(name);
      if (!contents) throw new Error(`READDIRPLUS: ${name} is not in dir1000`);
      if (body.readBigUInt64LE(at) === 0n) throw new Error(`READDIRPLUS: ${name} without a nodeid`);
      checkAttr(`READDIRPLUS ${name}`, body, at + 40, contents.length, modes.get(name)!);
    }
    at = d + ((24 + namelen + 7) & ~7);
    count++;
  }
  if (at !== body.length) throw new Error(`READDIRPLUS: ${body.length} bytes do not end on an entry`);
  if (count < 300) throw new Error(`READDIRPLUS: only ${count} entries in ${DIRPLUS_SIZE} bytes`);
  return count;
}

const readdirplus: Workload = {
  name: 'READDIRPLUS 64 KiB of a 1000-entry directory',
  unit: 'request',
  counts: { 1: 300, 64: 1000 },
  job(guest, count) {
    const take = counter(count);
    const modes = new Map([...guest.tree.dirEntries.keys()].map((n) => [n, EXPECT[guest.side].fileMode(guest.hostMode(`dir1000/${n}`))]));
    const args = readArgs(guest.nodes.dirHandle, 0, DIRPLUS_SIZE);
    // The first listing is checked entry by entry; later ones must be the same bytes (or pass the same check).
    let reference: Buffer | undefined;
    return {
      issue: (slot) => {
        if (take() === undefined) return false;
        writeRequest(slot, FuseOp.READDIRPLUS, guest.nodes.dir, args);
        slot.replyLength = FUSE_OUT_HEADER + DIRPLUS_SIZE;
        return true;
      },
      complete: (slot, length) => {
        const body = okBody(slot.reply(length), 'READDIRPLUS dir1000');
        if (reference?.equals(body)) return;
        checkDirentPlus(guest, body, modes);
        reference = Buffer.from(body);
      },
    };
  },
};

/** One file as a process reads it: LOOKUP, (OPEN), READ, (FLUSH, RELEASE), as Linux sends them. */
type SmallStep = 'lookup' | 'open' | 'read' | 'flush' | 'release';
interface SmallState {
  file: number;
  step: SmallStep;
  nodeid: bigint;
  handle: bigint;
}

const smallFiles: Workload = {
  name: 'small files: LOOKUP + READ 4 KiB over 2000 distinct files',
  unit: 'file',
  counts: { 1: SMALL_FILES, 64: SMALL_FILES },
  job(guest, count, set) {
    const take = counter(Math.min(count, SMALL_FILES));
    const files = guest.tree.small.get(set)!;
    const parent = guest.nodes.small.get(set)!;
    const mode = EXPECT[guest.side].fileMode(guest.hostMode(`small-${set}/${smallName(0)}`));
    const names = files.map((_, i) => nameArg(smallName(i)));
    const read = readArgs(0n, 0, SMALL_SIZE);
    const handleArgs = Buffer.alloc(24);
    const open = openArgs(0);
    const send = (slot: Slot, s: SmallState) => {
      switch (s.step) {
        case 'lookup':
          writeRequest(slot, FuseOp.LOOKUP, parent, names[s.file]);
          slot.replyLength = FUSE_OUT_HEADER + 128;
          return;
        case 'open':
          writeRequest(slot, FuseOp.OPEN, s.nodeid, open);
          slot.replyLength = FUSE_OUT_HEADER + 16;
          return;
        case 'read':
          read.writeBigUInt64LE(s.handle, 0);
          writeRequest(slot, FuseOp.READ, s.nodeid, read);
          slot.replyLength = FUSE_OUT_HEADER + SMALL_SIZE;
          return;
        case 'flush':
        case 'release':
          handleArgs.writeBigUInt64LE(s.handle, 0);
          writeRequest(slot, s.step === 'flush' ? FuseOp.FLUSH : FuseOp.RELEASE, s.nodeid, handleArgs);
          slot.replyLength = FUSE_OUT_HEADER;
          return;
      }
    };
    const afterRead = (s: SmallState): SmallStep | undefined => (s.handle === 0n ? undefined : guest.noFlush ? 'release' : 'flush');
    return {
      issue: (slot) => {
        const s = slot.state as SmallState | undefined;
        if (!s || s.step === 'lookup') {
          // A new file (the previous one is done).
          const file = take();
          if (file === undefined) return false;
          slot.state = { file, step: 'lookup', nodeid: 0n, handle: 0n } satisfies SmallState;
        }
        send(slot, slot.state as SmallState);
        return true;
      },
      complete: (slot, length) => {
        const reply = slot.reply(length);
        const s = slot.state as SmallState;
        const what = `${s.step.toUpperCase()} small-${set}/${smallName(s.file)}`;
        let next: SmallStep | undefined;
        switch (s.step) {
          case 'lookup': {
            const body = okBody(reply, what, 128);
            s.nodeid = body.readBigUInt64LE(0);
            checkAttr(what, body, 40, SMALL_SIZE, mode);
            next = guest.noOpen ? 'read' : 'open';
            break;
          }
          case 'open':
            if (reply.readInt32LE(4) === -ENOSYS) guest.noOpen = true;
            else s.handle = okBody(reply, what, 16).readBigUInt64LE(0);
            next = 'read';
            break;
          case 'read':
            if (!okBody(reply, what, SMALL_SIZE).equals(files[s.file])) throw new Error(`${what}: wrong bytes`);
            next = afterRead(s);
            break;
          case 'flush':
            if (reply.readInt32LE(4) === -ENOSYS) guest.noFlush = true;
            else okBody(reply, what, 0);
            next = 'release';
            break;
          case 'release':
            okBody(reply, what, 0);
            break;
        }
        // Done with this file: the next issue starts another.
        s.step = next ?? 'lookup';
      },
    };
  },
};

/** BENCH_VIRTIOFS_REQUESTS_WORKLOADS=GETATTR,small picks workloads by (part of) their names; `=NAME` one by its whole name. */
const WORKLOADS = [getattr, lookup, readWorkload(false), readWorkload(true), readdirplus, smallFiles].filter(
  (w) => {
    const wanted = process.env.BENCH_VIRTIOFS_REQUESTS_WORKLOADS;
    if (!wanted) return true;
    return wanted.startsWith('=') ? w.name === wanted.slice(1) : wanted.split(',').some((part) => w.name.includes(part));
  },
);
/** For profiling: BENCH_VIRTIOFS_REQUESTS_SIDES=nixcas, and node's own flags for it (e.g. --cpu-prof) in BENCH_VIRTIOFS_REQUESTS_NODE_ARGS. */
const SIDES = (process.env.BENCH_VIRTIOFS_REQUESTS_SIDES?.split(',') ?? ['nixcas', 'nixcas-unverified', 'virtiofsd']) as Side[];

// ---------------------------------------------------------------- measuring

export interface Sample {
  ops: number;
  wallNs: number;
  cpuNs: number;
  requests: number;
  interrupts: number;
  kicks: number;
  /** CPU of this process (the driver) meanwhile: a back end can look no faster than the driver can go. */
  driverNs: number;
}

export interface Measured {
  samples: Record<Side, Sample[]>;
  workload: Workload;
  depth: number;
}

async function measureSide(side: Side, backend: Backend, tree: Tree, share: string, results: Map<string, Measured>, rss: Record<Side, Rss>, scale: number): Promise<void> {
  const pid = backend.process.pid!;
  const driver = await VirtioFsDriver.connect(backend.socketPath, { maxDepth: 64, queueSize: 256 });
  try {
    const guest = new Guest(driver, side, tree, share);
    await guest.setUp();
    for (const workload of WORKLOADS) {
      // Warm-up: a tenth of the depth-64 count (small files: their own set)...
      pin([process.pid], 0);
      pin(processTree(pid), 1);
      await driver.run(workload.job(guest, Math.max(64, Math.round((workload.counts[64] * scale) / 10)), 'warm'), 64);
      for (const depth of DEPTHS) {
        if (process.env.BENCH_VIRTIOFS_REQUESTS_DEPTHS && !process.env.BENCH_VIRTIOFS_REQUESTS_DEPTHS.split(',').includes(String(depth))) continue;
        pin([process.pid], 0);
        pin(processTree(pid), depth === 1 ? 0 : 1);
        // And a tenth at this depth, pinned as measured: a JIT compiles the paths one depth takes
        // (depth 1 waits for each kick, depth 64 takes batches) on first use, on the back end's clock.
        // Small files: a whole set of files new to the back end, as many as measured (a tenth
        // left the path of a new file still being compiled while it was measured: 80–95 µs a file
        // at depth 1 for nixcas, against 38 in a long run).
        const warmCount = Math.round((workload.counts[depth] * scale) / (workload.unit === 'file' ? 1 : 10));
        await driver.run(workload.job(guest, Math.max(depth, warmCount), `warm-d${depth}`), depth);
        const count = Math.max(depth, Math.round(workload.counts[depth] * scale));
        // For profiling a steady state: the measured job run this many times more first (small files then known).
        for (let i = 0; i < Number(process.env.BENCH_VIRTIOFS_REQUESTS_REPEAT ?? 0); i++) await driver.run(workload.job(guest, count, `d${depth}`), depth);
        const job = workload.job(guest, count, `d${depth}`);
        const cpuBefore = cpuNs(pid);
        const driverBefore = process.cpuUsage();
        const result = await driver.run(job, depth);
        const cpu = cpuNs(pid) - cpuBefore;
        const driverUsage = process.cpuUsage(driverBefore);
        const now = rssOf(pid);
        if (now.anon + now.file > rss[side].anon + rss[side].file) {
          rss[side] = now;
          // Where the resident memory is, mapping by mapping, for profiling it.
          const smapsTo = process.env.BENCH_VIRTIOFS_REQUESTS_SMAPS;
          if (smapsTo) writeFileSync(`${smapsTo}.${side}`, processTree(pid).map((p) => safeRead(`/proc/${p}/smaps`)).join(''));
        }
        const ops = workload.unit === 'file' ? Math.min(count, SMALL_FILES) : result.requests;
        const key = `${workload.name}@${depth}`;
        const entry = results.get(key) ?? { samples: { nixcas: [], 'nixcas-unverified': [], 'nixcas-metrics': [], virtiofsd: [] }, workload, depth };
        entry.samples[side].push({ ops, wallNs: result.wallNs, cpuNs: cpu, requests: result.requests, interrupts: result.interrupts, kicks: result.kicks, driverNs: (driverUsage.user + driverUsage.system) * 1000 });
        results.set(key, entry);
      }
    }
  } finally {
    driver.close();
  }
}

function fmt(n: number, digits = 1): string {
  return n >= 100 ? n.toFixed(0) : n.toFixed(digits);
}

export interface RequestRun {
  results: Map<string, Measured>;
  rss: Record<Side, Rss>;
  /** nixcas-metrics only: the back end's CPU per /metrics scrape, one entry per round. */
  scrapeCosts: { cpuMicros: number; bytes: number }[];
  /** nixcas-metrics only: READs it read into a buffer of its own rather than into the guest's pages, one entry per round. */
  bufferedReads: number[];
}

/**
 * Makes the tree, then per round starts each back end and runs every
 * workload at each depth. Throws at the first wrong answer from either.
 */
export async function runVirtiofsRequests(work: string, repeats: number, cli: string, scale = DEFAULT_SCALE, sides: Side[] = SIDES): Promise<RequestRun> {
  const source = join(work, 'requests');
  console.error('bench virtiofs-requests: making the tree');
  const made = makeTree(source);
  const store = join(work, 'store');
  const storePath = execFileSync(process.execPath, [cli, 'import', '--store', store, source], { encoding: 'utf8' }).trim();
  const name = basename(storePath);
  const share = join(work, 'share');
  mkdirSync(share);
  renameSync(source, join(share, name));
  // Both back ends read big.bin from the same page-cache pages: virtiofsd's copy is a hard link to
  // nixcas's blob file. How a file's pages came into the cache (one large buffered write, or
  // readahead after an O_DIRECT write) changes what the kernel's copy of 128 KiB costs by up to 3×
  // on this VM (docs/benchmarks.md), which would otherwise decide the READ rows.
  const bigShared = join(share, name, 'big.bin');
  unlinkSync(bigShared);
  linkSync(blobFileOf(join(store, 'blobs'), BIG_MIB * MIB), bigShared);
  // Both back ends serve from the page cache: the import wrote big.bin's blob around it (O_DIRECT).
  readTree(join(store, 'blobs'));
  const tree: Tree = { name, ...made };
  const results = new Map<string, Measured>();
  const rss: Record<Side, Rss> = { nixcas: { anon: 0, file: 0 }, 'nixcas-unverified': { anon: 0, file: 0 }, 'nixcas-metrics': { anon: 0, file: 0 }, virtiofsd: { anon: 0, file: 0 } };
  const scrapeCosts: { cpuMicros: number; bytes: number }[] = [];
  const bufferedReads: number[] = [];
  for (let round = 0; round < repeats; round++) {
    const all: Side[] = ['nixcas', 'virtiofsd', 'nixcas-unverified', 'nixcas-metrics'];
    const order = (round % 2 === 0 ? all : [...all].reverse()).filter((side) => sides.includes(side));
    for (const side of order) {
      const socketPath = join(work, `${side}-${round}.sock`);
      console.error(`bench virtiofs-requests: round ${round + 1} of ${repeats}, ${side}`);
      const backend =
        side !== 'virtiofsd'
          ? await startNixcasVirtiofs({
              socketPath, store, cli, nodeArgs: process.env.BENCH_VIRTIOFS_REQUESTS_NODE_ARGS?.split(' ').filter(Boolean),
              env: side === 'nixcas-unverified' ? { ...process.env, NIXCAS_VERIFY_READS: '0' } : undefined,
              extraArgs: [...(side === 'nixcas-metrics' ? ['--metrics-listen', '127.0.0.1:0'] : []), ...(process.env.BENCH_VIRTIOFS_REQUESTS_NIXCAS_ARGS?.split(' ').filter(Boolean) ?? [])],
            })
          : await startVirtiofsd({ source: share, socketPath, cache: 'always' });
      // Prometheus' part, from another process (the driver's CPU must stay the driver's): a scrape a second.
      const metricsUrl = side === 'nixcas-metrics' ? /metrics at (http:\S+)/.exec(backend.output())?.[1] : undefined;
      if (side === 'nixcas-metrics' && !metricsUrl) throw new Error(`nixcas-metrics: no metrics address in its output: ${backend.output()}`);
      const scraper = metricsUrl
        ? spawn(process.execPath, ['-e', `setInterval(() => fetch(${JSON.stringify(metricsUrl)}).then((r) => r.text()).catch(() => {}), 1000)`], { stdio: 'ignore' })
        : undefined;
      try {
        await measureSide(side, backend, tree, share, results, rss, scale);
        if (metricsUrl) {
          scraper?.kill();
          const text = await (await fetch(metricsUrl)).text();
          bufferedReads.push(Number(/^nixcas_fuse_buffered_reads_total (\d+)$/m.exec(text)?.[1] ?? NaN));
          scrapeCosts.push(await scrapeCost(metricsUrl, backend.process.pid!));
        }
      } catch (err) {
        throw new Error(`${side}: ${(err as Error).message}\n--- back end output ---\n${backend.output().trim()}`);
      } finally {
        scraper?.kill();
        await backend.stop();
        if (process.env.BENCH_VIRTIOFS_REQUESTS_SHOW_OUTPUT) console.error(`--- ${side} output ---\n${backend.output()}`);
      }
    }
  }
  return { results, rss, scrapeCosts, bufferedReads };
}

const SCRAPES = 200;

/** The back end's CPU for one /metrics scrape, in µs: SCRAPES scrapes one after another, after the workloads. */
async function scrapeCost(url: string, pid: number): Promise<{ cpuMicros: number; bytes: number }> {
  let bytes = 0;
  const before = cpuNs(pid);
  for (let i = 0; i < SCRAPES; i++) {
    const response = await fetch(url);
    if (response.status !== 200) throw new Error(`GET ${url}: ${response.status}`);
    bytes = (await response.text()).length;
  }
  return { cpuMicros: (cpuNs(pid) - before) / 1000 / SCRAPES, bytes };
}

export async function benchVirtiofsRequests(rows: Row[], work: string, repeats: number, cli: string): Promise<void> {
  if (process.getuid?.() !== 0) {
    console.error('bench virtiofs-requests: skipped (QEMU\'s virtiofsd needs root)');
    return;
  }
  ensureVmPackages({ install: true });
  const { results, rss, scrapeCosts } = await runVirtiofsRequests(work, repeats, cli);

  console.log(`\n### virtio-fs requests without a guest (${repeats} rounds, medians; back-end CPU of all its threads)\n`);
  console.log('| workload | depth | nixcas ops/s | virtiofsd ops/s | nixcas wall µs/op | virtiofsd wall µs/op | nixcas CPU µs/op | virtiofsd CPU µs/op | ratio (virtiofsd time ÷ nixcas time) |');
  console.log('|---|---|---|---|---|---|---|---|---|');
  const ratios: Record<number, number[]> = { 1: [], 64: [] };
  const interruptLines: string[] = [];
  const costLines: string[] = [];
  const metricsLines: string[] = [];
  for (const { samples, workload, depth } of results.values()) {
    const stat = (side: Side) => {
      const s = samples[side];
      return {
        opsPerSecond: median(s.map((x) => x.ops / (x.wallNs / 1e9))),
        wall: median(s.map((x) => x.wallNs / 1e3 / x.ops)),
        cpu: median(s.map((x) => x.cpuNs / 1e3 / x.ops)),
        interrupts: median(s.map((x) => x.interrupts / x.requests)),
        kicks: median(s.map((x) => x.kicks / x.requests)),
        driver: median(s.map((x) => x.driverNs / 1e3 / x.ops)),
      };
    };
    const per = workload.unit === 'file' ? ' (per file)' : '';
    if (samples.nixcas.length && samples['nixcas-unverified'].length) {
      const ours = stat('nixcas');
      const unchecked = stat('nixcas-unverified');
      costLines.push(`| ${workload.name}${per} | ${depth} | ${fmt(ours.opsPerSecond)} | ${fmt(unchecked.opsPerSecond)} | ${fmt(ours.cpu)} | ${fmt(unchecked.cpu)} | ${(unchecked.wall / ours.wall).toFixed(2)} |`);
      rows.push({ capability: `what verified reads cost: virtio-fs ${workload.name}, depth ${depth}${per}`, ours: ours.opsPerSecond, peer: unchecked.opsPerSecond, unit: 'ops/s', peerName: 'nixcas with NIXCAS_VERIFY_READS=0', target: 0.9 });
    }
    if (samples.nixcas.length && samples['nixcas-metrics'].length) {
      const off = stat('nixcas');
      const on = stat('nixcas-metrics');
      metricsLines.push(`| ${workload.name}${per} | ${depth} | ${fmt(off.opsPerSecond)} | ${fmt(on.opsPerSecond)} | ${fmt(off.cpu)} | ${fmt(on.cpu)} | ${(off.wall / on.wall).toFixed(2)} |`);
      rows.push({ capability: `what metrics cost: virtio-fs ${workload.name}, depth ${depth}${per}`, ours: on.opsPerSecond, peer: off.opsPerSecond, unit: 'ops/s', peerName: 'nixcas without --metrics-listen', target: 0.97 });
    }
    if (samples.nixcas.length === 0 || samples.virtiofsd.length === 0) {
      const side = samples.nixcas.length ? 'nixcas' : 'virtiofsd';
      const one = stat(side);
      console.log(`| ${workload.name} | ${depth} | ${side} only: ${fmt(one.opsPerSecond)} ops/s, wall ${fmt(one.wall)} µs, CPU ${fmt(one.cpu)} µs, driver ${fmt(one.driver)} µs |`);
      continue;
    }
    const ours = stat('nixcas');
    const peer = stat('virtiofsd');
    const ratio = peer.wall / ours.wall;
    ratios[depth].push(ratio);
    console.log(`| ${workload.name}${per} | ${depth} | ${fmt(ours.opsPerSecond)} | ${fmt(peer.opsPerSecond)} | ${fmt(ours.wall)} | ${fmt(peer.wall)} | ${fmt(ours.cpu)} | ${fmt(peer.cpu)} | ${ratio.toFixed(2)} |`);
    interruptLines.push(`| ${workload.name} | ${depth} | ${ours.interrupts.toFixed(3)} / ${peer.interrupts.toFixed(3)} | ${ours.kicks.toFixed(3)} / ${peer.kicks.toFixed(3)} | ${fmt(ours.driver)} / ${fmt(peer.driver)} |`);
    rows.push({ capability: `virtio-fs requests: ${workload.name}, depth ${depth}${per}`, ours: ours.opsPerSecond, peer: peer.opsPerSecond, unit: 'ops/s', peerName: 'virtiofsd, cache=always', target: 1.0 });
  }
  console.log('\n| workload | depth | interrupts per request (nixcas / virtiofsd) | kicks per request (nixcas / virtiofsd) | driver CPU µs/op (nixcas / virtiofsd) |');
  console.log('|---|---|---|---|---|');
  for (const line of interruptLines) console.log(line);
  if (costLines.length) {
    console.log('\n| workload | depth | nixcas ops/s | unverified ops/s | nixcas CPU µs/op | unverified CPU µs/op | ratio (unverified time ÷ verified time, target ≥ 0.9) |');
    console.log('|---|---|---|---|---|---|---|');
    for (const line of costLines) console.log(line);
  }
  if (metricsLines.length) {
    console.log('\n| workload | depth | without metrics ops/s | with metrics ops/s | without CPU µs/op | with CPU µs/op | ratio (without time ÷ with time, target ≥ 0.97) |');
    console.log('|---|---|---|---|---|---|---|');
    for (const line of metricsLines) console.log(line);
  }
  if (scrapeCosts.length) {
    // What a scrape adds, whatever the noise of the rows above: its CPU, against one core per second of serving.
    const cost = [...scrapeCosts].sort((a, b) => a.cpuMicros - b.cpuMicros)[scrapeCosts.length >> 1]!;
    console.log(`\nOne /metrics scrape (${cost.bytes} bytes) costs the back end ${cost.cpuMicros.toFixed(0)} µs of CPU (median of ${scrapeCosts.length} rounds of ${SCRAPES} scrapes): ` +
      `at one scrape a second, ${(cost.cpuMicros / 1e4).toFixed(3)} % of a core serving requests (at Prometheus' default of one every 15 s, ${(cost.cpuMicros / 15e4).toFixed(4)} %).`);
    rows.push({ capability: 'what metrics cost: back-end CPU per /metrics scrape', ours: cost.cpuMicros, peer: 1e6, unit: 'µs', peerName: 'a core-second of serving', lowerIsBetter: true, note: cost.cpuMicros / 1e6 <= 0.03 ? 'met (≤ 3 % at one scrape a second)' : 'MISSED (≤ 3 %)' });
  }
  const geomean = (values: number[]) => Math.exp(values.reduce((a, v) => a + Math.log(v), 0) / values.length);
  console.log(`\nGeometric mean of the ratios: depth 1 ${geomean(ratios[1]).toFixed(2)}, depth 64 ${geomean(ratios[64]).toFixed(2)} (target ≥ 1.5).`);
  const mb = (r: Rss) => `${((r.anon + r.file) / MIB).toFixed(0)} MB (${(r.anon / MIB).toFixed(0)} MB private, ${(r.file / MIB).toFixed(0)} MB of mapped files)`;
  console.log(`Peak RSS without shared memory: nixcas ${mb(rss.nixcas)}, virtiofsd ${mb(rss.virtiofsd)} (target ≤ 100 MB).`);
  rows.push({ capability: 'virtio-fs requests: geometric mean of the ratios at depth 64', ours: geomean(ratios[64]), peer: 1, unit: '×', peerName: 'virtiofsd', target: 1.5 });
  rows.push({ capability: 'virtio-fs requests: peak RSS while serving (without guest RAM)', ours: (rss.nixcas.anon + rss.nixcas.file) / MIB, peer: (rss.virtiofsd.anon + rss.virtiofsd.file) / MIB, unit: 'MB', peerName: 'virtiofsd', lowerIsBetter: true, note: (rss.nixcas.anon + rss.nixcas.file) / MIB <= 100 ? 'met (≤ 100 MB)' : 'MISSED (≤ 100 MB)' });
}

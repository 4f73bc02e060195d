// `nixcas mount` against squashfuse_ll (issue #4): the same trees served by
// both FUSE servers at the same time, read with ordinary tools (tar, dd,
// find). The squashfs image is made without any compression, so neither side
// decompresses: both only answer FUSE requests from files on the same disk.
//
// "Cold" runs page out what the servers have mapped of their files and drop
// the page cache, dentries and inodes before every run (which also drops what
// the kernel cached for both FUSE mounts); "warm" runs repeat the work with
// everything the kernel cached kept.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, type Hash } from 'node:crypto';
import { closeSync, createReadStream, lstatSync, mkdirSync, openSync, readFileSync, readdirSync, readlinkSync, renameSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';
import { type Row, median } from './nix.js';

const MIB = 1024 * 1024;
/** mksquashfs options: no compression of inodes, data, fragments, xattrs; no xattrs at all. */
const SQUASHFS_OPTIONS = ['-noI', '-noD', '-noF', '-noX', '-no-xattrs'];
/** A run that takes longer than this is a hang: it is killed and the bench fails. */
const RUN_TIMEOUT_MS = Number(process.env.BENCH_FUSE_TIMEOUT_S ?? 600) * 1000;

/** unverified: a second nixcas mount with NIXCAS_VERIFY_READS=0, for what verified reads cost. */
type Side = 'ours' | 'peer' | 'unverified';

// ---------------------------------------------------------------- tools

/** squashfuse_ll, mksquashfs and python3 (see PAGE_OUT), installed with apt-get when missing (the bench runs as root). */
function ensureTools(): void {
  const have = (tool: string) => spawnSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' }).status === 0;
  const tools = ['squashfuse_ll', 'mksquashfs', 'python3'];
  if (tools.every(have)) return;
  console.error('bench fuse: installing squashfuse, squashfs-tools and python3 with apt-get');
  const result = spawnSync('sh', ['-c', 'apt-get update && apt-get install -y squashfuse squashfs-tools python3'], { stdio: ['ignore', 'ignore', 'inherit'] });
  if (result.status !== 0 || !tools.every(have)) {
    throw new Error(`bench fuse needs ${tools.join(', ')}: \`apt-get install squashfuse squashfs-tools python3\` failed; install them and run again`);
  }
}

function requireRoot(): void {
  // Dropping caches (and mounting without fusermount3) needs root.
  if (process.getuid?.() !== 0) throw new Error('bench fuse must run as root: it drops the page cache before every cold run');
}

function dropCaches(): void {
  spawnSync('sync');
  writeFileSync('/proc/sys/vm/drop_caches', '3');
}

/**
 * drop_caches leaves alone page-cache pages that a process has mapped, and
 * nixcas mount maps its LMDB file (directories and small blobs): without
 * this its "cold" runs would read small files from memory while squashfuse_ll
 * reads its image from disk. MADV_PAGEOUT through process_madvise(2) reclaims
 * a process's mapped pages; Node has no binding for it, hence python3.
 */
const PAGE_OUT = `
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ranges = [[int(x, 16) for x in r.split('-')] for r in sys.argv[2:]]
iov = (ctypes.c_size_t * (2 * len(ranges)))(*[v for a, b in ranges for v in (a, b - a)])
SYS_process_madvise, MADV_PAGEOUT = 440, 21
if libc.syscall(SYS_process_madvise, os.pidfd_open(int(sys.argv[1])), iov, len(ranges), MADV_PAGEOUT, 0) < 0:
    sys.exit('process_madvise: ' + os.strerror(ctypes.get_errno()))
`;

/** Pages out `pid`'s mappings of files under `dir` (then drop_caches can drop them); returns how many MB were resident. */
export function pageOutMappedFiles(pid: number, dir: string): number {
  const ranges: string[] = [];
  let residentKb = 0;
  let inside = false;
  // smaps: a header line per mapping ("start-end perms offset dev inode path"), then its counters.
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const header = /^([0-9a-f]+-[0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (header) {
      inside = header[2]!.startsWith(`${dir}/`);
      if (inside) ranges.push(header[1]!);
    } else if (inside && line.startsWith('Rss:')) {
      residentKb += Number(/(\d+) kB/.exec(line)?.[1] ?? 0);
    }
  }
  if (ranges.length === 0) return 0;
  const result = spawnSync('python3', ['-c', PAGE_OUT, String(pid), ...ranges], { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`paging out the mapped files of pid ${pid} failed: ${result.stderr || result.error?.message}`);
  return residentKb / 1024;
}

/** Everything the servers could have cached about the trees is gone after this. */
function makeCold(mounts: Partial<Record<Side, Mount>>, work: string): void {
  for (const mount of Object.values(mounts)) pageOutMappedFiles(mount!.child.pid!, work);
  dropCaches();
}

// ---------------------------------------------------------------- trees

/** Deterministic bytes (xorshift32), so runs compare and no two files are alike. */
export function pseudoRandom(size: number, seed: number): Buffer {
  const out = Buffer.alloc(Math.ceil(size / 4) * 4);
  const words = new Uint32Array(out.buffer, out.byteOffset, out.length / 4);
  let x = Math.imul(seed, 2654435761) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  return out.subarray(0, size);
}

interface TreeStats {
  files: number;
  bytes: number;
  /** Everything `find ROOT` prints, the root included. */
  entries: number;
}

/** Many small files (1–16 KiB) in 100 directories; every 10th executable, every 20th with a symlink to it. */
function makeSmallTree(root: string, files: number): TreeStats {
  const stats: TreeStats = { files: 0, bytes: 0, entries: 1 };
  for (let d = 0; d < 100; d++) {
    mkdirSync(join(root, `d${String(d).padStart(2, '0')}`), { recursive: true });
    stats.entries++;
  }
  for (let i = 0; i < files; i++) {
    const dir = join(root, `d${String(i % 100).padStart(2, '0')}`);
    const size = 1024 + ((i * 7919) % (15 * 1024 + 1));
    writeFileSync(join(dir, `f${i}`), pseudoRandom(size, i + 1), { mode: i % 10 === 0 ? 0o755 : 0o644 });
    stats.files++;
    stats.bytes += size;
    stats.entries++;
    if (i % 20 === 0) {
      symlinkSync(`f${i}`, join(dir, `l${i}`));
      stats.entries++;
    }
  }
  return stats;
}

/** One large file, written a MiB at a time (every MiB distinct). */
function makeLargeTree(root: string, mib: number): TreeStats {
  mkdirSync(root, { recursive: true });
  const fd = openSync(join(root, 'big.bin'), 'w');
  try {
    for (let i = 0; i < mib; i++) {
      const block = pseudoRandom(MIB, 1_000_000 + i);
      for (let written = 0; written < block.length; ) written += writeSync(fd, block, written);
    }
  } finally {
    closeSync(fd);
  }
  return { files: 1, bytes: mib * MIB, entries: 2 };
}

/** One directory of many tiny files: listing it is all lookups and attributes. */
function makeWideTree(root: string, files: number): TreeStats {
  mkdirSync(root, { recursive: true });
  let bytes = 0;
  for (let i = 0; i < files; i++) {
    const content = `wide file ${i}\n`;
    writeFileSync(join(root, `n${String(i).padStart(5, '0')}`), content);
    bytes += content.length;
  }
  return { files, bytes, entries: files + 1 };
}

/**
 * A digest of what a tree shows a reader: names, kinds, the executable bit,
 * symlink targets and file contents (not modes otherwise, owners or times,
 * which the two mounts present differently on purpose).
 */
async function treeDigest(root: string): Promise<string> {
  const hash = createHash('sha256');
  const walk = async (dir: string, prefix: string): Promise<void> => {
    for (const name of readdirSync(dir).sort()) {
      const path = join(dir, name);
      const st = lstatSync(path);
      const rel = `${prefix}${name}`;
      if (st.isDirectory()) {
        hash.update(`d ${rel}\0`);
        await walk(path, `${rel}/`);
      } else if (st.isSymbolicLink()) {
        hash.update(`l ${rel} ${readlinkSync(path)}\0`);
      } else {
        hash.update(`f ${rel} ${st.mode & 0o100 ? 'x' : '-'} ${st.size}\0`);
        await hashFile(path, hash);
      }
    }
  };
  await walk(root, '');
  return hash.digest('hex');
}

async function hashFile(path: string, hash: Hash): Promise<void> {
  for await (const chunk of createReadStream(path, { highWaterMark: MIB })) hash.update(chunk as Buffer);
}

// ---------------------------------------------------------------- mounts

interface Mount {
  label: string;
  mountpoint: string;
  child: ChildProcess;
  exited: Promise<number | null>;
  /** Everything the server wrote to stderr so far. */
  stderr: () => string;
}

function isMounted(mountpoint: string): boolean {
  // Field 5 of mountinfo is the mount point (our paths have no characters it would escape).
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[4] === mountpoint);
}

/** Starts a FUSE server that stays in the foreground; resolves once `ready` says it is mounted. */
function startMount(label: string, command: string, args: string[], mountpoint: string, ready: (stderr: string) => boolean, env = process.env): Promise<Mount> {
  mkdirSync(mountpoint, { recursive: true });
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'], env });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code, signal) => resolve(code ?? (signal ? -1 : null))));
  const mount: Mount = { label, mountpoint, child, exited, stderr: () => stderr };
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + 30_000;
    const poll = setInterval(() => {
      if (ready(stderr) && isMounted(mountpoint)) {
        clearInterval(poll);
        resolve(mount);
      } else if (child.exitCode !== null || child.signalCode !== null || Date.now() > deadline) {
        clearInterval(poll);
        void stopMount(mount).finally(() => reject(new Error(`${label} did not mount ${mountpoint}: ${stderr.trim() || 'no output'}`)));
      }
    }, 20);
  });
}

function mountNixcas(cli: string, store: string, mountpoint: string, env = process.env): Promise<Mount> {
  return startMount('nixcas mount', process.execPath, [cli, 'mount', mountpoint, '--store', store], mountpoint, (err) => err.includes('mounted at'), env);
}

function mountSquashfuse(image: string, mountpoint: string): Promise<Mount> {
  // -f: stay in the foreground, so we hold its pid (for its RSS and to stop it).
  return startMount('squashfuse_ll', 'squashfuse_ll', ['-f', image, mountpoint], mountpoint, () => true);
}

/** SIGTERM (both servers unmount on it), then SIGKILL and a lazy umount if that did not do it. Never throws. */
async function stopMount(mount: Mount): Promise<void> {
  const waitExit = (ms: number) => Promise.race([mount.exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);
  try {
    if (mount.child.exitCode === null && mount.child.signalCode === null) {
      mount.child.kill('SIGTERM');
      if (!(await waitExit(10_000))) {
        console.error(`bench fuse: ${mount.label} did not exit on SIGTERM; killing it`);
        mount.child.kill('SIGKILL');
        await waitExit(5_000);
      }
    }
    if (isMounted(mount.mountpoint)) {
      console.error(`bench fuse: ${mount.mountpoint} still mounted after ${mount.label} exited; umount -l`);
      spawnSync('umount', ['-l', mount.mountpoint], { stdio: 'inherit' });
    }
  } catch (err) {
    console.error(`bench fuse: stopping ${mount.label}: ${(err as Error).message}`);
  }
}

function statusMb(pid: number, field: string): number {
  try {
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) / 1024 : 0;
  } catch {
    return 0; // exited
  }
}

// ---------------------------------------------------------------- runs

interface RunOutput {
  seconds: number;
  stdout: string;
  stderr: string;
}

/** Runs a shell pipeline in `cwd`, timed from spawn to exit; killed (whole group) on a hang. */
function timedShell(script: string, cwd: string): Promise<RunOutput> {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const child = spawn('sh', ['-c', script], { cwd, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d) => (stdout += d));
    child.stderr!.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => {
      try {
        process.kill(-child.pid!, 'SIGKILL'); // the whole pipeline: sh -c is its group leader (detached)
      } catch {
        // it ended just now
      }
      reject(new Error(`\`${script}\` in ${cwd} hung for ${RUN_TIMEOUT_MS / 1000} s; killed`));
    }, RUN_TIMEOUT_MS);
    child.once('close', (code) => {
      clearTimeout(timer);
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      if (code !== 0) reject(new Error(`\`${script}\` in ${cwd} exited with ${code}: ${stderr.trim()}`));
      else resolve({ seconds, stdout, stderr });
    });
  });
}

/**
 * One thing to measure: a pipeline run inside a mount's root, and how much
 * work a run did (checked against what the tree holds, so a short read or a
 * missing entry fails the bench instead of looking fast).
 */
interface Workload {
  label: string;
  script: string;
  unit: string;
  /** The work done by one run (bytes, entries), from its output; throws when it is wrong. */
  amount: (run: RunOutput, who: Side) => number;
  /** Work units per `unit` (1e6 for MB/s). */
  scale: number;
  target?: number;
}

/** Median rate of each side over `repeats` runs, alternating who goes first. */
async function measure(workload: Workload, mounts: Record<Side, Mount>, work: string, repeats: number, cold: boolean): Promise<Record<Side, number>> {
  const sides: Side[] = ['ours', 'peer', 'unverified'];
  const rates: Record<Side, number[]> = { ours: [], peer: [], unverified: [] };
  if (!cold) for (const who of sides) await timedShell(workload.script, mounts[who].mountpoint); // warm-up
  for (let i = 0; i < repeats; i++) {
    const order = i % 2 === 0 ? sides : [...sides].reverse();
    for (const who of order) {
      if (cold) makeCold(mounts, work);
      const run = await timedShell(workload.script, mounts[who].mountpoint);
      rates[who].push(workload.amount(run, who) / workload.scale / run.seconds);
    }
  }
  // This VM's cold runs vary a lot (for both sides): keep the spread in the log.
  const spread = (who: Side) => `${Math.min(...rates[who]).toFixed(0)}–${Math.max(...rates[who]).toFixed(0)}`;
  console.error(`bench fuse:   ${workload.unit}: nixcas ${spread('ours')}, squashfuse_ll ${spread('peer')}, nixcas unverified ${spread('unverified')} (${repeats} runs each)`);
  return { ours: median(rates.ours), peer: median(rates.peer), unverified: median(rates.unverified) };
}

function expectEqual(what: string, got: number, expected: number, who: Side): number {
  if (got !== expected) throw new Error(`${what} on ${{ ours: 'nixcas mount', peer: 'squashfuse_ll', unverified: 'the unverified nixcas mount' }[who]}: got ${got}, expected ${expected}`);
  return got;
}

// ---------------------------------------------------------------- the bench

export async function benchFuse(rows: Row[], work: string, repeats: number, cli: string): Promise<void> {
  requireRoot();
  ensureTools();
  const largeMib = Number(process.env.BENCH_FUSE_LARGE_MIB ?? 1024);
  const smallFiles = Number(process.env.BENCH_FUSE_SMALL_FILES ?? 5000);
  const wideFiles = Number(process.env.BENCH_FUSE_WIDE_FILES ?? 10000);
  const trees = join(work, 'trees');
  console.error(`bench fuse: writing trees (${smallFiles} small files; ${largeMib} MiB; ${wideFiles} files in one directory)`);
  const small = makeSmallTree(join(trees, 'small'), smallFiles);
  const large = makeLargeTree(join(trees, 'large'), largeMib);
  const wide = makeWideTree(join(trees, 'wide'), wideFiles);

  // Import all three, then rename each source tree to its store path's basename
  // and put the three in one image: both mounts then show the same relative paths
  // (so tar writes the same headers and the same number of bytes on both sides).
  const store = join(work, 'store');
  console.error('bench fuse: importing into a fresh store and building the squashfs image');
  const imported = spawnSync(process.execPath, [cli, 'import', '--store', store, 'small', 'large', 'wide'], { cwd: trees, encoding: 'utf8' });
  if (imported.status !== 0) throw new Error(`nixcas import failed: ${imported.stderr}`);
  const [smallName, largeName, wideName] = imported.stdout.trim().split('\n').map((path) => basename(path)) as [string, string, string];
  renameSync(join(trees, 'small'), join(trees, smallName));
  renameSync(join(trees, 'large'), join(trees, largeName));
  renameSync(join(trees, 'wide'), join(trees, wideName));
  const image = join(work, 'trees.squashfs');
  const squashed = spawnSync('mksquashfs', [smallName, largeName, wideName, image, ...SQUASHFS_OPTIONS, '-quiet', '-no-progress'], { cwd: trees, encoding: 'utf8' });
  if (squashed.status !== 0) throw new Error(`mksquashfs failed: ${squashed.stderr}`);

  const started: Mount[] = [];
  try {
    const ours = await mountNixcas(cli, store, join(work, 'mnt-nixcas'));
    started.push(ours);
    const peer = await mountSquashfuse(image, join(work, 'mnt-squashfuse'));
    started.push(peer);
    const unverified = await mountNixcas(cli, store, join(work, 'mnt-unverified'), { ...process.env, NIXCAS_VERIFY_READS: '0' });
    started.push(unverified);
    const mounts = { ours, peer, unverified };

    // Same bytes on both sides as in the source trees, before timing anything.
    console.error('bench fuse: checking that both mounts show the source trees');
    for (const name of [smallName, largeName, wideName]) {
      const source = await treeDigest(join(trees, name));
      for (const who of ['ours', 'peer', 'unverified'] as const) {
        if ((await treeDigest(join(mounts[who].mountpoint, name))) !== source) throw new Error(`${name} differs from its source on ${mounts[who].label}`);
      }
    }

    // The check above read everything: say how much of it nixcas keeps mapped (and so resident).
    const mappedMb = pageOutMappedFiles(ours.child.pid!, work);
    pageOutMappedFiles(unverified.child.pid!, work);
    console.error(`bench fuse: nixcas mount had ${mappedMb.toFixed(0)} MB of its store mapped; paged out before every cold run`);

    // tar's byte count depends only on names, sizes and kinds, which both sides share;
    // the rate counts the files' contents (what was read), not tar's headers.
    let tarBytes = 0;
    const workloads: Workload[] = [
      {
        label: `tar cf - of ${small.files} small files (${(small.bytes / 1e6).toFixed(0)} MB of contents, ${small.entries} entries)`,
        script: `tar cf - ${smallName} | wc -c`,
        unit: 'MB/s',
        scale: 1e6,
        target: 0.7,
        amount: (run, who) => {
          if (run.stderr) throw new Error(`tar on ${who}: ${run.stderr.trim()}`);
          const bytes = Number(run.stdout.trim());
          tarBytes ||= bytes;
          expectEqual('tar bytes', bytes, tarBytes, who);
          return small.bytes;
        },
      },
      {
        label: `sequential read of one ${largeMib} MiB file (dd bs=1M)`,
        script: `dd if=${largeName}/big.bin of=/dev/null bs=1M`,
        unit: 'MB/s',
        scale: 1e6,
        target: 0.7,
        amount: (run, who) => expectEqual('bytes read', Number(/^(\d+) bytes/m.exec(run.stderr)?.[1]), large.bytes, who),
      },
      {
        label: `find -ls of ${wide.entries} entries in one directory`,
        script: `find ${wideName} -ls | wc -l`,
        unit: 'entries/s',
        scale: 1,
        target: 1.0,
        amount: (run, who) => expectEqual('entries listed', Number(run.stdout.trim()), wide.entries, who),
      },
    ];

    for (const cold of [true, false]) {
      for (const workload of workloads) {
        console.error(`bench fuse: ${cold ? 'cold' : 'warm'}: ${workload.label}`);
        const rate = await measure(workload, mounts, work, repeats, cold);
        rows.push({
          capability: `FUSE ${workload.label}, ${cold ? 'cold' : 'warm (kernel caches kept)'}`,
          ours: rate.ours,
          peer: rate.peer,
          unit: workload.unit,
          peerName: 'squashfuse_ll, uncompressed image',
          // Targets are for cold runs; warm ones mostly measure the kernel's caches.
          target: cold ? workload.target : undefined,
        });
        rows.push({
          capability: `what verified reads cost: FUSE ${workload.label}, ${cold ? 'cold' : 'warm'}`,
          ours: rate.ours,
          peer: rate.unverified,
          unit: workload.unit,
          peerName: 'nixcas mount with NIXCAS_VERIFY_READS=0',
          target: 0.9,
        });
      }
    }

    // VmHWM is the peak since the process started: everything above, the checks included.
    rows.push({
      capability: `FUSE server peak RSS (VmHWM) after all runs; nixcas private (RssAnon) now ${statusMb(ours.child.pid!, 'RssAnon').toFixed(0)} MB`,
      ours: statusMb(ours.child.pid!, 'VmHWM'),
      peer: statusMb(peer.child.pid!, 'VmHWM'),
      unit: 'MB',
      peerName: 'squashfuse_ll',
      lowerIsBetter: true,
      note: 'lower is better; no target',
    });
  } finally {
    for (const mount of started.reverse()) await stopMount(mount);
    // Anything nixcas mount said besides mounting and unmounting is worth a look.
    const ours = started.find((mount) => mount.label === 'nixcas mount');
    const unexpected = ours
      ?.stderr()
      .split('\n')
      .filter((line) => line && !/mounted at|SIGTERM, unmounting|unmounted /.test(line));
    if (unexpected?.length) console.error(`bench fuse: nixcas mount said:\n${unexpected.join('\n')}`);
  }
}

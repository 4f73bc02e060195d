// `nixcas virtiofs` against QEMU's C virtiofsd (issue #5): the same trees, one
// as a store served by nixcas and one as a plain directory shared by
// `virtiofsd -o cache=always`, each read by the same guest (same kernel, same
// initramfs, same QEMU flags: TCG, memfd guest RAM, vhost-user-fs-pci with
// queue-size=1024) with ordinary tools (tar, cat, find + stat).
//
// Every boot gets a fresh backend process (virtiofsd exits when its VM goes
// away anyway; nixcas is restarted too so both start equally cold) after the
// host's page cache was dropped. In the guest each command runs after
// `echo 3 > /proc/sys/vm/drop_caches` and is timed there, from the kernel's
// monotonic clock in nanoseconds (the third line of /proc/timer_list; busybox
// `date` has no %N and /proc/uptime counts centiseconds). The first pass is
// cold on both sides; the second repeats cat and find (BENCH_VIRTIOFS_HOST_WARM)
// in the same boot with the guest's caches dropped again but the host's kept
// ("host-warm"): that pass measures the backend's cost per request without the disk.
//
// Around each command the guest prints a marker on its console and sleeps
// while the backend is idle; at each marker the host reads the backend's CPU
// time (utime + stime of the whole process tree) and QEMU's, so every row also
// says how much CPU each backend spent on it.
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, lstatSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync, renameSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';
import { atExit, type Backend, bootGuest, buildInitramfs, ensureVmPackages, startVirtiofsd } from '../vmtest/harness.js';
import { pageOutMappedFiles, pseudoRandom } from './fuse.js';
import { type Row, median } from './nix.js';

const MIB = 1024 * 1024;
const TAG = 'nixstore';
const MARK = 'BENCH-VIRTIOFS';
const CLK_TCK = 100; // getconf CLK_TCK on Linux x86-64
const PEER_NAME = 'QEMU virtiofsd (C), cache=always';
const RSS_TARGET_MB = 150;

type Side = 'ours' | 'peer';
const SIDE_NAME: Record<Side, string> = { ours: 'nixcas', peer: 'virtiofsd' };

// ---------------------------------------------------------------- trees

interface Trees {
  /** Store path basenames: the same names in the store and in the shared directory. */
  small: string;
  large: string;
  meta: string;
  smallFiles: number;
  smallBytes: number;
  largeBytes: number;
  /** What `find META` prints, the root included. */
  metaEntries: number;
  metaDirs: number;
  /** Digests the guest must report (see checkScript). */
  expected: Record<string, string>;
}

/** Files of 0–16 KiB in a few directories; every 10th executable, every 20th with a symlink to it. */
function makeSmallTree(root: string, files: number, dirs: number): { bytes: number } {
  let bytes = 0;
  for (let d = 0; d < dirs; d++) mkdirSync(join(root, `d${d}`), { recursive: true });
  for (let i = 0; i < files; i++) {
    const dir = join(root, `d${i % dirs}`);
    const size = (i * 7919) % (16 * 1024 + 1);
    writeFileSync(join(dir, `f${i}`), pseudoRandom(size, i + 1), { mode: i % 10 === 0 ? 0o755 : 0o644 });
    bytes += size;
    if (i % 20 === 0) symlinkSync(`f${i}`, join(dir, `l${i}`));
  }
  return { bytes };
}

function makeLargeTree(root: string, mib: number): void {
  mkdirSync(root, { recursive: true });
  const fd = openSync(join(root, 'big.bin'), 'w');
  try {
    for (let i = 0; i < mib; i++) {
      const block = pseudoRandom(MIB, 2_000_000 + i);
      for (let written = 0; written < block.length; ) written += writeSync(fd, block, written);
    }
  } finally {
    closeSync(fd);
  }
}

/** `dirs` directories of `perDir` tiny files each: walking it is all lookups, listings and attributes. */
function makeMetaTree(root: string, dirs: number, perDir: number): number {
  for (let d = 0; d < dirs; d++) {
    const dir = join(root, `m${String(d).padStart(3, '0')}`);
    mkdirSync(dir, { recursive: true });
    for (let i = 0; i < perDir; i++) writeFileSync(join(dir, `e${String(i).padStart(4, '0')}`), `${d}/${i}\n`);
  }
  return 1 + dirs + dirs * perDir;
}

const md5 = (data: string | Buffer) => createHash('md5').update(data).digest('hex');

/** Relative paths as `find .` prints them, sorted bytewise as busybox `sort` does. */
function findPaths(root: string, keep: (path: string, kind: 'd' | 'f' | 'l') => boolean): string[] {
  const out: string[] = [];
  const walk = (dir: string, rel: string) => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = `${rel}/${entry.name}`;
      const kind = entry.isDirectory() ? 'd' : entry.isSymbolicLink() ? 'l' : 'f';
      if (keep(join(dir, entry.name), kind)) out.push(path);
      if (kind === 'd') walk(join(dir, entry.name), path);
    }
  };
  if (keep(root, 'd')) out.push('.');
  walk(root, '.');
  return out.sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
}

/** What the guest's content check (CHECK_SCRIPT) must print for these trees. */
function expectedDigests(share: string, t: { small: string; large: string; meta: string }, largeMib: number): Record<string, string> {
  const small = join(share, t.small);
  const lines = (paths: string[]) => paths.map((p) => `${p}\n`).join('');
  // The contents of one directory's files (a tenth of them): reading all of them takes the guest long.
  const files = findPaths(join(small, 'd0'), (_, kind) => kind === 'f').map((p) => `d0/${p.slice(2)}`);
  const contents = createHash('md5');
  for (const f of files) contents.update(readFileSync(join(small, f)));
  const links = findPaths(small, (_, kind) => kind === 'l').map((p) => `'${p}' -> '${readlinkSync(join(small, p))}'`);
  const executables = findPaths(small, (path, kind) => kind === 'f' && (lstatSync(path).mode & 0o100) !== 0);
  const big = readFileSync(join(share, t.large, 'big.bin'));
  const expected: Record<string, string> = {
    'check.small.names': md5(lines(findPaths(small, () => true))),
    'check.small.contents': contents.digest('hex'),
    'check.small.links': md5(lines(links)),
    'check.small.exec': md5(lines(executables)),
    'check.meta.names': md5(lines(findPaths(join(share, t.meta), () => true))),
  };
  for (const k of [0, Math.floor(largeMib / 2), largeMib - 1]) expected[`check.large.${k}`] = md5(big.subarray(k * MIB, (k + 1) * MIB));
  return expected;
}

// ---------------------------------------------------------------- the guest

interface Workload {
  key: 'tar' | 'cat' | 'find';
  label: string;
  /** Run by `sh -c` in the guest; its output (one line) is checked by `check`. */
  command: string;
  unit: string;
  /** Work per run, in units of `scale` per `unit`. */
  amount: number;
  scale: number;
  target: number;
  /** The command's output as it must be (for tar: the same on both sides, see below). */
  expectedOutput?: string;
}

function workloads(t: Trees): Workload[] {
  return [
    {
      key: 'tar',
      label: `tar cf - of ${t.smallFiles} small files (${(t.smallBytes / 1e6).toFixed(0)} MB of contents)`,
      command: `cd /mnt && tar cf - ${t.small} | wc -c`,
      unit: 'MB/s',
      amount: t.smallBytes,
      scale: 1e6,
      target: 0.8,
    },
    {
      key: 'cat',
      label: `cat of one ${t.largeBytes / MIB} MiB file to /dev/null`,
      // busybox cat copies with sendfile(2): the guest does not even copy the pages once more.
      command: `cat /mnt/${t.large}/big.bin > /dev/null && stat -c %s /mnt/${t.large}/big.bin`,
      unit: 'MB/s',
      amount: t.largeBytes,
      scale: 1e6,
      target: 0.8,
      expectedOutput: String(t.largeBytes),
    },
    {
      key: 'find',
      label: `find -exec stat {} + over ${t.metaEntries} entries (${t.metaDirs} directories)`,
      command: `cd /mnt && find ${t.meta} -exec stat -c '%s %a %h %i %n' {} + | wc -l`,
      unit: 'entries/s',
      amount: t.metaEntries,
      scale: 1,
      target: 1.0,
      expectedOutput: String(t.metaEntries),
    },
  ];
}

type Pass = 'cold' | 'hostwarm';

/** Which commands run in which pass; the host-warm tar is left out by default (see docs/benchmarks.md). */
function passPlan(): Array<[Pass, Set<string>]> {
  const hostWarm = process.env.BENCH_VIRTIOFS_HOST_WARM ?? 'cat,find';
  const plan: Array<[Pass, Set<string>]> = [['cold', new Set(['tar', 'cat', 'find'])]];
  if (hostWarm !== '0' && hostWarm !== '') plan.push(['hostwarm', new Set(hostWarm.split(','))]);
  return plan;
}

/** Untimed, in the first boot of each side only: what the guest reads must be the source trees. */
function checkScript(t: Trees, largeMib: number): string {
  const chunks = [0, Math.floor(largeMib / 2), largeMib - 1]
    .map((k) => `result check.large.${k} "$(dd if=/mnt/${t.large}/big.bin bs=1M skip=${k} count=1 2>/dev/null | md5sum | cut -d ' ' -f 1)"`)
    .join('\n');
  return `
  cd /mnt/${t.small}
  result check.small.names "$(find . | sort | md5sum | cut -d ' ' -f 1)"
  result check.small.contents "$(find ./d0 -type f | sort | xargs cat | md5sum | cut -d ' ' -f 1)"
  result check.small.links "$(find . -type l | sort | xargs stat -c %N | md5sum | cut -d ' ' -f 1)"
  result check.small.exec "$(find . -type f -perm -0100 | sort | md5sum | cut -d ' ' -f 1)"
  cd /mnt/${t.meta}
  result check.meta.names "$(find . | sort | md5sum | cut -d ' ' -f 1)"
  cd /
${chunks}`;
}

function guestScript(t: Trees, plan: Array<[Pass, Set<string>]>, largeMib: number): string {
  const quote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  const runs = plan.flatMap(([pass, keys]) => workloads(t).filter((w) => keys.has(w.key)).map((w) => `timed ${pass}.${w.key} ${quote(w.command)}`));
  return `# bench/virtiofs.ts: timed reads of a virtio-fs mount.
mount -t virtiofs -o ro ${TAG} /mnt || exit 10
# ktime_get() in nanoseconds: the third line of /proc/timer_list is "now at N nsecs". Builtins only.
now() { { read -r _l; read -r _l; read -r _w _w _now _w; } < /proc/timer_list; }
now
case "$_now" in ''|*[!0-9]*) echo "no clock in /proc/timer_list: $_now"; exit 11 ;; esac
# Interrupts from the request queue(s) so far: about one per request answered (fewer when replies come in bursts).
irqs() { _irqs=0; while read -r _n _c _rest; do case "$_rest" in *requests*) _irqs=$((_irqs + _c)) ;; esac; done < /proc/interrupts; }
# timed KEY COMMAND: with the guest's caches dropped, run COMMAND and report KEY.ns, KEY.rc, KEY.out.
# The markers and sleeps let the host read the backend's CPU time while it is idle.
timed() {
  sync
  echo 3 > /proc/sys/vm/drop_caches
  sleep 0.3
  echo "${MARK} begin $1"
  sleep 0.2
  irqs; _i0=$_irqs
  now; _t0=$_now
  _rc=0
  _out=$(sh -c "$2" 2>&1) || _rc=$?
  now; _t1=$_now
  irqs; _i1=$_irqs
  echo "${MARK} end $1"
  result "$1.ns" $((_t1 - _t0))
  result "$1.irqs" $((_i1 - _i0))
  result "$1.rc" $_rc
  result "$1.out" $(echo "$_out" | head -n 1)
  [ $_rc = 0 ] || printf '%s failed (%s):\\n%s\\n' "$1" $_rc "$_out"
  sleep 0.3
}
${runs.join('\n')}
case " $(cat /proc/cmdline) " in *" bench.check=1 "*)
${checkScript(t, largeMib)}
;; esac
echo "${MARK} done"
umount /mnt
`;
}

// ---------------------------------------------------------------- processes

/** The process and all its descendants (virtiofsd forks into its sandbox and the child does the work). */
function processTree(pid: number): number[] {
  const out = [pid];
  for (let i = 0; i < out.length; i++) {
    let tasks: string[] = [];
    try {
      tasks = readdirSync(`/proc/${out[i]}/task`);
    } catch {
      continue; // gone
    }
    for (const tid of tasks) {
      try {
        for (const child of readFileSync(`/proc/${out[i]}/task/${tid}/children`, 'utf8').trim().split(/\s+/)) if (child) out.push(Number(child));
      } catch {
        // thread gone
      }
    }
  }
  return out;
}

/** utime + stime of a process (all its threads, live and exited), in seconds; 0 once it is gone. */
function cpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK; // fields 14 and 15 of stat(5)
  } catch {
    return 0;
  }
}

function treeCpuSeconds(pid: number): number {
  return processTree(pid).reduce((sum, p) => sum + cpuSeconds(p), 0);
}

interface Memory {
  /** VmHWM: the peak of the whole RSS. */
  hwm: number;
  /** Peaks, sampled: RssAnon + RssFile (the daemon's own memory), and RssShmem (guest RAM it touched). */
  own: number;
  shmem: number;
  anon: number;
  file: number;
  /** Of RssFile: pages of the bench's own files (nixcas's LMDB store) mapped, at the markers. */
  mapped: number;
}

const NO_MEMORY: Memory = { hwm: 0, own: 0, shmem: 0, anon: 0, file: 0, mapped: 0 };

const maxMemory = (a: Memory, b: Memory): Memory => ({
  hwm: Math.max(a.hwm, b.hwm),
  own: Math.max(a.own, b.own),
  shmem: Math.max(a.shmem, b.shmem),
  anon: Math.max(a.anon, b.anon),
  file: Math.max(a.file, b.file),
  mapped: Math.max(a.mapped, b.mapped),
});

function statusMb(pid: number): Record<string, number> | undefined {
  try {
    const out: Record<string, number> = {};
    for (const m of readFileSync(`/proc/${pid}/status`, 'utf8').matchAll(/^(\w+):\s+(\d+) kB$/gm)) out[m[1]!] = Number(m[2]) / 1024;
    return out;
  } catch {
    return undefined;
  }
}

/** The process of the tree with the largest peak RSS (for virtiofsd: the sandboxed child that serves). */
function biggestProcess(pid: number): { pid: number; status: Record<string, number> } | undefined {
  let best: { pid: number; status: Record<string, number> } | undefined;
  for (const p of processTree(pid)) {
    const status = statusMb(p);
    if (status && (!best || (status.VmHWM ?? 0) > (best.status.VmHWM ?? 0))) best = { pid: p, status };
  }
  return best;
}

/** MB resident of the process's mappings of files under `dir`. */
function mappedMb(pid: number, dir: string): number {
  let kb = 0;
  let inside = false;
  try {
    for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
      const header = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
      if (header) inside = header[1]!.startsWith(`${dir}/`);
      else if (inside && line.startsWith('Rss:')) kb += Number(/(\d+) kB/.exec(line)?.[1] ?? 0);
    }
  } catch {
    return 0; // gone
  }
  return kb / 1024;
}

/** Folds the current memory of the backend into `peak`; with `dir`, also what it maps of files there (slower). */
function sampleMemory(pid: number, peak: Memory, dir?: string): Memory {
  const best = biggestProcess(pid);
  if (!best) return peak;
  const s = best.status;
  const anon = s.RssAnon ?? 0;
  const file = s.RssFile ?? 0;
  const mapped = dir === undefined ? 0 : mappedMb(best.pid, dir);
  return maxMemory(peak, { hwm: s.VmHWM ?? 0, own: anon + file, shmem: s.RssShmem ?? 0, anon, file, mapped });
}

/** The QEMU that bootGuest started: our child named qemu-system-*. */
function findQemu(): number | undefined {
  for (const pid of processTree(process.pid).slice(1)) {
    try {
      if (readFileSync(`/proc/${pid}/comm`, 'utf8').startsWith('qemu-system')) return pid;
    } catch {
      // gone
    }
  }
  return undefined;
}

function dropHostCaches(): void {
  spawnSync('sync');
  writeFileSync('/proc/sys/vm/drop_caches', '3');
}

/** `nixcas virtiofs SOCKET --store STORE`, ready once it says it listens. */
async function startNixcas(cli: string, store: string, socketPath: string): Promise<Backend> {
  const child = spawn(process.execPath, [cli, 'virtiofs', socketPath, '--store', store], { stdio: ['ignore', 'ignore', 'pipe'] });
  const forget = atExit(() => child.kill('SIGKILL'));
  let output = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (output += d));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    forget();
  };
  const deadline = Date.now() + 30_000;
  while (!output.includes('listening on')) {
    if (child.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new Error(`nixcas virtiofs did not start: ${output.trim() || 'no output'}`);
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  return { socketPath, process: child, output: () => output, stop };
}

// ---------------------------------------------------------------- one boot

interface RunSample {
  seconds: number;
  /** Interrupts the guest took from the request queue: about one per request. */
  irqs: number;
  /** CPU seconds of the backend (whole process tree) and of QEMU while the command ran. */
  backendCpu: number;
  qemuCpu: number;
}

interface BootSample {
  runs: Map<string, RunSample>;
  memory: Memory;
  results: Record<string, string>;
  bootSeconds: number;
}

interface Starter {
  start(): Promise<Backend>;
  /** Before the host's caches are dropped: make a backend that outlives boots forget what it has mapped. */
  beforeBoot?(): void;
}

async function bootOnce(side: Side, starter: Starter, initramfs: ReturnType<typeof buildInitramfs>, memoryMiB: number, check: boolean, work: string): Promise<BootSample> {
  starter.beforeBoot?.();
  dropHostCaches();
  const backend = await starter.start();
  const pid = backend.process.pid!;
  let memory = sampleMemory(pid, NO_MEMORY);
  const sampler = setInterval(() => (memory = sampleMemory(pid, memory)), 50);
  const marks = new Map<string, { backend: number; qemu: number }>();
  let qemuPid: number | undefined;
  const cpuNow = () => {
    qemuPid ??= findQemu();
    return { backend: treeCpuSeconds(pid), qemu: qemuPid === undefined ? 0 : cpuSeconds(qemuPid) };
  };
  const pending: NodeJS.Timeout[] = [];
  const markRe = new RegExp(`${MARK} (begin|end|done)\\s*(\\S*)`);
  try {
    const boot = await bootGuest({
      initramfs,
      backend,
      virtiofsTag: TAG,
      memoryMiB,
      timeoutMs: 600_000,
      kernelArgs: check ? ['bench.check=1'] : [],
      onConsoleLine: (line) => {
        const m = markRe.exec(line);
        if (!m) return;
        memory = sampleMemory(pid, memory, work);
        // "begin": the backend is idle now (the guest sleeps before starting). "end": let the last
        // asynchronous requests (RELEASE, FORGET) land, the guest sleeps for 0.3 s.
        if (m[1] === 'begin') marks.set(`${m[2]}.begin`, cpuNow());
        else if (m[1] === 'end') pending.push(setTimeout(() => marks.set(`${m[2]}.end`, cpuNow()), 100));
      },
    });
    if (boot.exitStatus !== 0) throw new Error(`the guest (${SIDE_NAME[side]}) exited with ${boot.exitStatus}:\n${boot.output.split('\n').slice(-40).join('\n')}\n--- backend ---\n${backend.output()}`);
    const runs = new Map<string, RunSample>();
    for (const [key, value] of Object.entries(boot.results)) {
      if (!key.endsWith('.ns')) continue;
      const name = key.slice(0, -3);
      const rc = boot.results[`${name}.rc`];
      if (rc !== '0') throw new Error(`${name} failed in the guest (${SIDE_NAME[side]}), status ${rc}:\n${boot.output.split('\n').slice(-40).join('\n')}`);
      const begin = marks.get(`${name}.begin`);
      const end = marks.get(`${name}.end`);
      runs.set(name, {
        seconds: Number(value) / 1e9,
        irqs: Number(boot.results[`${name}.irqs`]),
        backendCpu: begin && end ? end.backend - begin.backend : NaN,
        qemuCpu: begin && end ? end.qemu - begin.qemu : NaN,
      });
    }
    return { runs, memory, results: boot.results, bootSeconds: boot.timings.totalMs / 1000 };
  } finally {
    for (const t of pending) clearTimeout(t);
    clearInterval(sampler);
    await backend.stop();
  }
}

// ---------------------------------------------------------------- the bench

export async function benchVirtiofs(rows: Row[], work: string, repeats: number, cli: string): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('bench virtiofs must run as root: virtiofsd needs it, and the host page cache is dropped before every boot');
  ensureVmPackages({ install: true });
  const smallFiles = Number(process.env.BENCH_VIRTIOFS_SMALL_FILES ?? 5000);
  const largeMib = Number(process.env.BENCH_VIRTIOFS_LARGE_MIB ?? 256);
  const metaDirs = Number(process.env.BENCH_VIRTIOFS_META_DIRS ?? 100);
  const metaPerDir = Number(process.env.BENCH_VIRTIOFS_META_PER_DIR ?? 100);
  const memoryMiB = Number(process.env.BENCH_VIRTIOFS_GUEST_MIB ?? 512);
  const plan = passPlan();
  const started = performance.now();

  console.error(`bench virtiofs: writing trees (${smallFiles} small files; ${largeMib} MiB; ${metaDirs} × ${metaPerDir} entries)`);
  const share = join(work, 'share');
  const small = makeSmallTree(join(share, 'small'), smallFiles, 10);
  makeLargeTree(join(share, 'large'), largeMib);
  const metaEntries = makeMetaTree(join(share, 'meta'), metaDirs, metaPerDir);

  // Import all three, then rename each source tree to its store path's basename: both backends
  // then show the same names, and tar writes the same number of bytes on both sides.
  const store = join(work, 'store');
  const imported = spawnSync(process.execPath, [cli, 'import', '--store', store, 'small', 'large', 'meta'], { cwd: share, encoding: 'utf8' });
  if (imported.status !== 0) throw new Error(`nixcas import failed: ${imported.stderr}`);
  const [smallName, largeName, metaName] = imported.stdout.trim().split('\n').map((p) => basename(p)) as [string, string, string];
  renameSync(join(share, 'small'), join(share, smallName));
  renameSync(join(share, 'large'), join(share, largeName));
  renameSync(join(share, 'meta'), join(share, metaName));
  const names = { small: smallName, large: largeName, meta: metaName };
  const trees: Trees = {
    ...names,
    smallFiles,
    smallBytes: small.bytes,
    largeBytes: largeMib * MIB,
    metaEntries,
    metaDirs,
    expected: expectedDigests(share, names, largeMib),
  };
  const initramfs = buildInitramfs({ guestScript: guestScript(trees, plan, largeMib) });

  // By default each boot gets a fresh nixcas, as it gets a fresh virtiofsd. With
  // BENCH_VIRTIOFS_KEEP_NIXCAS=1 one nixcas serves all its boots (as in production); before each
  // boot its mapped store pages are paged out so that it starts as cold as a fresh process.
  const keepNixcas = process.env.BENCH_VIRTIOFS_KEEP_NIXCAS === '1';
  let shared: Backend | undefined;
  const starters: Record<Side, Starter> = {
    ours: keepNixcas
      ? {
          start: async () => {
            shared ??= await startNixcas(cli, store, join(work, 'nixcas.sock'));
            return { ...shared, stop: async () => {} };
          },
          beforeBoot: () => void (shared && pageOutMappedFiles(shared.process.pid!, work)),
        }
      : { start: () => startNixcas(cli, store, join(work, 'nixcas.sock')) },
    peer: { start: () => startVirtiofsd({ source: share, socketPath: join(work, 'virtiofsd.sock'), cache: 'always' }) },
  };
  const samples: Record<Side, BootSample[]> = { ours: [], peer: [] };
  try {
    for (let round = 0; round < repeats; round++) {
      const order: Side[] = round % 2 === 0 ? ['ours', 'peer'] : ['peer', 'ours'];
      for (const side of order) {
        const sample = await bootOnce(side, starters[side], initramfs, memoryMiB, round === 0, work);
        samples[side].push(sample);
        const summary = [...sample.runs].map(([k, r]) => `${k} ${r.seconds.toFixed(2)} s (cpu ${r.backendCpu.toFixed(2)})`).join(', ');
        const m = sample.memory;
        console.error(
          `bench virtiofs: round ${round + 1}/${repeats} ${SIDE_NAME[side]}: ${summary}; boot ${sample.bootSeconds.toFixed(1)} s; ` +
            `VmHWM ${m.hwm.toFixed(0)} MB, RssAnon+RssFile ${m.own.toFixed(0)} MB`,
        );
        if (round === 0) {
          for (const [key, digest] of Object.entries(trees.expected)) {
            if (sample.results[key] !== digest) throw new Error(`content check ${key} on ${SIDE_NAME[side]}: guest saw ${sample.results[key]}, the tree has ${digest}`);
          }
        }
      }
    }
  } finally {
    await shared?.stop();
  }

  // Outputs: the same on every boot and both sides (tar's byte count depends only on names, sizes and kinds).
  const runs = plan.flatMap(([pass, keys]) => workloads(trees).filter((w) => keys.has(w.key)).map((w) => ({ pass, w, name: `${pass}.${w.key}` })));
  for (const { w, name } of runs) {
    const outputs = new Set((['ours', 'peer'] as const).flatMap((side) => samples[side].map((s) => s.results[`${name}.out`])));
    if (outputs.size !== 1 || (w.expectedOutput !== undefined && !outputs.has(w.expectedOutput))) {
      throw new Error(`${name} printed ${[...outputs].join(' / ')}${w.expectedOutput ? `, expected ${w.expectedOutput}` : ' (different on the two sides)'}`);
    }
  }

  // The detailed table: times and CPU per backend (medians over the boots).
  const med = (side: Side, name: string, f: (r: RunSample) => number) => median(samples[side].map((s) => f(s.runs.get(name)!)));
  const spread = (side: Side, name: string) => {
    const values = samples[side].map((s) => s.runs.get(name)!.seconds);
    return `${Math.min(...values).toFixed(2)}–${Math.max(...values).toFixed(2)}`;
  };
  console.log(`\nvirtio-fs: ${repeats} boots per side; guest ${memoryMiB} MiB, 1 vCPU, TCG; medians (range); seconds measured in the guest, CPU seconds on the host\n`);
  console.log('| run | nixcas s | virtiofsd s | virtiofsd ÷ nixcas | nixcas CPU s | virtiofsd CPU s | QEMU CPU s (nixcas / virtiofsd) | guest request-queue interrupts (nixcas / virtiofsd) |');
  console.log('|---|---|---|---|---|---|---|---|');
  for (const { pass, w, name } of runs) {
    const t = (side: Side) => med(side, name, (r) => r.seconds);
    const cpu = (side: Side) => med(side, name, (r) => r.backendCpu);
    const qemu = (side: Side) => med(side, name, (r) => r.qemuCpu);
    const irqs = (side: Side) => med(side, name, (r) => r.irqs);
    console.log(
      `| ${pass} ${w.key} | ${t('ours').toFixed(2)} (${spread('ours', name)}) | ${t('peer').toFixed(2)} (${spread('peer', name)}) | ${(t('peer') / t('ours')).toFixed(2)} | ` +
        `${cpu('ours').toFixed(2)} | ${cpu('peer').toFixed(2)} | ${qemu('ours').toFixed(2)} / ${qemu('peer').toFixed(2)} | ${irqs('ours')} / ${irqs('peer')} |`,
    );
    rows.push({
      capability: `virtio-fs ${w.label}, ${pass === 'cold' ? 'cold (guest and host caches dropped)' : 'host-warm (guest caches dropped)'}; backend CPU ${cpu('ours').toFixed(2)} s vs ${cpu('peer').toFixed(2)} s`,
      ours: w.amount / w.scale / t('ours'),
      peer: w.amount / w.scale / t('peer'),
      unit: w.unit,
      peerName: PEER_NAME,
      // Targets are for cold runs; host-warm ones take the disk out, to show the cost per request.
      target: pass === 'cold' ? w.target : undefined,
    });
  }

  // Peaks over all boots. RssShmem is guest RAM (the memfd QEMU shares) that the backend touched:
  // every page a reply was written into stays mapped in the backend, so it grows with what the guest
  // read, up to the guest's RAM, for both backends alike.
  const mem = { ours: samples.ours.map((s) => s.memory).reduce(maxMemory, NO_MEMORY), peer: samples.peer.map((s) => s.memory).reduce(maxMemory, NO_MEMORY) };
  console.log('\n| backend | peak RSS (VmHWM) | peak RssAnon + RssFile | peak RssAnon | peak RssFile | of which the store mapped | peak RssShmem (guest RAM) |');
  console.log('|---|---|---|---|---|---|---|');
  for (const side of ['ours', 'peer'] as const) {
    const m = mem[side];
    const mb = (n: number) => `${n.toFixed(0)} MB`;
    console.log(`| ${SIDE_NAME[side]} | ${mb(m.hwm)} | ${mb(m.own)} | ${mb(m.anon)} | ${mb(m.file)} | ${mb(m.mapped)} | ${mb(m.shmem)} |`);
  }
  const verdict = (mb: number) => (mb <= RSS_TARGET_MB ? 'met' : 'MISSED');
  rows.push({
    capability:
      `virtio-fs backend peak RSS (VmHWM) over a boot, guest RAM included; without it (RssAnon + RssFile): ` +
      `nixcas ${mem.ours.own.toFixed(0)} MB (${mem.ours.anon.toFixed(0)} MB private), virtiofsd ${mem.peer.own.toFixed(0)} MB`,
    ours: mem.ours.hwm,
    peer: mem.peer.hwm,
    unit: 'MB',
    peerName: 'virtiofsd',
    lowerIsBetter: true,
    note: `lower is better; ≤ ${RSS_TARGET_MB} MB: ${verdict(mem.ours.hwm)} with guest RAM, ${verdict(mem.ours.own)} without`,
  });
  console.error(`bench virtiofs: ${((performance.now() - started) / 1000).toFixed(0)} s in all`);
}

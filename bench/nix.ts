// The Nix layer against Nix itself: `nixcas import` against `nix-store --add`
// and `nixcas nar` against `nix-store --dump`, on the same trees, each as the
// whole command a user runs (process start included), plus peak RSS.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { createHash } from 'node:crypto';

export interface Row {
  capability: string;
  ours: number;
  peer: number;
  unit: string;
  peerName: string;
  target?: number;
  /** true when a lower number is better (seconds, MB of RSS) */
  lowerIsBetter?: boolean;
  /** The ratio is peer ÷ ours (times, latencies), so that there too a higher one is better. */
  peerOverOurs?: boolean;
  note?: string;
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

interface Measured {
  seconds: number;
  /** Peak resident set (VmHWM), including file pages mapped from the LMDB store. */
  peakRssMb: number;
  /** Peak anonymous (private) memory, sampled every 10 ms. */
  peakAnonMb: number;
  stdout: string;
}

function statusKb(pid: number, field: string): number {
  try {
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) : 0;
  } catch {
    return 0; // exited between samples
  }
}

/** Runs a command with stdout to a file (or /dev/null); wall time and memory peaks. */
export async function timed(command: string, args: string[], stdoutFile = '/dev/null', env: NodeJS.ProcessEnv = {}): Promise<Measured> {
  const out = openSync(stdoutFile, 'w');
  const started = process.hrtime.bigint();
  const child = spawn(command, args, { stdio: ['ignore', out, 'pipe'], env: { ...process.env, ...env } });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  let peakAnonKb = 0;
  let peakRssKb = 0;
  const sample = () => {
    peakAnonKb = Math.max(peakAnonKb, statusKb(child.pid!, 'RssAnon'));
    peakRssKb = Math.max(peakRssKb, statusKb(child.pid!, 'VmHWM'));
  };
  const timer = setInterval(sample, 10);
  const code = await new Promise<number | null>((resolve) => {
    // 'exit' fires after the process is reaped; sample it while it is a zombie-to-be on each tick instead.
    child.once('exit', resolve);
  });
  clearInterval(timer);
  closeSync(out);
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  if (code !== 0) throw new Error(`${command} ${args.join(' ')} failed: ${stderr}`);
  return {
    seconds,
    peakRssMb: peakRssKb / 1024,
    peakAnonMb: peakAnonKb / 1024,
    stdout: stdoutFile === '/dev/null' ? '' : readFileSync(stdoutFile, 'utf8'),
  };
}

/** Deterministic pseudo-random bytes (SHA-256 in counter mode), so runs compare. */
function fill(size: number, seed: string): Buffer {
  const out = Buffer.allocUnsafe(size);
  for (let at = 0, i = 0; at < size; at += 32, i++) {
    createHash('sha256').update(`${seed}/${i}`).digest().copy(out, at, 0, Math.min(32, size - at));
  }
  return out;
}

function makeSmallFilesTree(root: string, files: number): number {
  let bytes = 0;
  for (let i = 0; i < files; i++) {
    const dir = join(root, `d${i % 50}`, `e${i % 7}`);
    mkdirSync(dir, { recursive: true });
    const size = 512 + ((i * 7919) % 16384);
    writeFileSync(join(dir, `file-${i}`), fill(size, `small-${i}`), { mode: i % 10 === 0 ? 0o755 : 0o644 });
    bytes += size;
  }
  return bytes;
}

function makeLargeFilesTree(root: string, files: number, mib: number): number {
  mkdirSync(root, { recursive: true });
  const block = fill(1024 * 1024, 'large');
  for (let f = 0; f < files; f++) {
    const fd = openSync(join(root, `large-${f}.bin`), 'w');
    for (let i = 0; i < mib; i++) {
      block.writeUInt32LE(f, 0);
      block.writeUInt32LE(i, 4);
      for (let written = 0; written < block.length; ) written += writeSync(fd, block, written);
    }
    closeSync(fd);
  }
  return files * mib * 1024 * 1024;
}

interface TreeCase {
  label: string;
  dir: string;
  bytes: number;
}

/** Writes back and drops the page cache (needs root, as the rest of this bench does). */
function dropPageCache(): void {
  spawnSync('sync');
  writeFileSync('/proc/sys/vm/drop_caches', '1\n');
}

/** Reads every file under `dir` once, so the page cache holds the tree. */
function readTree(dir: string): void {
  spawnSync('sh', ['-c', 'find "$1" -type f -exec cat {} + > /dev/null', 'sh', dir], { stdio: 'inherit' });
}

/** `nix-store --delete` of a path nothing refers to, so the next --add does the full work. */
function forgetInNix(storePath: string): void {
  spawnSync('nix-store', ['--delete', storePath], { stdio: 'ignore' });
}

export async function benchNix(rows: Row[], work: string, repeats: number, cli: string): Promise<void> {
  const largeMib = Number(process.env.BENCH_LARGE_MIB ?? 256);
  const largeFiles = Number(process.env.BENCH_LARGE_FILES ?? 4);
  const smallFiles = Number(process.env.BENCH_SMALL_FILES ?? 5000);
  console.error(`bench: writing trees (${smallFiles} small files; ${largeFiles} × ${largeMib} MiB)`);
  const cases: TreeCase[] = [
    { label: `${smallFiles} small files`, dir: join(work, 'small-tree'), bytes: 0 },
    { label: `${largeFiles} files of ${largeMib} MiB`, dir: join(work, 'large-tree'), bytes: 0 },
  ];
  cases[0]!.bytes = makeSmallFilesTree(cases[0]!.dir, smallFiles);
  cases[1]!.bytes = makeLargeFilesTree(cases[1]!.dir, largeFiles, largeMib);

  // A one-file store path: rendering its NAR is all start-up, which the
  // "rendering alone" rows subtract to compare the rendering itself.
  const oneFile = join(work, 'one-file');
  writeFileSync(oneFile, 'x\n');
  const startup = { ours: [] as number[], peer: [] as number[] };
  // `nixcas nar` of a local store renders natively; =1 makes a silent fall back to the
  // TypeScript renderer an error. That renderer (the daemon's and nar-bridge's) gets its own row.
  const NATIVE = { NIXCAS_NATIVE_NAR: '1' };
  const TYPESCRIPT = { NIXCAS_NATIVE_NAR: '0' };
  // The same renderers with reads unchecked: what verification (docs/design-notes.md, "verified reads") costs.
  const UNVERIFIED = { NIXCAS_VERIFY_READS: '0' };

  for (const tree of cases) {
    const importTimes = { ours: [] as number[], peer: [] as number[], peerDurable: [] as number[] };
    const narTimes = { ours: [] as number[], peer: [] as number[], typescript: [] as number[], unverified: [] as number[], typescriptUnverified: [] as number[] };
    const trivialTimes = { ours: [] as number[], peer: [] as number[] };
    const pipedTimes = { ours: [] as number[], peer: [] as number[] };
    const coldTimes = { ours: [] as number[], peer: [] as number[] };
    const verifyTimes = { ours: [] as number[], peer: [] as number[] };
    const memory = { importRss: 0, importAnon: 0, narRss: 0, narAnon: 0 };
    let storePath = '';
    for (let i = 0; i < repeats; i++) {
      const store = join(work, `store-${i}`);
      const order = i % 2 === 0 ? (['ours', 'peer'] as const) : (['peer', 'ours'] as const);
      // This VM's disk swings by a factor of two or more from one run to the next, and a
      // run is slower after a large write: each repeat imports in both orders, twice over,
      // so that a median of twelve runs a side (three repeats) stands against one slow run.
      const bothOrders = ['ours', 'peer', 'peerDurable', 'peerDurable', 'peer', 'ours'] as const;
      const importOrder = [...bothOrders, ...bothOrders];
      // The last repeat's cold runs dropped the tree from the page cache: read it back, untimed,
      // or the first import of each repeat (always ours) would read it from disk and the others not.
      readTree(tree.dir);
      for (const who of importOrder) {
        if (who === 'ours') {
          rmSync(store, { recursive: true, force: true });
          spawnSync('sync'); // no run pays for writes another left on their way to disk
          const run = await timed(process.execPath, [cli, 'import', '--store', store, tree.dir], join(work, 'import.out'));
          importTimes.ours.push(run.seconds);
          memory.importRss = Math.max(memory.importRss, run.peakRssMb);
          memory.importAnon = Math.max(memory.importAnon, run.peakAnonMb);
          storePath = run.stdout.trim();
        } else {
          if (storePath) forgetInNix(storePath);
          spawnSync('sync');
          // nixcas has its blobs on disk (fsync) before it prints a path; nix-store --add
          // leaves them in the page cache. The durable run adds a syncfs of the store's
          // file system, so both sides pay for the same guarantee.
          const run = who === 'peer'
            ? await timed('nix-store', ['--add', tree.dir], join(work, 'add.out'))
            : await timed('sh', ['-c', 'nix-store --add "$1" && sync -f /nix/store', 'sh', tree.dir], join(work, 'add.out'));
          importTimes[who].push(run.seconds);
          if (storePath && run.stdout.trim() !== storePath) throw new Error(`nix-store --add gave ${run.stdout.trim()}, nixcas ${storePath}`);
          storePath = run.stdout.trim();
        }
      }
      // Cold: both read the tree from disk. nixcas wrote most of it around the page cache
      // (O_DIRECT) while Nix's copy is still cached from its write, so without this the warm
      // runs would compare a disk read against memory.
      for (const who of order) {
        dropPageCache();
        if (who === 'ours') coldTimes.ours.push((await timed(process.execPath, [cli, 'nar', '--store', store, storePath], '/dev/null', NATIVE)).seconds);
        else coldTimes.peer.push((await timed('nix-store', ['--dump', storePath])).seconds);
      }
      // The second drop evicted what the first cold run read: read both trees once more, untimed.
      spawnSync(process.execPath, [cli, 'nar', '--store', store, storePath], { stdio: ['ignore', 'ignore', 'inherit'] });
      spawnSync('nix-store', ['--dump', storePath], { stdio: ['ignore', 'ignore', 'inherit'] });
      const oneFileOurs = spawnSync(process.execPath, [cli, 'import', '--store', store, oneFile], { encoding: 'utf8' }).stdout.trim();
      const oneFilePeer = spawnSync('nix-store', ['--add', oneFile], { encoding: 'utf8' }).stdout.trim();
      if (!oneFileOurs || oneFileOurs !== oneFilePeer) throw new Error(`one-file path: nixcas ${oneFileOurs}, nix ${oneFilePeer}`);
      for (const who of order) {
        if (who === 'ours') trivialTimes.ours.push((await timed(process.execPath, [cli, 'nar', '--store', store, oneFileOurs], '/dev/null', NATIVE)).seconds);
        else trivialTimes.peer.push((await timed('nix-store', ['--dump', oneFilePeer])).seconds);
      }
      for (const who of order) {
        if (who === 'ours') {
          const run = await timed(process.execPath, [cli, 'nar', '--store', store, storePath], '/dev/null', NATIVE);
          narTimes.ours.push(run.seconds);
          memory.narRss = Math.max(memory.narRss, run.peakRssMb);
          memory.narAnon = Math.max(memory.narAnon, run.peakAnonMb);
          const typescript = await timed(process.execPath, [cli, 'nar', '--store', store, storePath], '/dev/null', TYPESCRIPT);
          narTimes.typescript.push(typescript.seconds);
          memory.narRss = Math.max(memory.narRss, typescript.peakRssMb);
          memory.narAnon = Math.max(memory.narAnon, typescript.peakAnonMb);
          narTimes.unverified.push((await timed(process.execPath, [cli, 'nar', '--store', store, storePath], '/dev/null', { ...NATIVE, ...UNVERIFIED })).seconds);
          narTimes.typescriptUnverified.push((await timed(process.execPath, [cli, 'nar', '--store', store, storePath], '/dev/null', { ...TYPESCRIPT, ...UNVERIFIED })).seconds);
        } else {
          narTimes.peer.push((await timed('nix-store', ['--dump', storePath])).seconds);
        }
      }
      // `nixcas verify --check-contents` hashes every blob and directory of the path; b3sum hashes the
      // same files from the source tree (the reference BLAKE3 command, as many threads as it likes).
      for (const who of order) {
        if (who === 'ours') verifyTimes.ours.push((await timed(process.execPath, [cli, 'verify', '--store', store, '--check-contents', storePath])).seconds);
        else verifyTimes.peer.push((await timed('sh', ['-c', 'find "$1" -type f -print0 | xargs -0 b3sum > /dev/null', 'sh', tree.dir])).seconds);
      }
      // Into a pipe, as a NAR is usually consumed (by a compressor, an uploader).
      for (const who of order) {
        const command = who === 'ours' ? `"${process.execPath}" "${cli}" nar --store "${store}" ${storePath}` : `nix-store --dump ${storePath}`;
        pipedTimes[who].push((await timed('sh', ['-c', `${command} | cat > /dev/null`], '/dev/null', NATIVE)).seconds);
      }
      if (i < repeats - 1) rmSync(store, { recursive: true, force: true });
    }
    const mb = tree.bytes / 1e6;
    const runs = (times: number[]) => [...times].sort((a, b) => a - b).map((t) => t.toFixed(2)).join(' ');
    console.error(`bench nix: import, ${tree.label}, seconds per run: nixcas ${runs(importTimes.ours)}; nix-store --add ${runs(importTimes.peer)}; with sync -f ${runs(importTimes.peerDurable)}`);
    rows.push({
      capability: `import, ${tree.label} (${mb.toFixed(0)} MB)`,
      ours: mb / median(importTimes.ours), peer: mb / median(importTimes.peer), unit: 'MB/s',
      peerName: 'nix-store --add (no fsync)', target: 1.0,
    });
    rows.push({
      capability: `import, ${tree.label}, both durable`,
      ours: mb / median(importTimes.ours), peer: mb / median(importTimes.peerDurable), unit: 'MB/s',
      peerName: 'nix-store --add && sync -f /nix/store', target: 1.0,
    });
    rows.push({
      capability: `NAR rendering, ${tree.label}`,
      ours: mb / median(narTimes.ours), peer: mb / median(narTimes.peer), unit: 'MB/s',
      peerName: 'nix-store --dump', target: 1.0,
    });
    rows.push({
      capability: `NAR rendering from a cold page cache, ${tree.label}`,
      ours: mb / median(coldTimes.ours), peer: mb / median(coldTimes.peer), unit: 'MB/s',
      peerName: 'nix-store --dump', note: 'both read the disk (caches dropped before each run)',
    });
    rows.push({
      capability: `NAR rendering by the TypeScript renderer (NIXCAS_NATIVE_NAR=0), ${tree.label}`,
      ours: mb / median(narTimes.typescript), peer: mb / median(narTimes.peer), unit: 'MB/s',
      peerName: 'nix-store --dump', note: "the daemon's and nar-bridge's renderer, cold",
    });
    for (const [renderer, checked, unchecked] of [['native', narTimes.ours, narTimes.unverified], ['TypeScript', narTimes.typescript, narTimes.typescriptUnverified]] as const) {
      rows.push({
        capability: `what verified reads cost: NAR rendering by the ${renderer} renderer, ${tree.label}`,
        ours: mb / median(checked), peer: mb / median(unchecked), unit: 'MB/s',
        peerName: 'the same with NIXCAS_VERIFY_READS=0', target: 0.9,
      });
    }
    rows.push({
      capability: `nixcas verify --check-contents of the path, ${tree.label}`,
      ours: mb / median(verifyTimes.ours), peer: mb / median(verifyTimes.peer), unit: 'MB/s',
      peerName: 'find TREE -type f | xargs b3sum', note: 'warm page cache; b3sum uses both cores for large files',
    });
    const alone = (who: 'ours' | 'peer') => mb / Math.max(1e-3, median(narTimes[who]) - median(trivialTimes[who]));
    rows.push({
      capability: `NAR rendering alone (start-up subtracted), ${tree.label}`,
      ours: alone('ours'), peer: alone('peer'), unit: 'MB/s', peerName: 'nix-store --dump', target: 1.0,
    });
    startup.ours.push(...trivialTimes.ours);
    startup.peer.push(...trivialTimes.peer);
    rows.push({
      capability: `NAR rendering into a pipe (| cat), ${tree.label}`,
      ours: mb / median(pipedTimes.ours), peer: mb / median(pipedTimes.peer), unit: 'MB/s',
      peerName: 'nix-store --dump | cat',
    });
    for (const [what, rss, anon] of [['import', memory.importRss, memory.importAnon], ['nar', memory.narRss, memory.narAnon]] as const) {
      rows.push({
        capability: `peak memory of ${what}, ${tree.label}: private (anonymous) / whole RSS`,
        ours: anon, peer: rss, unit: 'MB', peerName: 'RSS incl. LMDB file pages', lowerIsBetter: true,
        note: `limit 200 MB: ${rss <= 200 ? 'met' : anon <= 200 ? 'met for private memory; RSS over' : 'MISSED'}`,
      });
    }
    forgetInNix(storePath);
  }
  rows.push({
    capability: 'start-up: the NAR of a one-file path, to /dev/null (ratio nix ÷ nixcas)',
    ours: median(startup.ours) * 1000, peer: median(startup.peer) * 1000, unit: 'ms',
    peerName: 'nix-store --dump', lowerIsBetter: true, peerOverOurs: true,
  });
}

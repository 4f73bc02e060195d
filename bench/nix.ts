// The Nix layer against Nix itself: `nixcas import` against `nix-store --add`
// and `nixcas nar` against `nix-store --dump`, on the same trees, each as the
// whole command a user runs (process start included), plus peak RSS.
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
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
  note?: string;
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

interface Measured {
  seconds: number;
  maxRssMb: number;
  stdout: string;
}

/** Runs a command under GNU time; stdout to a file (or /dev/null), returns wall time and peak RSS. */
function timed(command: string, args: string[], stdoutFile = '/dev/null'): Measured {
  const out = openSync(stdoutFile, 'w');
  const report = `${stdoutFile === '/dev/null' ? '/tmp' : stdoutFile}.time-${process.pid}`;
  try {
    const result = spawnSync('/usr/bin/time', ['-f', '%e %M', '-o', report, command, ...args], { stdio: ['ignore', out, 'pipe'], maxBuffer: 1 << 26 });
    if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed: ${result.stderr}`);
  } finally {
    closeSync(out);
  }
  const [seconds, rssKb] = execFileSync('tail', ['-n1', report], { encoding: 'utf8' }).trim().split(' ').map(Number) as [number, number];
  rmSync(report, { force: true });
  return { seconds, maxRssMb: rssKb / 1024, stdout: stdoutFile === '/dev/null' ? '' : execFileSync('cat', [stdoutFile], { encoding: 'utf8' }) };
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

/** `nix-store --delete` of a path nothing refers to, so the next --add does the full work. */
function forgetInNix(storePath: string): void {
  spawnSync('nix-store', ['--delete', storePath], { stdio: 'ignore' });
}

export function benchNix(rows: Row[], work: string, repeats: number, cli: string): void {
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

  for (const tree of cases) {
    const importTimes = { ours: [] as number[], peer: [] as number[] };
    const narTimes = { ours: [] as number[], peer: [] as number[] };
    let importRss = 0;
    let narRss = 0;
    let storePath = '';
    for (let i = 0; i < repeats; i++) {
      const store = join(work, `store-${i}`);
      const order = i % 2 === 0 ? (['ours', 'peer'] as const) : (['peer', 'ours'] as const);
      for (const who of order) {
        if (who === 'ours') {
          rmSync(store, { recursive: true, force: true });
          const run = timed(process.execPath, [cli, 'import', '--store', store, tree.dir], join(work, 'import.out'));
          importTimes.ours.push(run.seconds);
          importRss = Math.max(importRss, run.maxRssMb);
          storePath = run.stdout.trim();
        } else {
          if (storePath) forgetInNix(storePath);
          const run = timed('nix-store', ['--add', tree.dir], join(work, 'add.out'));
          importTimes.peer.push(run.seconds);
          if (storePath && run.stdout.trim() !== storePath) throw new Error(`nix-store --add gave ${run.stdout.trim()}, nixcas ${storePath}`);
          storePath = run.stdout.trim();
        }
      }
      for (const who of order) {
        if (who === 'ours') {
          const run = timed(process.execPath, [cli, 'nar', '--store', store, storePath]);
          narTimes.ours.push(run.seconds);
          narRss = Math.max(narRss, run.maxRssMb);
        } else {
          narTimes.peer.push(timed('nix-store', ['--dump', storePath]).seconds);
        }
      }
      if (i < repeats - 1) rmSync(store, { recursive: true, force: true });
    }
    const mb = tree.bytes / 1e6;
    rows.push({
      capability: `import, ${tree.label} (${mb.toFixed(0)} MB)`,
      ours: mb / median(importTimes.ours), peer: mb / median(importTimes.peer), unit: 'MB/s',
      peerName: 'nix-store --add', target: 1.0,
    });
    rows.push({
      capability: `NAR rendering, ${tree.label}`,
      ours: mb / median(narTimes.ours), peer: mb / median(narTimes.peer), unit: 'MB/s',
      peerName: 'nix-store --dump', target: 1.0,
    });
    rows.push({
      capability: `peak RSS: import / nar, ${tree.label}`,
      ours: importRss, peer: narRss, unit: 'MB', peerName: 'nar', lowerIsBetter: true,
      note: `limit 200 MB: ${importRss <= 200 && narRss <= 200 ? 'met' : 'MISSED'}`,
    });
    forgetInNix(storePath);
  }
}

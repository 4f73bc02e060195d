// `nixcas gc` against `nix-store --gc` (BENCH_ONLY=gc): the same store paths
// in a nixcas store and in a Nix store of its own (a chroot store, so the
// machine's /nix/store is not touched), half of them rooted, the other half
// garbage. Both stores are made once and copied afresh for each repeat,
// since a collection is the one thing that cannot be run twice.
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type Row, median, timed } from './nix.js';

const PATHS = Number(process.env.BENCH_GC_PATHS ?? 10_000);
const FILES_PER_PATH = 10;

function makeTrees(dir: string): string[] {
  const trees: string[] = [];
  for (let p = 0; p < PATHS; p++) {
    const tree = join(dir, `p${String(p).padStart(5, '0')}`);
    mkdirSync(join(tree, 'share'), { recursive: true });
    for (let f = 0; f < FILES_PER_PATH; f++) writeFileSync(join(tree, f % 2 ? 'share' : '.', `f${f}`), `path ${p} file ${f}\n`.repeat(1 + ((p * 31 + f) % 40)));
    trees.push(tree);
  }
  return trees;
}

/** Runs `command` with `args`, splitting the argument list so that no call is too long for execve. */
function inBatches(command: string, fixed: string[], args: string[], env: NodeJS.ProcessEnv = process.env): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i += 2000) {
    out.push(...execFileSync(command, [...fixed, ...args.slice(i, i + 2000)], { encoding: 'utf8', maxBuffer: 1 << 28, env }).trim().split('\n'));
  }
  return out;
}

function storeEntries(nixRoot: string): number {
  return readdirSync(join(nixRoot, 'nix/store')).filter((name) => !name.startsWith('.')).length;
}

export async function benchGc(rows: Row[], work: string, repeats: number, cli: string): Promise<void> {
  console.error(`bench gc: ${PATHS} store paths of ${FILES_PER_PATH} files, half of them rooted`);
  const trees = makeTrees(join(work, 'trees'));
  const nixcasStore = join(work, 'nixcas-store');
  const nixRoot = join(work, 'nix-root');
  const env = { ...process.env, NIXCAS_STORE: nixcasStore };
  const ours = inBatches(process.execPath, [cli, 'import'], trees, env);
  const theirs = inBatches('nix-store', ['--store', nixRoot, '--add'], trees);
  if (ours.join('\n') !== theirs.join('\n')) throw new Error('nixcas import and nix-store --add made different store paths');
  const kept = ours.filter((_, i) => i % 2 === 0);
  inBatches(process.execPath, [cli, 'root', 'add'], kept, env);
  const gcroots = join(nixRoot, 'nix/var/nix/gcroots/bench');
  mkdirSync(gcroots, { recursive: true });
  kept.forEach((path, i) => symlinkSync(path, join(gcroots, `keep-${i}`)));

  const seconds: Record<'nixcas' | 'nix', number[]> = { nixcas: [], nix: [] };
  const peakMb: Record<'nixcas' | 'nix', number[]> = { nixcas: [], nix: [] };
  const privateMb: Record<'nixcas' | 'nix', number[]> = { nixcas: [], nix: [] };
  for (let r = 0; r < repeats; r++) {
    const order = r % 2 === 0 ? (['nixcas', 'nix'] as const) : (['nix', 'nixcas'] as const);
    for (const side of order) {
      const copy = join(work, `${side}-${r}`);
      execFileSync('cp', ['-a', side === 'nixcas' ? nixcasStore : nixRoot, copy]);
      execFileSync('sync');
      const result =
        side === 'nixcas'
          ? await timed(process.execPath, [cli, 'gc', '--store', copy, '--json'], join(work, 'gc.json'))
          : await timed('nix-store', ['--store', copy, '--gc']);
      seconds[side].push(result.seconds);
      peakMb[side].push(result.peakRssMb);
      privateMb[side].push(result.peakAnonMb);
      const left = side === 'nixcas' ? JSON.parse(result.stdout).kept : storeEntries(copy);
      if (left !== kept.length) throw new Error(`${side} kept ${left} paths, not the ${kept.length} rooted ones`);
      execFileSync('rm', ['-rf', copy]);
    }
    console.error(`bench gc: repeat ${r + 1}: nixcas ${seconds.nixcas[r]!.toFixed(2)} s, nix-store --gc ${seconds.nix[r]!.toFixed(2)} s`);
  }
  const objects = `${PATHS} paths, ${PATHS * FILES_PER_PATH} files, half unreachable`;
  rows.push({
    capability: `gc: ${objects}`, ours: median(seconds.nixcas) * 1000, peer: median(seconds.nix) * 1000, unit: 'ms',
    peerName: 'nix-store --gc', target: 1, lowerIsBetter: true, peerOverOurs: true,
  });
  // Two rows, as the Nix bench has them: private memory, and the whole RSS, which also counts the
  // pages of the LMDB file the collector reads (clean page cache, mapped).
  const rss = median(peakMb.nixcas);
  const anon = median(privateMb.nixcas);
  rows.push({
    capability: 'gc: peak private memory (RssAnon)', ours: anon, peer: median(privateMb.nix), unit: 'MB',
    peerName: 'nix-store --gc', lowerIsBetter: true, note: `${anon <= 200 ? 'met' : 'MISSED'} (≤ 200 MB)`,
  });
  rows.push({
    capability: 'gc: peak RSS (VmHWM, with mapped LMDB pages)', ours: rss, peer: median(peakMb.nix), unit: 'MB',
    peerName: 'nix-store --gc', lowerIsBetter: true, note: `${rss <= 200 ? 'met' : 'MISSED'} (≤ 200 MB)`,
  });
}

// Substitution (`BENCH_ONLY=substitute`): a closure of 50 paths (~200 MB:
// each a 4 MB incompressible file and 100 small ones, in chains of five
// under one top path) built by Nix, written to a zstd binary cache by `nix
// copy --to file://`, served by Debian's nginx on loopback. Each repeat
// fetches the whole closure into an empty store: `nixcas copy --from` against
// `nix copy --from` into a fresh chroot store, both checking signatures.
// Then a second `nixcas copy --from` of the same path, which must make no
// upstream request (nginx's access log counts them). Sides alternate, each
// after an untimed sync.
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { startNginx, stopNginx } from '../test/nginx.js';
import { settledAccessLog, startNixcas } from '../test/helpers.js';
import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import { type Row, median, timed } from './nix.js';

const PATHS = 50;
/** NARs nixcas downloads at once (`copy --jobs`; BENCH_SUBSTITUTE_JOBS). */
const JOBS = process.env.BENCH_SUBSTITUTE_JOBS ?? '4';

function closureExpression(): string {
  return `let
  mk = i: refs: derivation {
    name = "bench-sub-\${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      mkdir -p $out/share
      head -c 4000000 /dev/urandom > $out/blob
      i=0; while [ $i -lt 100 ]; do echo "file $i of path \${toString i}: \${refs}" > $out/share/f$i; i=$((i+1)); done
    '' ];
  };
  # chains of five: path i refers to path i - 1 unless i is a multiple of five
  paths = builtins.genList (i: i) ${PATHS - 1};
  built = builtins.foldl' (acc: i: acc ++ [ (mk i (if i - (i / 5) * 5 == 0 then "" else toString (builtins.elemAt acc (i - 1)))) ]) [] paths;
in mk ${PATHS - 1} (builtins.concatStringsSep " " (map toString built))
`;
}

function run(command: string, args: string[], env: NodeJS.ProcessEnv = {}): string {
  const result = spawnSync(command, args, { encoding: 'utf8', env: { ...process.env, ...env }, maxBuffer: 1 << 26 });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed: ${result.stderr}`);
  return result.stdout;
}

export async function benchSubstitute(rows: Row[], work: string, repeats: number, cli: string): Promise<void> {
  if (!existsSync('/usr/sbin/nginx')) {
    rows.push({ capability: 'substitution', ours: NaN, peer: NaN, unit: '', peerName: 'nix copy --from', note: 'skipped: install nginx-light' });
    return;
  }
  console.error('bench substitute: building the closure and its binary cache');
  const expression = join(work, 'closure.nix');
  writeFileSync(expression, closureExpression());
  const nixOptions = ['--extra-experimental-features', 'nix-command', '--option', 'substituters', '', '--option', 'narinfo-cache-negative-ttl', '0', '--option', 'narinfo-cache-positive-ttl', '0'];
  const top = run('nix-build', ['--option', 'sandbox', 'false', '--option', 'substituters', '', expression, '--no-out-link']).trim();
  const closure = run('nix-store', ['-qR', top]).trim().split('\n');
  const size = closure.reduce((sum, path) => sum + Number(run('nix-store', ['-q', '--size', path]).trim()), 0);
  run('nix-store', ['--generate-binary-cache-key', 'bench-1', join(work, 'sk'), join(work, 'pk')]);
  const publicKey = readFileSync(join(work, 'pk'), 'utf8').trim();
  const home = join(work, 'home');
  mkdirSync(home, { recursive: true });
  run('nix', [...nixOptions, 'copy', '--to', `file://${join(work, 'cache')}?compression=zstd&secret-key=${join(work, 'sk')}`, top], { HOME: home });
  const nginx = await startNginx('/usr/sbin/nginx', join(work, 'nginx'), join(work, 'cache'), { accessLog: true });
  const ours: { seconds: number; rss: number }[] = [];
  const theirs: { seconds: number; rss: number }[] = [];
  let secondRequests = NaN;
  const lazily: number[] = [];
  try {
    for (let i = 0; i < repeats; i++) {
      console.error(`bench substitute: repeat ${i + 1} of ${repeats}`);
      const store = join(work, `store-${i}`);
      const root = join(work, `nix-root-${i}`);
      let a: Awaited<ReturnType<typeof timed>> | undefined;
      let b: Awaited<ReturnType<typeof timed>> | undefined;
      // Sides alternate, and each starts after a sync: Nix leaves its files to the page cache, so
      // without it whoever runs next pays for the other's writeback.
      for (const side of i % 2 === 0 ? ['nixcas', 'nix'] : ['nix', 'nixcas']) {
        run('sync', []);
        if (side === 'nixcas') {
          a = await timed(process.execPath, [cli, 'copy', '--store', store, '--from', nginx.base, '--trusted-public-key', publicKey, '--jobs', JOBS, top]);
          ours.push({ seconds: a.seconds, rss: a.peakRssMb });
          const before = nginx.requests().length;
          await timed(process.execPath, [cli, 'copy', '--store', store, '--from', nginx.base, '--trusted-public-key', publicKey, top]);
          secondRequests = nginx.requests().length - before;
        } else {
          b = await timed('nix', [...nixOptions, 'copy', '--from', nginx.base, '--to', root, '--option', 'require-sigs', 'true', '--option', 'trusted-public-keys', publicKey, top], '/dev/null', { HOME: home });
          theirs.push({ seconds: b.seconds, rss: b.peakRssMb });
        }
      }
      if (process.getuid?.() === 0) {
        // Lazily, through a FUSE mount: the first read of the top path's file substitutes the path and its closure.
        const mountpoint = join(work, `mnt-${i}`);
        const mountStore = join(work, `mount-store-${i}`);
        mkdirSync(mountpoint, { recursive: true });
        const mount = await startNixcas(['mount', '--store', mountStore, '--substituter', nginx.base, '--trusted-public-key', publicKey, '--substituter-jobs', JOBS, mountpoint], 'mounted at');
        try {
          run('sync', []);
          const started = process.hrtime.bigint();
          const bytes = (await readFile(join(mountpoint, basename(top), 'blob'))).length;
          lazily.push(Number(process.hrtime.bigint() - started) / 1e9);
          if (bytes !== 4_000_000) throw new Error(`read ${bytes} bytes of ${top}/blob through the mount`);
        } finally {
          await mount.stop();
          rmSync(mountStore, { recursive: true, force: true });
        }
      }
      console.error(`bench substitute: nixcas ${a!.seconds.toFixed(2)} s (${a!.peakRssMb.toFixed(0)} MB), nix copy ${b!.seconds.toFixed(2)} s (${b!.peakRssMb.toFixed(0)} MB)${lazily[i] !== undefined ? `, through a mount ${lazily[i]!.toFixed(2)} s` : ''}`);
      rmSync(store, { recursive: true, force: true });
      run('chmod', ['-R', 'u+w', root]);
      rmSync(root, { recursive: true, force: true });
    }
  } finally {
    await stopNginx(nginx);
  }
  const mb = size / 1e6;
  const capability = `substitution (--jobs ${JOBS}): ${closure.length} paths (${mb.toFixed(0)} MB of NAR) from a zstd cache on nginx into an empty store`;
  rows.push({ capability, ours: mb / median(ours.map((s) => s.seconds)), peer: mb / median(theirs.map((s) => s.seconds)), unit: 'MB/s', peerName: 'nix copy --from', target: 1 });
  if (lazily.length) {
    rows.push({ capability: `substitution through a FUSE mount (--substituter-jobs ${JOBS}): the first read of the top path's file, its closure fetched on lookup`, ours: mb / median(lazily), peer: mb / median(theirs.map((s) => s.seconds)), unit: 'MB/s', peerName: 'nix copy --from', target: 1 });
  }
  rows.push({ capability: 'substitution: peak RSS while substituting', ours: Math.max(...ours.map((s) => s.rss)), peer: Math.max(...theirs.map((s) => s.rss)), unit: 'MB', peerName: 'nix copy --from', lowerIsBetter: true, note: 'target ≤ 200 MB' });
  rows.push({ capability: 'substitution: upstream requests on a second copy of the same closure', ours: secondRequests, peer: 0, unit: 'requests', peerName: 'none expected', note: secondRequests === 0 ? 'met' : 'MISSED' });
  await benchSubstituteObjects(rows, work, repeats, cli, nixOptions, home);
}

const LARGE_FILES = 20;
const SMALL_FILES = 200;

/** Deterministic bytes for a bench file (SHA-256 in counter mode). */
function contents(size: number, seed: string): Buffer {
  const out = Buffer.alloc(size);
  for (let at = 0, block = 0; at < size; block++) at += createHash('sha256').update(`${seed}/${block}`).digest().copy(out, at);
  return out;
}

/**
 * From another nixcas: a new version of a path (one of 20 large files and 10 of 200 small ones
 * changed) whose old version the store has. nixcas fetches the blobs it lacks from the bridge's
 * castore; `nix copy --from` the same bridge, into a chroot store that has the old version,
 * fetches the new version's NAR. Bytes are what the bridge's access log says it sent.
 */
async function benchSubstituteObjects(rows: Row[], work: string, repeats: number, cli: string, nixOptions: string[], home: string): Promise<void> {
  console.error('bench substitute: from another nixcas, a new version of a path the store has');
  const old = join(work, 'objects-old');
  mkdirSync(join(old, 'share'), { recursive: true });
  for (let i = 0; i < LARGE_FILES; i++) writeFileSync(join(old, `large-${i}`), contents(4_000_000, `large ${i}`));
  for (let i = 0; i < SMALL_FILES; i++) writeFileSync(join(old, 'share', `small-${i}`), contents(500 + i * 20, `small ${i}`));
  const updated = join(work, 'objects-new');
  cpSync(old, updated, { recursive: true });
  writeFileSync(join(updated, 'large-0'), contents(4_000_000, 'large 0, version 2'));
  for (let i = 0; i < 10; i++) writeFileSync(join(updated, 'share', `small-${i}`), contents(500 + i * 20, `small ${i}, version 2`));
  const upstream = join(work, 'objects-upstream');
  const [oldPath, newPath] = [old, updated].map((tree) => run(process.execPath, [cli, 'import', '--store', upstream, tree]).trim());
  run('nix-store', ['--generate-binary-cache-key', 'objects-1', join(work, 'objects.sk'), join(work, 'objects.pk')]);
  const publicKey = readFileSync(join(work, 'objects.pk'), 'utf8').trim();
  const bridge = await startNixcas(['nar-bridge', '--store', upstream, '--listen', '127.0.0.1:0', '--sign-key', join(work, 'objects.sk')], 'listening on');
  try {
    const base = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(bridge.output())![1]!;
    const settledLog = () => settledAccessLog(base, bridge.output);
    /** Body bytes the bridge sent between two settled points of its log. */
    const sentBetween = (from: number, to: number): number =>
      bridge.output().slice(from, to).split('\n').filter((line) => !line.includes('marker=')).reduce((sum, line) => sum + Number(/" \d{3} (\d+) /.exec(line)?.[1] ?? 0), 0);
    const ours: { seconds: number; bytes: number }[] = [];
    const theirs: { seconds: number; bytes: number }[] = [];
    for (let r = 0; r < repeats; r++) {
      const store = join(work, `objects-local-${r}`);
      if (run(process.execPath, [cli, 'import', '--store', store, old]).trim() !== oldPath) throw new Error('the old version imported under another path');
      const root = join(work, `objects-nix-root-${r}`);
      run('nix', [...nixOptions, 'copy', '--from', base, '--to', root, '--option', 'trusted-public-keys', publicKey, oldPath!], { HOME: home });
      for (const side of r % 2 === 0 ? ['nixcas', 'nix'] : ['nix', 'nixcas']) {
        const from = await settledLog(); // the untimed copy of the old version is not counted
        if (side === 'nixcas') {
          const a = await timed(process.execPath, [cli, 'copy', '--store', store, '--from', base, '--trusted-public-key', publicKey, newPath!]);
          ours.push({ seconds: a.seconds, bytes: sentBetween(from, await settledLog()) });
        } else {
          const b = await timed('nix', [...nixOptions, 'copy', '--from', base, '--to', root, '--option', 'trusted-public-keys', publicKey, newPath!], '/dev/null', { HOME: home });
          theirs.push({ seconds: b.seconds, bytes: sentBetween(from, await settledLog()) });
        }
      }
      run(process.execPath, [cli, 'verify', '--check-contents', '--store', store, newPath!]); // exit 1 on anything missing or damaged
      console.error(`bench substitute: objects: nixcas ${ours[r]!.seconds.toFixed(2)} s, ${(ours[r]!.bytes / 1e6).toFixed(1)} MB; nix copy ${theirs[r]!.seconds.toFixed(2)} s, ${(theirs[r]!.bytes / 1e6).toFixed(1)} MB`);
      run('chmod', ['-R', 'u+w', root]);
      rmSync(root, { recursive: true, force: true });
      rmSync(store, { recursive: true, force: true });
    }
    const what = `a new version of a path the store has (${LARGE_FILES} × 4 MB and ${SMALL_FILES} small files, 1 and 10 changed) from a nixcas nar-bridge`;
    rows.push({ capability: `substitution of ${what}`, ours: median(ours.map((s) => s.seconds)) * 1000, peer: median(theirs.map((s) => s.seconds)) * 1000, unit: 'ms', peerName: 'nix copy --from the same bridge (the whole NAR)', lowerIsBetter: true, peerOverOurs: true });
    rows.push({ capability: 'substitution from a nixcas nar-bridge: bytes sent by the bridge', ours: median(ours.map((s) => s.bytes)) / 1e6, peer: median(theirs.map((s) => s.bytes)) / 1e6, unit: 'MB', peerName: 'nix copy --from (the whole NAR)', lowerIsBetter: true });
  } finally {
    await bridge.stop();
  }
}

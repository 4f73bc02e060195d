// Substitution (`BENCH_ONLY=substitute`): a closure of 50 paths (~200 MB:
// each a 4 MB incompressible file and 100 small ones, in chains of five
// under one top path) built by Nix, written to a zstd binary cache by `nix
// copy --to file://`, served by Debian's nginx on loopback. Each repeat
// fetches the whole closure into an empty store: `nixcas copy --from` against
// `nix copy --from` into a fresh chroot store, both checking signatures.
// Then a second `nixcas copy --from` of the same path, which must make no
// upstream request (nginx's access log counts them).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startNginx, stopNginx } from '../test/nginx.js';
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
  try {
    for (let i = 0; i < repeats; i++) {
      console.error(`bench substitute: repeat ${i + 1} of ${repeats}`);
      const store = join(work, `store-${i}`);
      const a = await timed(process.execPath, [cli, 'copy', '--store', store, '--from', nginx.base, '--trusted-public-key', publicKey, '--jobs', JOBS, top]);
      ours.push({ seconds: a.seconds, rss: a.peakRssMb });
      const before = nginx.requests().length;
      await timed(process.execPath, [cli, 'copy', '--store', store, '--from', nginx.base, '--trusted-public-key', publicKey, top]);
      secondRequests = nginx.requests().length - before;
      rmSync(store, { recursive: true, force: true });
      const root = join(work, `nix-root-${i}`);
      const b = await timed('nix', [...nixOptions, 'copy', '--from', nginx.base, '--to', root, '--option', 'require-sigs', 'true', '--option', 'trusted-public-keys', publicKey, top], '/dev/null', { HOME: home });
      theirs.push({ seconds: b.seconds, rss: b.peakRssMb });
      console.error(`bench substitute: nixcas ${a.seconds.toFixed(2)} s (${a.peakRssMb.toFixed(0)} MB), nix copy ${b.seconds.toFixed(2)} s (${b.peakRssMb.toFixed(0)} MB)`);
      run('chmod', ['-R', 'u+w', root]);
      rmSync(root, { recursive: true, force: true });
    }
  } finally {
    await stopNginx(nginx);
  }
  const mb = size / 1e6;
  const capability = `substitution (--jobs ${JOBS}): ${closure.length} paths (${mb.toFixed(0)} MB of NAR) from a zstd cache on nginx into an empty store`;
  rows.push({ capability, ours: mb / median(ours.map((s) => s.seconds)), peer: mb / median(theirs.map((s) => s.seconds)), unit: 'MB/s', peerName: 'nix copy --from', target: 1 });
  rows.push({ capability: 'substitution: peak RSS while substituting', ours: Math.max(...ours.map((s) => s.rss)), peer: Math.max(...theirs.map((s) => s.rss)), unit: 'MB', peerName: 'nix copy --from', lowerIsBetter: true, note: 'target ≤ 200 MB' });
  rows.push({ capability: 'substitution: upstream requests on a second copy of the same closure', ours: secondRequests, peer: 0, unit: 'requests', peerName: 'none expected', note: secondRequests === 0 ? 'met' : 'MISSED' });
}

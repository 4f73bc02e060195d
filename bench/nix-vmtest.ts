// What nix/default.nix's lib.mkVMTest adds (BENCH_ONLY=nix-vmtest): the wall time of
// `nix-build nix -A tests.storeBinary` (evaluation, the closure copied from
// exportReferencesGraph, nixcas virtiofs, the guest, the script) next to the same check run
// directly (nixcas copy of the same closure, then the same runner). The package and the script
// are built first, untimed; each timed build gets a new salt, so it really runs.
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Row, median, timed } from './nix.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const NIX_FLAGS = ['--option', 'sandbox', 'false', '--option', 'substituters', ''];

function nixBuild(args: string[]): string {
  return execFileSync('nix-build', [join(ROOT, 'nix'), ...NIX_FLAGS, '--no-out-link', ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}

export async function benchNixVmtest(rows: Row[], work: string, repeats: number): Promise<void> {
  if (process.getuid?.() !== 0) {
    console.error('bench nix-vmtest: skipped (needs root and nix-bin)');
    return;
  }
  const nixcas = nixBuild(['-A', 'nixcas']);
  const script = nixBuild(['-A', 'tests.storeBinary.script']);
  const closure = execFileSync('nix', ['--extra-experimental-features', 'nix-command', 'path-info', '--json', '--recursive', script]);
  const closureFile = join(work, 'closure.json');
  writeFileSync(closureFile, closure);
  const runner = join(nixcas, 'lib/nixcas/dist/vmtest/run-vm-test.cjs');
  const cli = join(nixcas, 'lib/nixcas/dist/cli/nixcas.cjs');
  const times: Record<'nix' | 'direct', number[]> = { nix: [], direct: [] };
  for (let r = 0; r < repeats; r++) {
    const order = r % 2 === 0 ? (['nix', 'direct'] as const) : (['direct', 'nix'] as const);
    for (const side of order) {
      const salt = `bench-${process.pid}-${Date.now()}-${r}`;
      const result =
        side === 'nix'
          ? await timed('nix-build', [join(ROOT, 'nix'), ...NIX_FLAGS, '--no-out-link', '-A', 'tests.storeBinary', '--argstr', 'salt', salt])
          : await timed('sh', ['-c', `"$0" "$1" copy --store "$2/store" "$3" && "$0" "$4" --nixcas "$1" --store "$2/store" --script "$5" --out "$2/out"`,
              process.execPath, cli, join(work, salt), closureFile, runner, script]);
      times[side].push(result.seconds * 1000);
    }
    console.error(`bench nix-vmtest: repeat ${r + 1}: nix-build ${times.nix[r]!.toFixed(0)} ms, direct ${times.direct[r]!.toFixed(0)} ms`);
  }
  const added = median(times.nix) - median(times.direct);
  rows.push({
    capability: 'nix-build of one microVM test (tests.storeBinary), against the same check run directly', ours: median(times.nix), peer: median(times.direct),
    unit: 'ms', peerName: 'nixcas copy + run-vm-test', lowerIsBetter: true, peerOverOurs: true,
    note: `Nix adds ${added.toFixed(0)} ms: ${added < 1000 ? 'met' : 'MISSED'} (< 1000 ms)`,
  });
}

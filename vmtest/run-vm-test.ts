// One microVM test, as nix/default.nix's lib.mkVMTest runs it inside a build
// (bundled to dist/vmtest/run-vm-test.cjs): serve a store with `nixcas
// virtiofs`, boot a guest that mounts it at /nix/store, run a script from the
// store, and leave the console log, the timings and the script's status in
// OUT. Exits with the script's status (1 when the guest did not finish, 2 on
// bad arguments), and leaves no daemon or socket behind.
//
//   run-vm-test --nixcas CLI --store DIR --script /nix/store/…-script --out DIR [--timeout S] [--memory MiB] [-- nixcas virtiofs flags…]
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { type Backend, bootGuest, buildInitramfs, startNixcasVirtiofs, stopAll, VmError } from './harness.js';

const USAGE = 'usage: run-vm-test --nixcas CLI --store DIR --script STORE_PATH --out DIR [--timeout SECONDS] [--memory MiB] [-- VIRTIOFS_FLAGS…]';

/** Mounts the store, then runs the script: directly when it names its interpreter (#!), else with sh. */
function guestScript(script: string): string {
  return `mkdir -p /nix/store
capture mount mount -t virtiofs -o ro nixstore /nix/store
if [ "$(head -c 2 '${script}')" = '#!' ]; then '${script}'; else sh '${script}'; fi
status=$?
result script.status $status
exit $status`;
}

async function main(): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        nixcas: { type: 'string' }, store: { type: 'string' }, script: { type: 'string' }, out: { type: 'string' },
        timeout: { type: 'string', default: '300' }, memory: { type: 'string', default: '512' },
      },
      allowPositionals: true,
    });
  } catch (err) {
    console.error(`run-vm-test: ${(err as Error).message}\n${USAGE}`);
    return 2;
  }
  const { nixcas, store, script, out } = parsed.values;
  const timeout = Number(parsed.values.timeout);
  const memory = Number(parsed.values.memory);
  if (!nixcas || !store || !script || !out || !(timeout > 0) || !(memory >= 128)) {
    console.error(`run-vm-test: ${USAGE}`);
    return 2;
  }
  mkdirSync(out, { recursive: true });
  const work = mkdtempSync(join(tmpdir(), 'nixcas-vm-test-'));
  const timings: Record<string, number> = {};
  const started = performance.now();
  let backend: Backend | undefined;
  try {
    backend = await startNixcasVirtiofs({ cli: nixcas, store, socketPath: join(work, 'fs.sock'), listRoot: true, extraArgs: parsed.positionals });
    timings.daemonStartMs = Math.round(performance.now() - started);
    const initramfs = buildInitramfs({ guestScript: guestScript(script), cacheDir: join(work, 'cache') });
    const booted = performance.now();
    const result = await bootGuest({ initramfs, backend, memoryMiB: memory, timeoutMs: timeout * 1000 });
    timings.vmMs = Math.round(performance.now() - booted);
    Object.assign(timings, result.timings);
    writeFileSync(join(out, 'log'), result.output);
    const status = Number(result.results['script.status'] ?? result.exitStatus);
    writeFileSync(join(out, 'status'), `${status}\n`);
    writeFileSync(join(out, 'timings.json'), `${JSON.stringify({ ...timings, totalMs: Math.round(performance.now() - started) }, null, 2)}\n`);
    if (result.results['mount.rc'] !== '0') {
      console.error(`run-vm-test: the guest could not mount the store:\n${result.results['mount.out'] ?? ''}`);
      return 1;
    }
    // A failed build's output is deleted: its log must be in the build log.
    if (status !== 0) console.error(`--- guest console ---\n${result.output.trim()}\n---`);
    console.error(`run-vm-test: the script ${status === 0 ? 'passed' : `failed (exit status ${status})`} in ${(timings.vmMs / 1000).toFixed(2)} s of VM time${status === 0 ? `; its log: ${join(out, 'log')}` : ''}`);
    return status === 0 ? 0 : 1;
  } catch (err) {
    const message = err instanceof VmError ? `${err.message}\n--- guest console (end) ---\n${err.output.slice(-4000)}` : (err as Error).message;
    writeFileSync(join(out, 'log'), err instanceof VmError ? err.output : message);
    console.error(`run-vm-test: ${message}`);
    return 1;
  } finally {
    await backend?.stop();
    await stopAll();
    rmSync(work, { recursive: true, force: true });
  }
}

process.on('SIGTERM', () => process.exit(143));
process.on('SIGINT', () => process.exit(130));
main().then((code) => process.exit(code), (err: unknown) => {
  console.error(`run-vm-test: ${(err as Error)?.stack ?? err}`);
  process.exit(1);
});

// nix/default.nix built by real Nix (nix-bin): nixcas as a store path, and microVM tests as
// derivations (lib.mkVMTest) that pass, fail, hang or name a path the host store lacks. Needs
// root and nix-build; without them the suite says what is missing and skips.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { ROOT, removeDir, tempDir } from './helpers.js';

/** A new salt per run: the tests are built (booted) again, not found built by an earlier run. */
const SALT = `run-${Date.now()}`;
const NIX_BUILD = ['--option', 'sandbox', 'false', '--option', 'substituters', '', '--argstr', 'salt', SALT];
/** The nar-bridge test runs `nix copy` inside its build, which a build user may not. */
const AS_ROOT = ['--option', 'build-users-group', ''];

function nixBuild(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const run = spawnSync('nix-build', [join(ROOT, 'nix'), ...NIX_BUILD, ...args], { encoding: 'utf8', timeout: 600_000, maxBuffer: 1 << 26 });
  if (run.error) throw run.error;
  return { status: run.status, stdout: run.stdout, stderr: run.stderr };
}

const missing = process.getuid?.() !== 0 ? 'root' : spawnSync('nix-build', ['--version']).status !== 0 ? 'nix-build (apt-get install nix-bin)' : undefined;
if (missing) console.log(`# nix/ tests skipped: they need ${missing}`);

describe('nix/default.nix', { skip: missing && `needs ${missing}` }, () => {
  test('nix-build nix -A nixcas gives a working result/bin/nixcas', () => {
    const work = tempDir('nix-package');
    try {
      const built = nixBuild(['-A', 'nixcas', '-o', join(work, 'result')]);
      assert.equal(built.status, 0, built.stderr);
      const version = spawnSync(join(work, 'result/bin/nixcas'), ['--version'], { encoding: 'utf8', cwd: '/' });
      assert.equal(version.stdout.trim(), JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version);
    } finally {
      removeDir(work);
    }
  });

  test('nix-build nix -A tests: every guest ran its script from the store, seeded by nixcas copy or nix copy --to nar-bridge', () => {
    const work = tempDir('nix-vmtests');
    try {
      const built = nixBuild(['-A', 'tests', ...AS_ROOT, '-o', join(work, 'result')]);
      assert.equal(built.status, 0, built.stderr);
      const outputs = readdirSync(work).filter((name) => name.startsWith('result')).map((name) => join(work, name));
      assert.equal(outputs.length, 4);
      const logs = outputs.map((out) => {
        assert.equal(readFileSync(join(out, 'status'), 'utf8'), '0\n');
        const timings = JSON.parse(readFileSync(join(out, 'timings.json'), 'utf8'));
        assert.ok(timings.vmMs > 0 && timings.totalMs >= timings.vmMs, JSON.stringify(timings));
        return readFileSync(join(out, 'log'), 'latin1');
      });
      assert.ok(logs.some((log) => log.includes('busybox from the store runs')), 'the store binary ran');
      assert.ok(logs.some((log) => log.includes("running under") && log.includes("interpreter from the store")), 'the store interpreter ran');
      assert.match(built.stderr, /vmtest-seeded-through-bridge/, 'built now, not found built');
      assert.match(built.stderr, /nixcas copy: 3 copied/);
    } finally {
      removeDir(work);
    }
  });

  test('a failing script fails the build with the guest console in the build log, leaving nothing behind', () => {
    const failed = nixBuild(['-A', 'failingTests.scriptFails', '--no-out-link']);
    assert.notEqual(failed.status, 0);
    assert.match(failed.stderr, /this test fails on purpose/);
    assert.match(failed.stderr, /the script failed \(exit status 3\)/);
    const left = spawnSync('pgrep', ['-f', 'run-vm-test|nixcas-vm-test'], { encoding: 'utf8' });
    assert.equal(left.stdout, '', 'no runner, daemon or guest left running');
  });

  test('a guest that hangs is killed after the timeout and fails the build', () => {
    const hung = nixBuild(['-A', 'failingTests.hangs', '--no-out-link']);
    assert.notEqual(hung.status, 0);
    assert.match(hung.stderr, /guest did not finish within 8000 ms/);
    assert.match(hung.stderr, /this guest hangs on purpose/);
  });

  test('nix/package.nix parses, and every file its source set names exists', () => {
    const parsed = spawnSync('nix-instantiate', ['--parse', join(ROOT, 'nix/package.nix')], { encoding: 'utf8' });
    assert.equal(parsed.status, 0, parsed.stderr);
    const text = readFileSync(join(ROOT, 'nix/package.nix'), 'utf8');
    const named = [.../unions \[([^\]]*)\]/s.exec(text)![1]!.matchAll(/\.\.\/([\w.-]+)/g)].map((m) => m[1]!);
    assert.ok(named.includes('package-lock.json') && named.includes('src'), named.join(' '));
    for (const name of named) assert.ok(existsSync(join(ROOT, name)), `nix/package.nix names ${name}, which is not there`);
  });

  test('a closure path the host store lacks fails before any VM boots, naming it', () => {
    const absent = '/nix/store/00000000000000000000000000000000-absent';
    assert.ok(!existsSync(absent));
    const expr = `(import ${join(ROOT, 'nix')} { salt = "${SALT}"; }).lib.mkVMTest { name = "absent"; paths = [ (builtins.storePath "${absent}") ]; script = "true"; }`;
    const run = spawnSync('nix-build', ['--option', 'sandbox', 'false', '--option', 'substituters', '', '--no-out-link', '-E', expr], { encoding: 'utf8', timeout: 120_000 });
    assert.notEqual(run.status, 0);
    assert.match(run.stderr, /00000000000000000000000000000000-absent/);
    assert.doesNotMatch(run.stderr, /run-vm-test/);
  });
});

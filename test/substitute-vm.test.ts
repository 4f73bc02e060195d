// Substitution seen from a microVM: `nixcas virtiofs --substituter` in front of a binary cache Nix
// wrote, served by nginx. A guest looks up a path only the cache has and runs a program from it;
// a second guest sees it with no upstream request (nginx's access log proves it).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { bootGuest, buildInitramfs, ensureVmPackages, startNixcasVirtiofs } from '../vmtest/harness.js';
import { buildClosureFixture, makeEmptyStore, nix, removeDir, tempDir } from './helpers.js';
import { startNginx, stopNginx } from './nginx.js';

const skip = process.getuid?.() !== 0 ? 'boots QEMU and builds with Nix as root' : undefined;

test('a guest runs a program from a path only a binary cache has; a second guest needs no upstream request', { skip, timeout: 240_000 }, async () => {
  ensureVmPackages();
  const work = tempDir('substitute-vm');
  try {
    const attrs = buildClosureFixture(join(work, 'closure.json'));
    const paths = (JSON.parse(readFileSync(attrs, 'utf8')).closure as { path: string }[]).map((e) => e.path);
    const leaf = paths.find((p) => p.endsWith('-leaf'))!;
    nix('nix-store', ['--generate-binary-cache-key', 'vm-cache-1', join(work, 'sk'), join(work, 'pk')]);
    const copy = spawnSync('nix', ['--extra-experimental-features', 'nix-command', '--option', 'substituters', '', 'copy', '--to', `file://${join(work, 'cache')}?secret-key=${join(work, 'sk')}`, leaf], { encoding: 'utf8', env: { ...process.env, HOME: work } });
    assert.equal(copy.status, 0, copy.stderr);
    const nginx = await startNginx('/usr/sbin/nginx', join(work, 'nginx'), join(work, 'cache'), { accessLog: true });
    const store = join(work, 'store');
    await makeEmptyStore(store);
    const backend = await startNixcasVirtiofs({
      socketPath: join(work, 'fs.sock'), store,
      extraArgs: ['--substituter', nginx.base, '--trusted-public-key', readFileSync(join(work, 'pk'), 'utf8').trim()],
    });
    try {
      // leaf's bin/run is a `#!/bin/sh` script: the guest's busybox runs it from the store.
      const initramfs = buildInitramfs({
        guestScript: `set -e
          mkdir -p /nix/store
          capture mount mount -t virtiofs -o ro nixstore /nix/store
          capture run ${leaf}/bin/run
          capture hello cat ${leaf}/share/hello`,
      });
      for (const vm of [1, 2]) {
        const r = await bootGuest({ initramfs, backend, memoryMiB: 512, timeoutMs: 120_000 });
        assert.equal(r.exitStatus, 0, `VM ${vm}: ${r.output}\n--- back end ---\n${backend.output()}`);
        assert.equal(r.results['run.out'], 'hi', `VM ${vm}`);
        assert.equal(r.results['hello.out'], 'hello', `VM ${vm}`);
      }
      const hash = leaf.slice('/nix/store/'.length, '/nix/store/'.length + 32);
      const asked = nginx.requests().filter((line) => line.includes(`/${hash}.narinfo `));
      assert.deepEqual(asked.map((line) => line.split(' ').pop()), ['200'], 'one narinfo request, by the first VM');
      assert.equal(nginx.requests().filter((line) => line.includes('/nar/')).length, 1, 'one NAR download');
    } finally {
      await backend.stop();
      await stopNginx(nginx);
    }
  } finally {
    removeDir(work);
  }
});

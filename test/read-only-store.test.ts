// A store on a read-only file system is served by the commands that only read
// (issue #22, "read-only stores"): they open LMDB read-only and write nothing,
// not even a marker upgrade or a temp-file clean-up. So is a store the user
// can read but not write; a command that writes it fails, naming the store.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { CLI, bridgeNarUrl, nix, nixcas, nixcasBytes, removeDir, startNixcas, tempDir } from './helpers.js';

const skip = process.getuid?.() !== 0 ? 'bind mounts need root (as in CI)' : undefined;

test('a store on a read-only bind mount: nar (both renderers), virtiofs and nar-bridge serve it', { skip }, async () => {
  const work = tempDir('ro-store');
  const readOnly = join(work, 'ro');
  let mounted = false;
  try {
    const tree = join(work, 'tree');
    mkdirSync(tree);
    writeFileSync(join(tree, 'hello'), 'hello\n');
    writeFileSync(join(tree, 'large'), Buffer.alloc(200_000, 7)); // a blob file, not a small blob
    const store = join(work, 'store');
    const path = nixcas(['import', '--store', store, tree]).stdout.trim();
    mkdirSync(readOnly);
    for (const args of [['--bind', store, readOnly], ['-o', 'remount,ro,bind', readOnly]]) {
      const r = spawnSync('mount', args, { encoding: 'utf8' });
      assert.equal(r.status, 0, `mount ${args.join(' ')}: ${r.stderr}`);
      mounted = true;
    }
    assert.throws(() => writeFileSync(join(readOnly, 'probe'), 'x'), /EROFS/, 'the bind mount is read-only');

    const expected = nix('nix-store', ['--dump', tree]);
    for (const renderer of ['0', '1']) {
      const nar = nixcasBytes(['nar', '--store', readOnly, path], { NIXCAS_NATIVE_NAR: renderer });
      assert.ok(nar.equals(expected), `nar with NIXCAS_NATIVE_NAR=${renderer} renders the path`);
    }
    const fs = await startNixcas(['virtiofs', join(work, 'fs.sock'), '--store', readOnly], 'listening on');
    assert.equal(await fs.stop(), 0);
    const bridge = await startNixcas(['nar-bridge', '--store', readOnly, '--listen', '127.0.0.1:0'], 'listening on');
    try {
      const { port, url } = await bridgeNarUrl(bridge, path);
      const served = Buffer.from(await (await fetch(`http://127.0.0.1:${port}/${url}`)).arrayBuffer());
      assert.ok(served.equals(expected), 'the bridge serves the NAR from the read-only store');
    } finally {
      await bridge.stop();
    }
  } finally {
    if (mounted) spawnSync('umount', [readOnly]);
    removeDir(work);
  }
});

test('a store the user can read but not write is served to them by the commands that read', { skip }, () => {
  const work = tempDir('ro-user');
  try {
    chmodSync(work, 0o755);
    const tree = join(work, 'tree');
    mkdirSync(tree);
    writeFileSync(join(tree, 'hello'), 'hello\n');
    const store = join(work, 'store');
    const path = nixcas(['import', '--store', store, tree]).stdout.trim();
    const expected = nix('nix-store', ['--dump', tree]);
    for (const renderer of ['0', '1']) {
      const asNobody = spawnSync('setpriv', ['--reuid', 'nobody', '--regid', 'nogroup', '--clear-groups', process.execPath, CLI, 'nar', '--store', store, path], {
        env: { ...process.env, NIXCAS_NATIVE_NAR: renderer, HOME: '/nonexistent' },
      });
      assert.equal(asNobody.status, 0, `nobody renders with NIXCAS_NATIVE_NAR=${renderer}: ${asNobody.stderr}`);
      assert.ok(asNobody.stdout.equals(expected));
    }
    // And nobody could not have written anything: the store is root's, 0755.
    const write = spawnSync('setpriv', ['--reuid', 'nobody', '--regid', 'nogroup', '--clear-groups', process.execPath, CLI, 'import', '--store', store, tree], {
      env: { ...process.env, HOME: '/nonexistent' },
      encoding: 'utf8',
    });
    assert.notEqual(write.status, 0, 'an import as nobody fails');
    assert.ok(write.stderr.includes(store), `naming the store: ${write.stderr}`);
  } finally {
    removeDir(work);
  }
});

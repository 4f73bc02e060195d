// A local store in front of a remote one (--local-cache): a store path's files are read through
// a nixcas daemon over gRPC once, then from the local cache even with the daemon gone; what was
// never read is not there.
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { nixcas, nixcasBytes, removeDir, seededBytes, startDaemon, tempDir } from './helpers.js';

test('--local-cache keeps what a remote store sent: reads work without the remote afterwards, verified', async () => {
  const work = tempDir('local-cache');
  try {
    const tree = join(work, 'tree');
    mkdirSync(join(tree, 'sub', 'deeper'), { recursive: true });
    writeFileSync(join(tree, 'big.bin'), seededBytes(300_000, 41)); // a blob file, past the small-blob size
    writeFileSync(join(tree, 'sub', 'small'), 'small file\n');
    writeFileSync(join(tree, 'sub', 'deeper', 'never-read'), 'not read while the daemon ran\n');
    const central = join(work, 'central');
    const imported = nixcas(['import', '--store', central, tree]);
    assert.equal(imported.status, 0, imported.stderr);
    const path = imported.stdout.trim();
    const socket = join(work, 'daemon.sock');
    const daemon = await startDaemon(['--store', central, '--listen', socket]);
    const cache = join(work, 'cache');
    const remote = [
      '--blob-service-addr', `grpc+unix://${socket}`, '--directory-service-addr', `grpc+unix://${socket}`,
      '--path-info-service-addr', `local://${central}`, '--local-cache', cache,
    ];
    const listing = () => nixcas(['ls', '-R', ...remote, path]);
    let before: string;
    try {
      assert.ok(nixcasBytes(['cat', ...remote, `${path}/big.bin`]).equals(readFileSync(join(tree, 'big.bin'))));
      assert.equal(nixcasBytes(['cat', ...remote, `${path}/sub/small`]).toString(), 'small file\n');
      const ls = listing();
      assert.equal(ls.status, 0, ls.stderr);
      before = ls.stdout;
      assert.match(before, /never-read/);
    } finally {
      assert.equal(await daemon.stop(), 0);
    }
    // The daemon is gone: what was read comes from the cache.
    assert.ok(nixcasBytes(['cat', ...remote, `${path}/big.bin`]).equals(readFileSync(join(tree, 'big.bin'))));
    assert.equal(nixcasBytes(['cat', ...remote, `${path}/sub/small`]).toString(), 'small file\n');
    assert.equal(listing().stdout, before);
    // What was never read is not there.
    const unread = nixcas(['cat', ...remote, `${path}/sub/deeper/never-read`]);
    assert.equal(unread.status, 1);
    assert.match(unread.stderr, new RegExp(`cannot reach the store at grpc\\+unix://${socket}`));
    // The cache is a store of its own, whole: every directory it holds has its children.
    const local = nixcas(['verify', '--store', cache]);
    assert.equal(local.status, 0, local.stdout + local.stderr);
  } finally {
    removeDir(work);
  }
});

test('--local-cache in front of services that are not remote is refused, naming them', () => {
  const work = tempDir('local-cache-refused');
  try {
    const run = nixcas(['path-info', '--all', '--store', join(work, 'store'), '--local-cache', join(work, 'cache')]);
    assert.equal(run.status, 1);
    assert.match(run.stderr, /--local-cache .*: the blob and directory services are not remote/);
  } finally {
    removeDir(work);
  }
});

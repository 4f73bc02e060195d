// Real peer: Debian's python3-grpcio, with stubs compiled from protos/ at test
// time by python3-grpc-tools, drives `nixcas daemon` over a unix socket.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { type Daemon, ROOT, nix, nixcas, removeDir, startDaemon, tempDir, verifyLocalStore } from './helpers.js';

const PYTHON = '/usr/bin/python3'; // Debian's, where python3-grpcio lives
let work: string;
let daemon: Daemon;

before(async () => {
  work = tempDir('python');
  daemon = await startDaemon(['--store', join(work, 'store'), '--listen', join(work, 'castore.sock')]);
});

after(async () => {
  await daemon?.stop();
  removeDir(work);
});

test('Python grpcio client: blobs, a directory tree, bad input, health and reflection', async () => {
  const generated = join(work, 'generated');
  const protoc = spawnSync(PYTHON, [
    '-c', 'import os,sys; os.makedirs(sys.argv[1], exist_ok=True); from grpc_tools import protoc; sys.exit(protoc.main(["protoc", "-I", sys.argv[2], "--python_out=" + sys.argv[1], "--grpc_python_out=" + sys.argv[1]] + sys.argv[3:]))',
    generated, join(ROOT, 'protos'),
    ...['tvix', 'snix'].flatMap((p) => [
      ...['castore', 'rpc_blobstore', 'rpc_directory'].map((f) => join(ROOT, 'protos', p, 'castore/v1', `${f}.proto`)),
      ...['pathinfo', 'rpc_pathinfo'].map((f) => join(ROOT, 'protos', p, 'store/v1', `${f}.proto`)),
    ]),
  ], { encoding: 'utf8' });
  assert.equal(protoc.status, 0, `grpc_tools.protoc failed: ${protoc.stderr}`);

  const client = spawnSync(PYTHON, [join(ROOT, 'test/python/castore_client.py'), join(work, 'castore.sock'), generated], {
    encoding: 'utf8',
    timeout: 120_000,
  });
  const transcript = `${client.stdout}\n${client.stderr}`;
  assert.equal(client.status, 0, `the Python client failed:\n${transcript}\n--- daemon:\n${daemon.output()}`);
  assert.match(client.stdout, /all checks passed/);
  assert.ok((client.stdout.match(/^ok /gm) ?? []).length >= 40, 'fewer checks ran than the client has');

  // What the client uploaded is on disk, whole, and nothing partial is.
  const store = await verifyLocalStore(join(work, 'store'));
  assert.deepEqual(store.problems, []);
  // The client's three samples plus the one it stores after the malformed inputs; cut-off and malformed uploads store nothing.
  assert.equal(store.blobs, 4, 'exactly the complete blobs');
  assert.ok(store.directories >= 5);
  assert.doesNotMatch(daemon.output(), /internal error/);
});

test('Python grpcio client: PathInfoService (tvix.store.v1 and snix.store.v1)', async () => {
  // A tree imported by `nixcas import` into the store the daemon serves, and Nix's NAR of it.
  const tree = join(work, 'python-tree');
  mkdirSync(join(tree, 'bin'), { recursive: true });
  writeFileSync(join(tree, 'bin/hello'), '#!/bin/sh\necho hello\n', { mode: 0o755 });
  symlinkSync('bin/hello', join(tree, 'link'));
  const imported = nixcas(['import', '--store', join(work, 'store'), tree]);
  assert.equal(imported.status, 0, imported.stderr);
  const storePath = imported.stdout.trim();
  const narFile = join(work, 'tree.nar');
  writeFileSync(narFile, nix('nix-store', ['--dump', tree]));

  const client = spawnSync(PYTHON, [join(ROOT, 'test/python/store_client.py'), join(work, 'castore.sock'), join(work, 'generated'), storePath, narFile], {
    encoding: 'utf8',
    timeout: 120_000,
  });
  assert.equal(client.status, 0, `the Python client failed:\n${client.stdout}\n${client.stderr}\n--- daemon:\n${daemon.output()}`);
  assert.match(client.stdout, /all checks passed/);
  assert.ok((client.stdout.match(/^ok /gm) ?? []).length >= 13, 'fewer checks ran than the client has');
  assert.doesNotMatch(daemon.output(), /internal error/);
});

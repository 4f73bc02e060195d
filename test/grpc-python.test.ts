// Real peer: Debian's python3-grpcio, with stubs compiled from protos/ at test
// time by python3-grpc-tools, drives `nixcas daemon` over a unix socket.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { blake3, digestKey } from '../src/castore/digest.js';
import { type Daemon, ROOT, compilePythonStubs, nix, nixcas, pythonReadOnlyChecks, removeDir, startDaemon, tempDir, verifyLocalStore } from './helpers.js';

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
  const generated = compilePythonStubs(join(work, 'generated'));

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

test('daemon --read-only: every Put answers PERMISSION_DENIED to Python grpcio and stores nothing; reads work', async () => {
  const store = join(work, 'read-only-store');
  writeFileSync(join(work, 'kept'), 'stored before\n');
  const imported = nixcas(['import', '--store', store, join(work, 'kept')]);
  assert.equal(imported.status, 0, imported.stderr);
  const digest = digestKey(blake3(Buffer.from('stored before\n')));
  const socket = join(work, 'read-only.sock');
  const readOnly = await startDaemon(['--store', store, '--listen', socket, '--read-only']);
  try {
    assert.match(readOnly.output(), /listening on .*, read-only/);
    const output = pythonReadOnlyChecks(socket, join(work, 'generated'), digest);
    for (const method of ['BlobService.Put', 'DirectoryService.Put', 'PathInfoService.Put']) {
      assert.match(output, new RegExp(`${method}: PERMISSION_DENIED: this nixcas daemon serves this address read-only`));
    }
    assert.match(output, /BlobService.Read: 14 bytes/);
  } finally {
    await readOnly.stop();
  }
  // Nothing was stored: the store still holds the one path and its one blob.
  const { blobs, problems } = await verifyLocalStore(store);
  assert.deepEqual(problems, []);
  assert.equal(blobs, 1);
});

test('daemon --listen A --listen-read-only B: B refuses every Put to Python grpcio and stores nothing, A stores', async () => {
  const store = join(work, 'two-listeners-store');
  writeFileSync(join(work, 'first'), 'stored first\n');
  assert.equal(nixcas(['import', '--store', store, join(work, 'first')]).status, 0);
  const writable = join(work, 'rw.sock');
  const readOnly = join(work, 'ro.sock');
  const server = await startDaemon(['--store', store, '--listen', writable, '--listen-read-only', readOnly]);
  try {
    assert.match(server.output(), new RegExp(`listening on ${writable}; ${readOnly}, read-only \\(`));
    const output = pythonReadOnlyChecks(readOnly, join(work, 'generated'), digestKey(blake3(Buffer.from('stored first\n'))));
    for (const method of ['BlobService.Put', 'DirectoryService.Put', 'PathInfoService.Put']) assert.match(output, new RegExp(`${method}: PERMISSION_DENIED`));
    assert.match(output, /BlobService.Read: 13 bytes/);
    // The same store, written through the other listener.
    writeFileSync(join(work, 'second'), 'stored through the writable socket\n');
    const remote = ['--blob-service-addr', `grpc+unix://${writable}`, '--directory-service-addr', `grpc+unix://${writable}`, '--path-info-service-addr', `grpc+unix://${writable}`];
    const imported = nixcas(['import', ...remote, join(work, 'second')]);
    assert.equal(imported.status, 0, imported.stderr);
  } finally {
    await server.stop();
  }
  const { blobs, problems } = await verifyLocalStore(store);
  assert.deepEqual(problems, []);
  assert.equal(blobs, 2); // the first file and the second: nothing from the refused Puts
});

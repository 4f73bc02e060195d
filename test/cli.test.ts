// `nixcas daemon` as a user runs it: addresses, environment, signals.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { putBlob, getBlob } from '../src/castore/blobservice.js';
import { GrpcBlobService } from '../src/grpc/castore-client.js';
import { CLI, removeDir, startDaemon, tempDir } from './helpers.js';

test('daemon on TCP with NIXCAS_STORE, stopped by SIGINT', async () => {
  const work = tempDir('cli');
  try {
    const daemon = await startDaemon(['--listen', '127.0.0.1:0'], { NIXCAS_STORE: join(work, 'store') });
    const port = /listening on 127\.0\.0\.1:(\d+)/.exec(daemon.output())![1];
    assert.match(daemon.output(), new RegExp(`local://${work}/store`));
    const blobs = new GrpcBlobService(`grpc+http://127.0.0.1:${port}`);
    const digest = await putBlob(blobs, Buffer.from('over tcp'));
    assert.equal((await getBlob(blobs, digest))?.toString(), 'over tcp');
    await blobs.close();
    assert.equal(await daemon.stop('SIGINT'), 0);
    assert.ok(existsSync(join(work, 'store/blobs')));
  } finally {
    removeDir(work);
  }
});

test('unix socket: removed on exit, a stale one is replaced, a live one is not stolen', async () => {
  const work = tempDir('cli');
  const socket = join(work, 'd.sock');
  try {
    // A socket file nobody listens on, as a killed daemon leaves it.
    const stale = createServer();
    await new Promise<void>((r) => stale.listen(socket, r));
    stale.close();
    await new Promise((r) => setTimeout(r, 50));
    const first = await startDaemon(['--store', join(work, 'store'), '--listen', socket]);
    const second = spawnSync(process.execPath, [CLI, 'daemon', '--store', join(work, 'store'), '--listen', socket], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(second.status, 1);
    assert.match(second.stderr, /another server is already listening/);
    assert.equal(await first.stop('SIGTERM'), 0);
    assert.equal(existsSync(socket), false, 'the socket file is removed on shutdown');
  } finally {
    removeDir(work);
  }
});

test('bad addresses and URLs get clear errors', () => {
  const run = (...args: string[]) => spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 20_000 });
  const badListen = run('daemon', '--store', '/tmp/nixcas-unused', '--listen', 'nonsense');
  assert.equal(badListen.status, 1);
  assert.match(badListen.stderr, /listen address must be host:port/);
  const badUrl = run('daemon', '--blob-service-addr', 'ftp://x', '--directory-service-addr', 'memory://', '--listen', '127.0.0.1:0');
  assert.equal(badUrl.status, 1);
  assert.match(badUrl.stderr, /unknown blob service scheme ftp:/);
  const urlAsStore = run('nar', '--store', 'local:///tmp/nixcas-unused', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x');
  assert.equal(urlAsStore.status, 1);
  assert.match(urlAsStore.stderr, /--store and NIXCAS_STORE take a directory/);
  assert.ok(!existsSync('local:'), 'no directory named local: was made');
  const help = run('daemon', '--help');
  assert.match(help.stdout, /no authentication/);
  assert.match(help.stdout, /\[::1\]:8000/);
});

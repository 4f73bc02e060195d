// `nixcas daemon` as a user runs it: addresses, environment, signals.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { putBlob, getBlob } from '../src/castore/blobservice.js';
import { GrpcBlobService } from '../src/grpc/castore-client.js';
import { CLI, ROOT, removeDir, startDaemon, tempDir } from './helpers.js';

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

test('errors are sentences naming the file or address, without library wording; store flags may precede the subcommand', () => {
  const work = tempDir('cli-errors');
  try {
    const run = (args: string[], env: NodeJS.ProcessEnv = {}) => spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 20_000, env: { ...process.env, ...env } });
    const store = join(work, 'store');
    const missing = run(['import', '--store', store, join(work, 'nonexistent')]);
    assert.equal(missing.status, 1);
    assert.equal(missing.stderr, `nixcas import: ${join(work, 'nonexistent')}: no such file or directory\n`);
    const listen = run(['daemon', '--store', store, '--listen', join(work, 'no-such-dir', 'sock')]);
    assert.equal(listen.status, 1);
    assert.match(listen.stderr, new RegExp(`nixcas: cannot listen on ${join(work, 'no-such-dir', 'sock')}: its directory is missing or not writable`));
    assert.doesNotMatch(listen.stderr, /No address added/);
    const socket = `grpc+unix://${join(work, 'absent.sock')}`;
    const unreachable = run(['path-info', '--blob-service-addr', socket, '--directory-service-addr', socket, '--path-info-service-addr', socket, '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x']);
    assert.equal(unreachable.status, 1);
    assert.equal(unreachable.stderr, `nixcas: cannot reach the store at ${socket}: no socket there\n`);
    assert.equal(run(['import', '--store', store, join(ROOT, 'test/fixtures/closure.nix')]).status, 0);
    const before = run(['--store', store, 'path-info', '--all']);
    assert.equal(before.status, 0, before.stderr);
    assert.match(before.stdout, /^\/nix\/store\/[a-z0-9]{32}-closure\.nix\n$/);
    const badName = run(['import', '--store', store, '--name', 'bad/name', join(ROOT, 'test/fixtures/closure.nix')]);
    assert.equal(badName.status, 1);
    assert.equal(badName.stderr, 'nixcas: --name "bad/name": not a store path name: the name contains "/", allowed are A-Z a-z 0-9 and + - . _ ? =\n');
    const relative = run(['path-info', '--all'], { NIXCAS_STORE: 'relative/store' });
    assert.equal(relative.status, 1);
    assert.match(relative.stderr, /NIXCAS_STORE=relative\/store: the store directory in the environment must be an absolute path/);
  } finally {
    removeDir(work);
  }
});

test('on a terminal, import shows progress and ends with a summary; piped, it prints only the store path', () => {
  const work = tempDir('cli-progress');
  try {
    writeFileSync(join(work, 'file'), 'progress\n');
    const store = join(work, 'store');
    // script(1) gives the command a pseudo-terminal, as a person's shell would.
    const onTerminal = spawnSync('script', ['-qec', `${process.execPath} ${CLI} import --store ${store} ${join(work, 'file')}`, '/dev/null'], { encoding: 'utf8', timeout: 20_000, env: { ...process.env, CI: '' } });
    assert.equal(onTerminal.status, 0, onTerminal.stdout);
    assert.match(onTerminal.stdout, /nixcas import: 1 of 1 paths, 9 B in [0-9.]+ s \([0-9.]+ (B|KiB)\/s\)/);
    const piped = spawnSync(process.execPath, [CLI, 'import', '--store', store, join(work, 'file')], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(piped.status, 0);
    assert.match(piped.stdout, /^\/nix\/store\/[a-z0-9]{32}-file\n$/);
    assert.equal(piped.stderr, '');
  } finally {
    removeDir(work);
  }
});

test("main.cjs's code cache: made by the build for this source; a stale or damaged one is ignored", () => {
  const dist = join(CLI, '..');
  const source = readFileSync(join(dist, 'main.cjs'));
  const cache = readFileSync(join(dist, 'main.cjs.v8cache'));
  assert.ok(cache.subarray(0, 32).equals(createHash('sha256').update(source).digest()), 'the cache names the source it was made from');
  // A copy at the same depth, so that the bundle still finds node_modules and build/.
  const copy = join(dist, '..', `cli-cache-test-${process.pid}`);
  cpSync(dist, copy, { recursive: true });
  try {
    const help = () => spawnSync(process.execPath, [join(copy, 'nixcas.cjs'), 'import', '--help'], { encoding: 'utf8' });
    const expected = spawnSync(process.execPath, [CLI, 'import', '--help'], { encoding: 'utf8' }).stdout;
    assert.match(expected, /Usage: nixcas import/);
    // The source changed after the cache was made, at the same length: V8 checks no more than the
    // length, and would run the cached code of the import command, which prints the old text.
    writeFileSync(join(copy, 'main.cjs'), source.toString('latin1').replace('Import each PATH', 'Import EACH PATH'), 'latin1');
    assert.equal(readFileSync(join(copy, 'main.cjs')).length, source.length);
    let run = help();
    assert.deepEqual([run.status, run.stdout], [0, expected.replace('Import each PATH', 'Import EACH PATH')], 'a cache of another source is not used');
    // Damaged: the right hash, then garbage.
    writeFileSync(join(copy, 'main.cjs'), source);
    writeFileSync(join(copy, 'main.cjs.v8cache'), Buffer.concat([cache.subarray(0, 32), Buffer.alloc(4096, 0x5a)]));
    run = help();
    assert.deepEqual([run.status, run.stdout], [0, expected], 'V8 refuses a damaged cache, and the command runs as without one');
    rmSync(join(copy, 'main.cjs.v8cache'));
    run = help();
    assert.deepEqual([run.status, run.stdout], [0, expected], 'no cache at all');
  } finally {
    rmSync(copy, { recursive: true, force: true });
  }
});

// systemd's readiness protocol, with a notify socket the test owns (a Python datagram receiver, as
// systemd's own is): daemon, virtiofs and nar-bridge send READY=1 once they listen and STOPPING=1
// when they stop; without NOTIFY_SOCKET they send nothing and start as before.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { CLI, freePort, nixcas, pythonReadOnlyChecks, removeDir, startNixcas, tempDir } from './helpers.js';
import { blake3, digestKey } from '../src/castore/digest.js';
import { activationSocket, activationSockets } from '../src/cli/systemd.js';
import { bootGuest, buildInitramfs, ensureVmPackages } from '../vmtest/harness.js';

/** A datagram socket bound at `path`; each message received becomes one JSON line of its output. */
async function receiver(path: string): Promise<{ child: ChildProcess; next: () => Promise<string> }> {
  const child = spawn('/usr/bin/python3', ['-u', '-c', [
    'import json, socket, sys',
    's = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)',
    's.bind(sys.argv[1])',
    'print("bound")',
    'while True: print(json.dumps(s.recv(65536).decode()))',
  ].join('\n'), path], { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines: string[] = [];
  const waiting: ((line: string) => void)[] = [];
  let buffered = '';
  child.stdout!.on('data', (d) => {
    buffered += d;
    for (let at = buffered.indexOf('\n'); at >= 0; at = buffered.indexOf('\n')) {
      const line = buffered.slice(0, at);
      buffered = buffered.slice(at + 1);
      const waiter = waiting.shift();
      if (waiter) waiter(line);
      else lines.push(line);
    }
  });
  const next = () => new Promise<string>((resolve) => (lines.length ? resolve(lines.shift()!) : waiting.push(resolve)));
  assert.equal(await next(), 'bound');
  return { child, next: async () => JSON.parse(await next()) as string };
}

for (const [command, args, ready] of [
  ['daemon', (work: string) => ['--store', join(work, 'store'), '--listen', join(work, 'd.sock')], 'listening on'],
  ['virtiofs', (work: string) => [join(work, 'fs.sock'), '--store', join(work, 'store')], 'listening on'],
  ['nar-bridge', (work: string) => ['--store', join(work, 'store'), '--listen', '127.0.0.1:0'], 'listening on'],
] as const) {
  test(`${command}: READY=1 to NOTIFY_SOCKET once it listens, STOPPING=1 on SIGTERM`, async () => {
    const work = tempDir(`systemd-${command}`);
    const notify = join(work, 'notify.sock');
    const systemd = await receiver(notify);
    try {
      // virtiofs and nar-bridge serve a store that exists.
      writeFileSync(join(work, 'file'), 'a store path\n');
      assert.equal(nixcas(['import', '--store', join(work, 'store'), join(work, 'file')]).status, 0);
      const server = await startNixcas([command, ...args(work)], ready, { NOTIFY_SOCKET: notify });
      const readyMessage = await systemd.next();
      assert.match(readyMessage, /^READY=1\nSTATUS=serving .*\nMAINPID=\d+$/);
      assert.equal(Number(/MAINPID=(\d+)/.exec(readyMessage)![1]), server.process.pid);
      assert.equal(await server.stop('SIGTERM'), 0);
      assert.equal(await systemd.next(), 'STOPPING=1');
    } finally {
      systemd.child.kill();
      removeDir(work);
    }
  });
}

test('socket activation (systemd-socket-activate): nar-bridge starts on the first connection, on the socket it was handed', async () => {
  const work = tempDir('systemd-activate-bridge');
  try {
    writeFileSync(join(work, 'file'), 'activated\n');
    assert.equal(nixcas(['import', '--store', join(work, 'store'), join(work, 'file')]).status, 0);
    const port = await freePort();
    const activator = spawn('/usr/bin/systemd-socket-activate', ['-l', `127.0.0.1:${port}`, process.execPath, CLI, 'nar-bridge', '--store', join(work, 'store')], { stdio: ['ignore', 'ignore', 'pipe'] });
    let output = '';
    activator.stderr!.on('data', (d) => (output += d));
    try {
      await waitForOutput(() => output, `Listening on 127.0.0.1:${port}`);
      // The first request is what starts nixcas: it waits in the socket's backlog meanwhile.
      const response = await fetch(`http://127.0.0.1:${port}/nix-cache-info`);
      assert.equal(response.status, 200);
      assert.match(await response.text(), /StoreDir: \/nix\/store/);
      assert.match(output, new RegExp(`nixcas nar-bridge: listening on http://127\\.0\\.0\\.1:${port}`));
    } finally {
      activator.kill('SIGTERM');
    }
  } finally {
    removeDir(work);
  }
});

test('socket activation: the daemon serves both sockets it was handed, the one named read-only refusing writes to Python grpcio', async () => {
  const work = tempDir('systemd-activate-daemon');
  try {
    writeFileSync(join(work, 'file'), 'activated\n');
    assert.equal(nixcas(['import', '--store', join(work, 'store'), join(work, 'file')]).status, 0);
    const writable = join(work, 'rw.sock');
    const readOnly = join(work, 'ro.sock');
    const activator = spawn('/usr/bin/systemd-socket-activate', ['-l', writable, '-l', readOnly, '--fdname=store:read-only', process.execPath, CLI, 'daemon', '--store', join(work, 'store')], { stdio: ['ignore', 'ignore', 'pipe'] });
    let output = '';
    activator.stderr!.on('data', (d) => (output += d));
    try {
      await waitForOutput(() => output, `Listening on ${readOnly}`);
      // The first connection, the Python client's, is what starts nixcas.
      const checks = pythonReadOnlyChecks(readOnly, join(work, 'generated'), digestKey(blake3(Buffer.from('activated\n'))));
      for (const method of ['BlobService.Put', 'DirectoryService.Put', 'PathInfoService.Put']) assert.match(checks, new RegExp(`${method}: PERMISSION_DENIED`));
      assert.match(checks, /BlobService.Read: 10 bytes/);
      await waitForOutput(() => output, 'nixcas daemon: listening on'); // logged after it began to serve: may come after the answers
      assert.match(output, new RegExp(`nixcas daemon: listening on ${writable} \\(from systemd\\); ${readOnly}, read-only \\(from systemd\\)`));
      writeFileSync(join(work, 'second'), 'written through the other socket\n');
      const remote = ['--blob-service-addr', `grpc+unix://${writable}`, '--directory-service-addr', `grpc+unix://${writable}`, '--path-info-service-addr', `grpc+unix://${writable}`];
      const imported = nixcas(['import', ...remote, join(work, 'second')]);
      assert.equal(imported.status, 0, imported.stderr);
      assert.equal(nixcas(['cat', '--store', join(work, 'store'), `${imported.stdout.trim()}`]).stdout, 'written through the other socket\n');
    } finally {
      activator.kill('SIGTERM');
    }
  } finally {
    removeDir(work);
  }
});

test('socket activation: a QEMU guest connects to the socket before nixcas virtiofs runs, and mounts the store', { skip: process.getuid?.() !== 0 && 'boots QEMU as root' }, async () => {
  ensureVmPackages();
  const work = tempDir('systemd-activate-virtiofs');
  try {
    writeFileSync(join(work, 'file'), 'served after activation\n');
    const path = nixcas(['import', '--store', join(work, 'store'), join(work, 'file')]).stdout.trim();
    const socket = join(work, 'fs.sock');
    const activator = spawn('/usr/bin/systemd-socket-activate', ['-l', socket, process.execPath, CLI, 'virtiofs', socket, '--store', join(work, 'store')], { stdio: ['ignore', 'ignore', 'pipe'] });
    let output = '';
    activator.stderr!.on('data', (d) => (output += d));
    try {
      await waitForOutput(() => output, `Listening on ${socket}`);
      const initramfs = buildInitramfs({ guestScript: `set -e\nmkdir -p /nix/store\ncapture mount mount -t virtiofs -o ro nixstore /nix/store\ncapture read cat ${path}` });
      const r = await bootGuest({ initramfs, virtiofsSocket: socket, memoryMiB: 512, timeoutMs: 120_000 });
      assert.equal(r.exitStatus, 0, `${r.output}\n--- activator and nixcas ---\n${output}`);
      assert.equal(r.results['read.out'], 'served after activation');
      assert.match(output, /nixcas virtiofs: listening on/);
    } finally {
      activator.kill('SIGTERM');
    }
  } finally {
    removeDir(work);
  }
});

async function waitForOutput(output: () => string, text: string): Promise<void> {
  for (const deadline = Date.now() + 15_000; !output().includes(text); ) {
    if (Date.now() > deadline) assert.fail(`never printed ${JSON.stringify(text)}: ${output()}`);
    await new Promise((resolve) => setTimeout(resolve, 50)); // an external program's output
  }
}


test('activationSockets: the sockets and names systemd passed to this pid, the variables removed; another pid\'s or a count no systemd passes is refused', () => {
  const env: NodeJS.ProcessEnv = { LISTEN_PID: String(process.pid), LISTEN_FDS: '2', LISTEN_FDNAMES: 'store:read-only' };
  assert.deepEqual(activationSockets(env), [{ fd: 3, name: 'store' }, { fd: 4, name: 'read-only' }]);
  assert.deepEqual(env, {});
  assert.deepEqual(activationSockets({ LISTEN_PID: String(process.pid + 1), LISTEN_FDS: '1' }), []);
  assert.deepEqual(activationSockets({ LISTEN_PID: String(process.pid), LISTEN_FDS: 'x' }), []);
  assert.throws(() => activationSockets({ LISTEN_PID: String(process.pid), LISTEN_FDS: '1000000000' }), /LISTEN_FDS="1000000000" is not a number of sockets/);
  assert.throws(() => activationSocket({ LISTEN_PID: String(process.pid), LISTEN_FDS: '2' }), /handed over 2 sockets .* this command listens on one/);
});

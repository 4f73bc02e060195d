// Nothing nixcas did not create is ever touched, and nothing it creates is
// open to everyone (issue #22, "only our own files" and "socket modes"): a
// directory without the nixcas-store marker becomes a store only if it is
// empty or missing and only for a command that writes; opening a store
// removes only temp files named as nixcas names them, of writers that are
// gone; sockets are 0600 and store directories 0755 whatever the umask.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { CLI, nixcas, removeDir, startNixcas, tempDir } from './helpers.js';

/** Every file under `dir` with its contents, to compare before and after. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (at: string, rel: string) => {
    for (const entry of readdirSync(at, { withFileTypes: true })) {
      const path = join(at, entry.name);
      if (entry.isDirectory()) walk(path, `${rel}${entry.name}/`);
      else out[`${rel}${entry.name}`] = readFileSync(path, 'latin1');
    }
  };
  walk(dir, '');
  return out;
}

/** A pid that no process has now: a child that has exited. */
function deadPid(): number {
  const child = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  return Number(child.stdout);
}

test('a directory that is not a store is never made one: not by a read-only command, not when it is not empty', () => {
  const work = tempDir('own-files');
  try {
    const tree = join(work, 'tree');
    mkdirSync(tree);
    writeFileSync(join(tree, 'hello'), 'hello\n');
    const storePath = nixcas(['import', '--store', join(work, 'real'), tree]).stdout.trim();
    assert.match(storePath, /^\/nix\/store\/[0-9a-z]{32}-tree$/);

    // A user's directory with their files in it, including a tmp/ of their own.
    const theirs = join(work, 'theirs');
    mkdirSync(join(theirs, 'tmp'), { recursive: true });
    writeFileSync(join(theirs, 'notes.txt'), 'mine\n');
    writeFileSync(join(theirs, 'tmp', '12-notes.txt'), 'also mine\n');
    const before = snapshot(theirs);
    for (const args of [['nar', '--store', theirs, storePath], ['import', '--store', theirs, tree]]) {
      const run = nixcas(args);
      assert.notEqual(run.status, 0, `nixcas ${args[0]} into someone's directory fails`);
      assert.ok(run.stderr.includes(theirs), `the error names the directory: ${run.stderr}`);
      assert.match(run.stderr, args[0] === 'nar' ? /holds no nixcas store/ : /is not a nixcas store .* and is not empty/);
      assert.deepEqual(snapshot(theirs), before, `nixcas ${args[0]} leaves the directory as it was`);
    }

    // A read-only command does not make a store where there is none, not even in a missing directory.
    const missing = join(work, 'missing');
    const nar = nixcas(['nar', '--store', missing, storePath]);
    assert.notEqual(nar.status, 0);
    assert.match(nar.stderr, /holds no nixcas store .* this command only reads one/);
    assert.equal(existsSync(missing), false, 'nar created nothing');
    const served = spawnSync(process.execPath, [CLI, 'virtiofs', join(work, 'fs.sock'), '--store', missing], { encoding: 'utf8', timeout: 60_000 });
    assert.equal(served.status, 1, `virtiofs on no store exits 1: ${served.stderr}`);
    assert.match(served.stderr, /holds no nixcas store/);
    assert.equal(existsSync(missing), false, 'virtiofs created nothing');

    // A command that writes makes one in an empty or a missing directory.
    const empty = join(work, 'empty');
    mkdirSync(join(empty, 'lost+found'), { recursive: true }); // a file system mounted there for the store
    for (const dir of [empty, join(work, 'new', 'store')]) {
      const run = nixcas(['import', '--store', dir, tree]);
      assert.equal(run.status, 0, run.stderr);
      assert.equal(run.stdout.trim(), storePath);
      assert.ok(existsSync(join(dir, 'nixcas-store')));
    }
  } finally {
    removeDir(work);
  }
});

test("opening a store removes only its own writers' abandoned temp files", () => {
  const work = tempDir('own-temp');
  try {
    const tree = join(work, 'tree');
    mkdirSync(tree);
    writeFileSync(join(tree, 'hello'), 'hello\n');
    const store = join(work, 'store');
    const storePath = nixcas(['import', '--store', store, tree]).stdout.trim();
    const pid = deadPid();
    const tmp = join(store, 'tmp');
    const abandoned = `${pid}-0123456789ab-7`;
    const notOurs = ['12-notes.txt', `${pid}-notes`, `${pid}-0123456789ab-7.keep`, `${pid}-0123456789AB-7`, 'README'];
    for (const name of [abandoned, ...notOurs]) writeFileSync(join(tmp, name), name);
    // The next import opens the store (the native NAR renderer does not, and removes nothing).
    const again = nixcas(['import', '--store', store, tree]);
    assert.equal(again.status, 0, again.stderr);
    assert.equal(again.stdout.trim(), storePath);
    assert.deepEqual(readdirSync(tmp).sort(), [...notOurs].sort(), 'only the abandoned temp file of a dead nixcas writer is gone');
  } finally {
    removeDir(work);
  }
});

test('sockets are 0600 and store directories not world-writable, whatever the umask; --socket-mode opens a socket up', async () => {
  const work = tempDir('own-modes');
  const underUmask000 = ['sh', '-c', 'umask 000; exec "$0" "$@"'];
  const mode = (path: string) => statSync(path).mode & 0o777;
  try {
    const store = join(work, 'store');
    for (const [extra, expected] of [[[], 0o600], [['--socket-mode', '0660'], 0o660]] as const) {
      const socket = join(work, `daemon-${expected.toString(8)}.sock`);
      const daemon = await startNixcas(['daemon', '--listen', socket, '--store', store, ...extra], 'listening on', {}, underUmask000);
      try {
        assert.equal(mode(socket), expected, `the daemon's socket with ${extra.join(' ') || 'no --socket-mode'}`);
      } finally {
        await daemon.stop();
      }
    }
    for (const path of [store, join(store, 'blobs'), join(store, 'tmp'), join(store, 'metadata'), join(store, 'nixcas-store')]) {
      assert.equal(mode(path) & 0o022, 0, `${path} is writable by its owner only (mode ${mode(path).toString(8)})`);
    }
    for (const [extra, expected] of [[[], 0o600], [['--socket-mode', '0640'], 0o640]] as const) {
      const socket = join(work, `fs-${expected.toString(8)}.sock`);
      const served = await startNixcas(['virtiofs', socket, '--store', store, ...extra], 'listening on', {}, underUmask000);
      try {
        assert.equal(mode(socket), expected, `the virtio-fs socket with ${extra.join(' ') || 'no --socket-mode'}`);
      } finally {
        await served.stop();
      }
    }
  } finally {
    removeDir(work);
  }
});

test('writers that make the same store at once all succeed; a marker a killed writer left half placed does not block one', async () => {
  const work = tempDir('own-files-race');
  try {
    const tree = join(work, 'tree');
    mkdirSync(tree);
    writeFileSync(join(tree, 'hello'), 'hello\n');
    // The state a writer killed while placing the marker leaves: its staging file only.
    const halfMade = join(work, 'half-made');
    mkdirSync(halfMade);
    writeFileSync(join(halfMade, '.nixcas-store.4242-0badc0de'), 'nixcas-store 2\n');
    const run = nixcas(['import', '--store', halfMade, tree]);
    assert.equal(run.status, 0, run.stderr);
    assert.ok(existsSync(join(halfMade, 'nixcas-store')));
    // Six writers start on one missing directory together.
    const racing = join(work, 'racing');
    const runs = await Promise.all(
      Array.from({ length: 6 }, () => new Promise<{ status: number | null; stderr: string }>((resolve) => {
        const child = spawn(process.execPath, [CLI, 'import', '--store', racing, tree], { stdio: ['ignore', 'ignore', 'pipe'] });
        let stderr = '';
        child.stderr.on('data', (chunk) => (stderr += chunk));
        child.on('close', (status) => resolve({ status, stderr }));
      })),
    );
    for (const r of runs) assert.equal(r.status, 0, r.stderr);
    assert.equal(readFileSync(join(racing, 'nixcas-store'), 'utf8'), 'nixcas-store 2\n');
  } finally {
    removeDir(work);
  }
});

// Garbage collection against Nix's own reachability, refusals of `delete`,
// gc running in a loop against concurrent imports, and gc SIGKILLed at
// chosen system calls (strace's fault injection) — each leaves a store in
// which every registered path is complete.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { LocalPathInfoService } from '../src/store/backends/local.js';
import { formatStorePath, parseStorePath } from '../src/store/storepath.js';
import { storePathOf } from '../src/store/pathinfo.js';
import { CLI, buildClosureFixture, nix, nixcas, nixcasBytes, removeDir, seededBytes, tempDir, verifyLocalStore } from './helpers.js';

function closurePaths(attrsJson: string): string[] {
  return (JSON.parse(readFileSync(attrsJson, 'utf8')).closure as { path: string }[]).map((e) => e.path);
}

async function registered(store: string): Promise<string[]> {
  const infos = new LocalPathInfoService(store, { create: false });
  try {
    const paths: string[] = [];
    for await (const info of infos.list()) paths.push(formatStorePath(storePathOf(info)));
    return paths.sort();
  } finally {
    await infos.close();
  }
}

/** A tree of `files` files, small and large (past the 64 KiB of a small blob), from `seed`. */
function makeTree(dir: string, files: number, seed: number): string {
  mkdirSync(join(dir, 'sub'), { recursive: true });
  for (let i = 0; i < files; i++) {
    const size = i % 5 === 0 ? 70_000 + i : 100 + i;
    writeFileSync(join(dir, i % 2 ? 'sub' : '.', `f${i}`), seededBytes(size, seed * 1000 + i));
  }
  return dir;
}

function importTree(store: string, dir: string): string {
  const run = nixcas(['import', '--store', store, dir]);
  assert.equal(run.status, 0, run.stderr);
  return run.stdout.trim();
}

function assertComplete(store: string, label: string): Promise<void> {
  const run = nixcas(['verify', '--store', store, '--check-contents']);
  assert.equal(run.status, 0, `${label}: nixcas verify: ${run.stdout}${run.stderr}`);
  return verifyLocalStore(store).then(({ problems }) => assert.deepEqual(problems, [], label));
}

test('gc keeps exactly what Nix says the roots reach, and removes orphans of imports', async () => {
  const work = tempDir('gc-nix');
  try {
    const attrs = buildClosureFixture(join(work, 'result'));
    const store = join(work, 'store');
    assert.equal(nixcas(['copy', '--store', store, attrs]).status, 0);
    const unrelated = importTree(store, makeTree(join(work, 'unrelated'), 20, 1));
    const [fileOnly] = closurePaths(attrs).filter((p) => p.endsWith('-just-a-file'));
    const mid = closurePaths(attrs).find((p) => p.endsWith('-mid'))!;

    // Only `just-a-file` is a root: what stays must be its closure as Nix computes it.
    const add = nixcas(['root', 'add', '--store', store, fileOnly!]);
    assert.equal(add.status, 0, add.stderr);
    const dry = nixcas(['gc', '--store', store, '--dry-run']);
    assert.equal(dry.status, 0, dry.stderr);
    assert.deepEqual(dry.stdout.trim().split('\n').sort(), [mid, unrelated].sort());
    assert.equal((await registered(store)).length, 4, 'a dry run removes nothing');

    const gc = nixcas(['gc', '--store', store, '--json']);
    assert.equal(gc.status, 0, gc.stderr);
    const report = JSON.parse(gc.stdout);
    assert.deepEqual(report.removed, [mid, unrelated].sort());
    assert.equal(report.blobFiles, 4, 'the unrelated tree\'s four large files');
    const nixClosure = nix('nix-store', ['-qR', fileOnly!]).toString().trim().split('\n').sort();
    assert.deepEqual(await registered(store), nixClosure);
    await assertComplete(store, 'after gc');
    for (const path of nixClosure) assert.ok(nixcasBytes(['nar', '--store', store, path]).equals(nix('nix-store', ['--dump', path])), path);

    // Nothing is left that the kept paths do not use: a second gc finds nothing.
    const again = JSON.parse(nixcas(['gc', '--store', store, '--json']).stdout);
    assert.deepEqual([again.removed.length, again.directories, again.smallBlobs, again.blobFiles], [0, 0, 0, 0]);
    assert.deepEqual(readdirSync(join(store, 'blobs')).flatMap((p) => readdirSync(join(store, 'blobs', p))), []);

    // Without roots, everything goes.
    assert.equal(nixcas(['root', 'remove', '--store', store, fileOnly!]).status, 0);
    assert.equal(nixcas(['root', 'list', '--store', store]).stdout, '');
    assert.equal(nixcas(['gc', '--store', store]).status, 0);
    assert.deepEqual(await registered(store), []);
  } finally {
    removeDir(work);
  }
});

test('gc --keep-newer-than keeps recently registered paths and their closures; older ones go', async () => {
  const work = tempDir('gc-recent');
  try {
    const attrs = buildClosureFixture(join(work, 'result'));
    const store = join(work, 'store');
    assert.equal(nixcas(['copy', '--store', store, attrs]).status, 0);
    const old = importTree(store, makeTree(join(work, 'old'), 3, 5));
    // As if `old` and the closure's leaf had been registered two days ago.
    const leaf = closurePaths(attrs).find((p) => p.endsWith('-leaf'))!;
    const { LocalStore } = await import('../src/castore/backends/local.js');
    const { db, release } = LocalStore.metadataDb<{ v: number; info: unknown; t?: number }>(store, 'pathinfos', { encoding: 'msgpack' });
    try {
      for (const path of [old, leaf]) {
        const key = parseStorePath(path).digest;
        const record = db.get(key)!;
        assert.equal(typeof record.t, 'number', 'a registration records its time');
        await db.put(key, { ...record, t: record.t! - 2 * 86400 });
      }
    } finally {
      await release();
    }
    const gc = nixcas(['gc', '--store', store, '--keep-newer-than', '1d', '--json']);
    assert.equal(gc.status, 0, gc.stderr);
    // The leaf is old but stays: recent paths refer to it.
    assert.deepEqual(JSON.parse(gc.stdout).removed, [old]);
    assert.deepEqual(await registered(store), closurePaths(attrs).sort());
    const bad = nixcas(['gc', '--store', store, '--keep-newer-than', 'soon']);
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /"soon" is not a duration/);
  } finally {
    removeDir(work);
  }
});

test('delete refuses roots and referenced paths, naming why, and removes nothing then', async () => {
  const work = tempDir('gc-delete');
  try {
    const attrs = buildClosureFixture(join(work, 'result'));
    const store = join(work, 'store');
    assert.equal(nixcas(['copy', '--store', store, attrs]).status, 0);
    const paths = closurePaths(attrs);
    const leaf = paths.find((p) => p.endsWith('-leaf'))!;
    const mid = paths.find((p) => p.endsWith('-mid'))!;
    const before = await registered(store);

    const referenced = nixcas(['delete', '--store', store, leaf]);
    assert.equal(referenced.status, 1);
    assert.match(referenced.stderr, new RegExp(`${leaf} is still referenced by /nix/store/[a-z0-9]{32}-(mid|just-a-file)`));
    assert.equal(nixcas(['root', 'add', '--store', store, mid]).status, 0);
    const rooted = nixcas(['delete', '--store', store, mid]);
    assert.equal(rooted.status, 1);
    assert.match(rooted.stderr, new RegExp(`${mid} is a GC root`));
    const missing = nixcas(['root', 'add', '--store', store, '/nix/store/00000000000000000000000000000000-nope']);
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /00000000000000000000000000000000-nope is not in the store/);
    assert.deepEqual(await registered(store), before);

    // The whole closure at once, unrooted first: nothing left.
    assert.equal(nixcas(['root', 'remove', '--store', store, mid]).status, 0);
    const all = nixcas(['delete', '--store', store, ...paths]);
    assert.equal(all.status, 0, all.stderr);
    assert.deepEqual(await registered(store), []);
    await assertComplete(store, 'after delete');

    const notStore = nixcas(['gc', '--store', join(work, 'result')]);
    assert.equal(notStore.status, 1);
    assert.match(notStore.stderr, /holds no nixcas store/);
  } finally {
    removeDir(work);
  }
});

test("gc stops, removing nothing, when a kept path's directory is missing", async () => {
  const work = tempDir('gc-damaged');
  try {
    const store = join(work, 'store');
    const kept = importTree(store, makeTree(join(work, 'kept'), 4, 21));
    const garbage = importTree(store, makeTree(join(work, 'garbage'), 4, 22));
    assert.equal(nixcas(['root', 'add', '--store', store, kept]).status, 0);
    // The kept path's root directory goes missing (as verify --repair moves a damaged one aside).
    const infos = new LocalPathInfoService(store);
    const { LocalStore } = await import('../src/castore/backends/local.js');
    const directories = LocalStore.directoryService(store);
    try {
      const info = (await infos.get(parseStorePath(kept).digest))!;
      assert.equal(info.node.kind, 'directory');
      assert.ok(await directories.quarantine((info.node as { node: { digest: Buffer } }).node.digest));
    } finally {
      await directories.close();
      await infos.close();
    }
    const gc = nixcas(['gc', '--store', store]);
    assert.equal(gc.status, 1);
    assert.match(gc.stderr, new RegExp(`${kept} is incomplete: directory .* is missing; nothing was collected`));
    assert.deepEqual(await registered(store), [kept, garbage].sort());
  } finally {
    removeDir(work);
  }
});

test('gc in a loop against concurrent imports: every registered path stays complete', { timeout: 240_000 }, async () => {
  const work = tempDir('gc-concurrent');
  try {
    const store = join(work, 'store');
    // Trees that share most files, so that imports find blobs an earlier (unrooted) path left: the
    // collector must not sweep a blob an import has just found present and is about to register.
    const trees = Array.from({ length: 8 }, (_, i) => {
      const dir = makeTree(join(work, `t${i}`), 40, 7);
      writeFileSync(join(dir, 'own'), `tree ${i}\n`);
      return dir;
    });
    importTree(store, trees[0]!);
    let importing = true;
    const collections: Promise<number> = (async () => {
      let runs = 0;
      while (importing) {
        const gc = spawn(process.execPath, [CLI, 'gc', '--store', store], { stdio: ['ignore', 'ignore', 'pipe'] });
        let stderr = '';
        gc.stderr!.on('data', (d) => (stderr += d));
        const code = await new Promise<number | null>((resolve) => gc.on('close', resolve));
        assert.equal(code, 0, `gc failed: ${stderr}`);
        runs++;
      }
      return runs;
    })();
    for (let round = 0; round < 5; round++) {
      for (const tree of trees) {
        const path = await new Promise<string>((resolve, reject) => {
          const child = spawn(process.execPath, [CLI, 'import', '--store', store, tree]);
          let out = '';
          let err = '';
          child.stdout.on('data', (d) => (out += d));
          child.stderr.on('data', (d) => (err += d));
          child.on('close', (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(`import exited ${code}: ${err}`))));
        });
        assert.match(path, /^\/nix\/store\//);
      }
    }
    importing = false;
    const runs = await collections;
    assert.ok(runs >= 2, `gc ran ${runs} times while imports ran`);
    await assertComplete(store, 'after the loop');
  } finally {
    removeDir(work);
  }
});

test('gc SIGKILLed at its commits and unlinks leaves every registered path complete', { timeout: 120_000 }, async (t) => {
  const strace = spawnSync('strace', ['-V']);
  assert.equal(strace.status, 0, 'strace is needed (apt-get install strace)');
  for (const [syscall, when] of [['fdatasync', 1], ['fdatasync', 2], ['unlink', 1], ['unlink', 3]] as const) {
    await t.test(`killed at ${syscall} #${when}`, async () => {
      const work = tempDir('gc-crash');
      try {
        const store = join(work, 'store');
        const kept = importTree(store, makeTree(join(work, 'kept'), 10, 3));
        for (let i = 0; i < 3; i++) importTree(store, makeTree(join(work, `gone${i}`), 25, 10 + i));
        assert.equal(nixcas(['root', 'add', '--store', store, kept]).status, 0);
        const run = spawnSync('strace', ['-f', '-qq', '-o', '/dev/null', '-e', `trace=${syscall}`, '-e', `inject=${syscall}:signal=KILL:when=${when}`, process.execPath, CLI, 'gc', '--store', store]);
        assert.ok(run.signal === 'SIGKILL' || run.status === 137, `gc was killed (status ${run.status}, signal ${run.signal}: ${run.stderr})`);
        await assertComplete(store, `after a kill at ${syscall} #${when}`);
        assert.ok((await registered(store)).includes(kept));
        // The next collection finishes the job.
        assert.equal(nixcas(['gc', '--store', store]).status, 0);
        assert.deepEqual(await registered(store), [kept]);
        await assertComplete(store, 'after the next gc');
      } finally {
        removeDir(work);
      }
    });
  }
});

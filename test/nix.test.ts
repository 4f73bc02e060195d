// The Nix layer against real Nix (Debian's nix-bin): store paths, NARs and
// closures must be exactly what Nix itself produces.
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmodSync, cpSync, mkdirSync, readFileSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { type Database, open as openLmdb } from 'lmdb';
import { LocalStore } from '../src/castore/backends/local.js';
import { LocalPathInfoService } from '../src/store/backends/local.js';
import { ingestNar } from '../src/store/nar/ingest.js';
import { renderNar } from '../src/store/nar/render.js';
import * as nixbase32 from '../src/store/nixbase32.js';
import { formatStorePath, parseStorePath } from '../src/store/storepath.js';
import { buildClosureFixture, CLI, nix, nixcas, nixcasBytes, removeDir, tempDir, verifyLocalStore } from './helpers.js';

async function collect(stream: AsyncIterable<Buffer>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk));
  return Buffer.concat(chunks);
}

/** `nixcas nar` with each of its renderers; NIXCAS_NATIVE_NAR=1 fails rather than fall back. */
const RENDERERS = { native: { NIXCAS_NATIVE_NAR: '1' }, typescript: { NIXCAS_NATIVE_NAR: '0' } };

function closurePaths(attrsJson: string): string[] {
  return (JSON.parse(readFileSync(attrsJson, 'utf8')).closure as { path: string }[]).map((e) => e.path);
}

test('copy a closure built by nix-build: NARs, hashes and references match Nix', async () => {
  const work = tempDir('nix-copy');
  try {
    const attrs = buildClosureFixture(join(work, 'result'));
    const store = join(work, 'store');
    const env = { NIXCAS_STORE: store };
    const first = nixcas(['copy', attrs], { env });
    assert.equal(first.status, 0, first.stderr);
    assert.match(first.stderr, /3 copied .* 0 already present, 0 failed/);

    const pathInfos = new LocalPathInfoService(store);
    try {
      for (const path of closurePaths(attrs)) {
        const nar = nixcasBytes(['nar', path], { ...env, ...RENDERERS.native });
        assert.ok(nar.equals(nix('nix-store', ['--dump', path])), `NAR of ${path} differs from nix-store --dump`);
        assert.ok(nixcasBytes(['nar', path], { ...env, ...RENDERERS.typescript }).equals(nar), `TypeScript NAR of ${path}`);
        const info = (await pathInfos.get(parseStorePath(path).digest))!;
        assert.ok(info, `${path} not registered`);
        const nixHash = nix('nix-hash', ['--type', 'sha256', '--base32', path]).toString().trim();
        assert.equal(nixbase32.encode(info.narSha256), nixHash);
        assert.equal(nixbase32.encode(createHash('sha256').update(nar).digest()), nixHash);
        assert.equal(info.narSize, nar.length);
        const nixRefs = nix('nix-store', ['-q', '--references', path]).toString().trim().split('\n').filter(Boolean).sort();
        assert.deepEqual(info.references.map(formatStorePath).sort(), nixRefs);
      }
    } finally {
      await pathInfos.close();
    }

    const again = nixcas(['copy', '-'], { env, input: readFileSync(attrs) });
    assert.equal(again.status, 0, again.stderr);
    assert.match(again.stderr, /0 copied .* 3 already present, 0 failed/);

    // `nix path-info --json --recursive` output is accepted too, into a fresh store.
    const mid = closurePaths(attrs).find((p) => p.endsWith('-mid'))!;
    const pathInfoJson = nix('nix', ['--extra-experimental-features', 'nix-command', 'path-info', '--json', '--recursive', mid]);
    const fresh = nixcas(['copy', '-'], { env: { NIXCAS_STORE: join(work, 'store2') }, input: pathInfoJson });
    assert.equal(fresh.status, 0, fresh.stderr);
    assert.match(fresh.stderr, /3 copied/);
    const deriverInfos = new LocalPathInfoService(join(work, 'store2'));
    try {
      const info = (await deriverInfos.get(parseStorePath(mid).digest))!;
      assert.ok(info.deriver, 'deriver from nix path-info is kept');
      assert.match(formatStorePath(info.deriver!), /-mid$/);
    } finally {
      await deriverInfos.close();
    }
    assert.deepEqual((await verifyLocalStore(store)).problems, []);
  } finally {
    removeDir(work);
  }
});

test('copy: a wrong NAR hash or size, a missing path, an invalid path fail alone, with clear errors', async () => {
  const work = tempDir('nix-copy-bad');
  try {
    const attrs = buildClosureFixture(join(work, 'result'));
    const closure = JSON.parse(readFileSync(attrs, 'utf8'));
    const entries = closure.closure as { path: string; narHash: string; narSize: number; references: string[] }[];
    const leaf = entries.find((e) => e.path.endsWith('-leaf'))!;
    const file = entries.find((e) => e.path.endsWith('-just-a-file'))!;
    const mid = entries.find((e) => e.path.endsWith('-mid'))!;
    // just-a-file gets a wrong hash; mid refers to it, so mid cannot be registered either.
    file.narHash = `sha256:${nixbase32.encode(Buffer.alloc(32, 7))}`;
    entries.push(
      { path: `/nix/store/${nixbase32.encode(Buffer.alloc(20, 1))}-not-there`, narHash: leaf.narHash, narSize: 8, references: [] },
      { path: '/nix/store/not-a-store-path', narHash: leaf.narHash, narSize: 8, references: [] },
      { path: leaf.path.replace('-leaf', '-leaf-size'), narHash: leaf.narHash, narSize: leaf.narSize, references: [] },
    );
    const store = join(work, 'store');
    const run = nixcas(['copy', '-'], { env: { NIXCAS_STORE: store }, input: JSON.stringify(closure) });
    assert.equal(run.status, 1);
    assert.match(run.stderr, new RegExp(`${file.path}: NAR hash mismatch: the closure says sha256:\\w+, the path on disk hashes to ${leaf.narHash.length ? 'sha256:' : ''}`));
    assert.match(run.stderr, new RegExp(`${mid.path}: its reference ${file.path} could not be copied`));
    assert.match(run.stderr, /-not-there: cannot read \/nix\/store\/\w+-not-there: no such path/);
    assert.match(run.stderr, /not-a-store-path: .*not a store path basename/);
    assert.match(run.stderr, /1 copied .* 0 already present, 5 failed/);

    const pathInfos = new LocalPathInfoService(store);
    try {
      assert.ok(await pathInfos.get(parseStorePath(leaf.path).digest), 'the good path is copied');
      for (const bad of [file.path, mid.path]) assert.equal(await pathInfos.get(parseStorePath(bad).digest), undefined, `${bad} must not be registered`);
    } finally {
      await pathInfos.close();
    }

    // A size that does not match (with the right hash).
    const sized = { closure: [{ ...leaf, narSize: leaf.narSize + 8 }] };
    const sizeRun = nixcas(['copy', '-'], { env: { NIXCAS_STORE: join(work, 'store3') }, input: JSON.stringify(sized) });
    assert.equal(sizeRun.status, 1);
    assert.match(sizeRun.stderr, new RegExp(`NAR size mismatch: the closure says ${leaf.narSize + 8} bytes, the path on disk is ${leaf.narSize}`));
  } finally {
    removeDir(work);
  }
});

/** A tree with everything a NAR can hold, and then some. */
function makeAwkwardTree(root: string, bigFileBytes: number): void {
  mkdirSync(join(root, 'bin'), { recursive: true });
  writeFileSync(join(root, 'bin/tool'), '#!/bin/sh\necho tool\n');
  chmodSync(join(root, 'bin/tool'), 0o755);
  writeFileSync(join(root, 'bin/not-executable'), 'data');
  chmodSync(join(root, 'bin/not-executable'), 0o644);
  writeFileSync(join(root, 'empty-file'), '');
  mkdirSync(join(root, 'empty-dir'));
  symlinkSync('bin/tool', join(root, 'relative-link'));
  symlinkSync('/etc/hostname', join(root, 'absolute-link'));
  symlinkSync('does/not/exist', join(root, 'dangling-link'));
  let deep = join(root, 'deep');
  for (let i = 0; i < 40; i++) deep = join(deep, `level${i}`);
  mkdirSync(deep, { recursive: true });
  writeFileSync(join(deep, 'bottom'), 'deep down');
  const latin1Name = Buffer.concat([Buffer.from(root + '/'), Buffer.from([0x6e, 0xe4, 0x6d, 0x65, 0xff])]);
  writeFileSync(latin1Name, 'not UTF-8 named');
  for (let i = 0; i < 300; i++) writeFileSync(join(root, `small-${String(i).padStart(3, '0')}`), `file ${i}\n`.repeat(i));
  // Several MiB of small files: `nixcas nar` gathers them in 1 MiB slabs it reuses once written,
  // so a slow reader shows whether one was refilled before its bytes left.
  mkdirSync(join(root, 'many'));
  for (let i = 0; i < 500; i++) writeFileSync(join(root, 'many', `m${i}`), randomBytes(6000 + i * 20));
  // Blobs the local store keeps in LMDB, large enough to pass the NAR encoder's slab: rendering
  // reads them from LMDB's reusable buffer, so one handed over uncopied would be overwritten by the next.
  for (const size of [32 * 1024, 40_000, 50_001, 64 * 1024 - 1, 64 * 1024]) writeFileSync(join(root, `near-limit-${size}`), randomBytes(size));
  // Large files are read in 4 MiB lent slabs and written past 8 MiB with O_DIRECT: sizes just past
  // a slab and one whose last write is not a whole sector.
  for (const size of [1024 * 1024 + 1, 4 * 1024 * 1024 + 1, 9 * 1024 * 1024 + 4097]) writeFileSync(join(root, `slab-edge-${size}`), randomBytes(size));
  const big = randomBytes(1024 * 1024);
  const chunks = Array.from({ length: bigFileBytes / big.length }, (_, i) => (i % 2 ? big : Buffer.from(big).reverse()));
  writeFileSync(join(root, 'big.bin'), Buffer.concat(chunks));
}

test('import prints the path nix-store --add creates, for awkward trees, single files and a 64 MiB file', async () => {
  const work = tempDir('nix-import');
  try {
    const tree = join(work, 'awkward-tree');
    makeAwkwardTree(tree, 64 * 1024 * 1024);
    writeFileSync(join(work, 'single.txt'), 'one file\n');
    const script = join(work, 'script.sh');
    writeFileSync(script, '#!/bin/sh\n');
    chmodSync(script, 0o755);
    symlinkSync('single.txt', join(work, 'top-link'));
    const inputs = [tree, join(work, 'single.txt'), script, join(work, 'top-link')];
    const env = { NIXCAS_STORE: join(work, 'store') };
    const run = nixcas(['import', ...inputs], { env });
    assert.equal(run.status, 0, run.stderr);
    const ours = run.stdout.trim().split('\n');
    const theirs = inputs.map((input) => nix('nix-store', ['--add', input]).toString().trim());
    assert.deepEqual(ours, theirs);
    for (const path of ours) {
      for (const renderer of Object.values(RENDERERS)) {
        assert.ok(nixcasBytes(['nar', path], { ...env, ...renderer }).equals(nix('nix-store', ['--dump', path])), `NAR of ${path}`);
      }
    }

    // Every kind of stdout `nixcas nar` meets, with both renderers. The 64 MiB file's contents go by
    // sendfile to a file, a pipe (read slowly, so it fills) and /dev/null, and are written instead
    // where sendfile refuses (an O_APPEND file).
    const treeNar = nix('nix-store', ['--dump', ours[0]!]);
    for (const [name, renderer] of Object.entries(RENDERERS)) {
      const narAs = (redirect: string) => {
        const result = spawnSync('sh', ['-c', `"$0" "$1" nar "$2" ${redirect}`, process.execPath, CLI, ours[0]!], { env: { ...process.env, ...env, ...renderer }, encoding: 'utf8' });
        assert.equal(result.status, 0, `${name}: nar ${redirect}: ${result.stderr}`);
        return result.stdout;
      };
      const outFile = join(work, 'out.nar');
      narAs(`> ${outFile}`);
      assert.ok(readFileSync(outFile).equals(treeNar), `${name}: nar > file`);
      writeFileSync(outFile, 'before\n');
      narAs(`>> ${outFile}`);
      assert.ok(readFileSync(outFile).equals(Buffer.concat([Buffer.from('before\n'), treeNar])), `${name}: nar >> file`);
      assert.equal(narAs('| (sleep 1; sha256sum)').split(' ')[0], createHash('sha256').update(treeNar).digest('hex'), `${name}: nar | slow reader`);
      narAs('> /dev/null');
      const cutShort = spawnSync('sh', ['-c', `"$0" "$1" nar "$2" | head -c 16 > /dev/null`, process.execPath, CLI, ours[0]!], { env: { ...process.env, ...env, ...renderer }, encoding: 'utf8' });
      assert.match(cutShort.stderr, /the reader went away after \d+ bytes of the NAR \(broken pipe\)/, name);
    }
    assert.deepEqual((await verifyLocalStore(join(work, 'store'))).problems, []);
  } finally {
    removeDir(work);
  }
});

test('NAR round trip: nix-store --dump, ingested, rendered again, is identical', async () => {
  const work = tempDir('nix-roundtrip');
  const root = join(work, 'store');
  const services = { blobs: LocalStore.blobService(root), directories: LocalStore.directoryService(root) };
  try {
    const tree = join(work, 'tree');
    makeAwkwardTree(tree, 8 * 1024 * 1024);
    const attrs = buildClosureFixture(join(work, 'result'));
    for (const source of [tree, ...closurePaths(attrs), '/bin/sh']) {
      const nar = nix('nix-store', ['--dump', source]);
      // Fed in odd-sized pieces, so tokens straddle chunk boundaries.
      const pieces: Buffer[] = [];
      for (let at = 0; at < nar.length; at += 4093) pieces.push(nar.subarray(at, at + 4093));
      const ingested = await ingestNar(pieces, services);
      assert.equal(ingested.narSize, nar.length);
      assert.ok(ingested.narSha256.equals(createHash('sha256').update(nar).digest()));
      assert.ok((await collect(renderNar(ingested.root, services))).equals(nar), `round trip of ${source}`);
    }
  } finally {
    await services.blobs.close();
    await services.directories.close();
    removeDir(work);
  }
});

test('nar of a damaged store: a missing or shortened blob, a missing directory fail with a clear error, from both renderers', async () => {
  const work = tempDir('nix-nar-damaged');
  try {
    const tree = join(work, 'tree');
    mkdirSync(join(tree, 'sub'), { recursive: true });
    writeFileSync(join(tree, 'sub', 'small.txt'), 'kept in LMDB\n');
    writeFileSync(join(tree, 'big.bin'), randomBytes(200_000)); // a blob file
    symlinkSync('sub/small.txt', join(tree, 'link'));
    const store = join(work, 'store');
    const imported = nixcas(['import', tree], { env: { NIXCAS_STORE: store } });
    assert.equal(imported.status, 0, imported.stderr);
    const path = imported.stdout.trim();

    const pathInfos = new LocalPathInfoService(store);
    const directories = LocalStore.directoryService(store);
    const root = (await pathInfos.get(parseStorePath(path).digest))!.node;
    assert.equal(root.kind, 'directory');
    const top = (await directories.get(root.node.digest))!;
    const sub = top.directories[0]!;
    const small = (await directories.get(sub.digest))!.files[0]!;
    const big = top.files[0]!;
    await pathInfos.close();
    await directories.close();
    const bigHex = Buffer.from(big.digest).toString('hex');

    const damages: { what: string; damage: (copy: string) => void; error: RegExp }[] = [
      { what: 'a blob file removed', damage: (copy) => rmSync(join(copy, 'blobs', bigHex.slice(0, 2), bigHex)), error: /big\.bin: blob b3:\S+ is missing/ },
      {
        what: 'a blob file cut short',
        damage: (copy) => truncateSync(join(copy, 'blobs', bigHex.slice(0, 2), bigHex), 1000),
        // The TypeScript renderer's blob service finds the file changed and hashes it; the C renderer sees the size first.
        error: /big\.bin: (the store at \S+ is damaged: )?blob b3:\S+ (has 1000 bytes, its node says 200000|\(file \S+, 1000 bytes\) does not hash to its digest)/,
      },
      { what: 'a small blob removed', damage: (copy) => removeFromLmdb(copy, 'small-blobs', small.digest), error: /sub\/small\.txt: blob b3:\S+ is missing/ },
      { what: 'a directory removed', damage: (copy) => removeFromLmdb(copy, 'directories', sub.digest), error: /directory b3:\S+ .*is missing/ },
      {
        what: 'a directory overwritten with garbage',
        damage: (copy) => replaceInLmdb(copy, 'directories', sub.digest, Buffer.from([0x12, 0xff, 0x01])),
        error: /directory b3:\S+ (\((\d+ bytes, )?in metadata\/\) does not hash to its digest|is malformed)/,
      },
    ];
    for (const [index, { what, damage, error }] of damages.entries()) {
      const copy = join(work, `damaged-${index}`);
      cpSync(store, copy, { recursive: true });
      damage(copy);
      for (const [name, renderer] of Object.entries(RENDERERS)) {
        const run = nixcas(['nar', path], { env: { NIXCAS_STORE: copy, ...renderer } });
        assert.equal(run.status, 1, `${what}, ${name}: exit status`);
        assert.match(run.stderr, error, `${what}, ${name}`);
      }
    }
    // The undamaged store still renders, with both.
    for (const renderer of Object.values(RENDERERS)) {
      assert.ok(nixcasBytes(['nar', path], { NIXCAS_STORE: store, ...renderer }).equals(nix('nix-store', ['--dump', tree])));
    }
  } finally {
    removeDir(work);
  }
});

test('a layout-1 store (every blob a file, no small-blobs database) is read by both renderers and upgraded in place by the first command that writes', async () => {
  const work = tempDir('nix-layout-1');
  try {
    const tree = join(work, 'tree');
    mkdirSync(join(tree, 'sub'), { recursive: true });
    writeFileSync(join(tree, 'sub', 'small.txt'), 'a small blob\n');
    writeFileSync(join(tree, 'empty'), '');
    writeFileSync(join(tree, 'medium.bin'), randomBytes(40_000));
    writeFileSync(join(tree, 'big.bin'), randomBytes(200_000));
    const store = join(work, 'store');
    const imported = nixcas(['import', tree], { env: { NIXCAS_STORE: store } });
    assert.equal(imported.status, 0, imported.stderr);
    const path = imported.stdout.trim();

    // Turn it into what nixcas wrote before layout 2: small blobs as files too.
    const env = openLmdb({ path: join(store, 'metadata'), maxDbs: 8, compression: false });
    let moved = 0;
    try {
      const smallBlobs = env.openDB<Buffer, Buffer>({ name: 'small-blobs', encoding: 'binary', keyEncoding: 'binary' });
      for (const { key, value } of smallBlobs.getRange()) {
        const hex = Buffer.from(key).toString('hex');
        mkdirSync(join(store, 'blobs', hex.slice(0, 2)), { recursive: true });
        writeFileSync(join(store, 'blobs', hex.slice(0, 2), hex), value, { mode: 0o444 });
        moved++;
      }
      smallBlobs.dropSync();
    } finally {
      await env.close();
    }
    assert.equal(moved, 3, 'the small, empty and medium files were small blobs');
    writeFileSync(join(store, 'nixcas-store'), 'nixcas-store 1\n');

    const expected = nix('nix-store', ['--dump', tree]);
    // The native renderer first: it opens the store read-only and finds no small-blobs database.
    assert.ok(nixcasBytes(['nar', path], { NIXCAS_STORE: store, ...RENDERERS.native }).equals(expected), 'native renderer, layout 1');
    assert.equal(readFileSync(join(store, 'nixcas-store'), 'utf8'), 'nixcas-store 1\n', 'reading natively leaves the marker alone');
    assert.ok(nixcasBytes(['nar', path], { NIXCAS_STORE: store, ...RENDERERS.typescript }).equals(expected), 'TypeScript renderer, layout 1');
    assert.equal(readFileSync(join(store, 'nixcas-store'), 'utf8'), 'nixcas-store 1\n', 'a command that only reads writes nothing, the marker included');

    // Upgraded: new small blobs go to LMDB, old ones are still read from their files.
    const more = join(work, 'more');
    mkdirSync(more);
    writeFileSync(join(more, 'note'), 'written after the upgrade\n');
    const second = nixcas(['import', more], { env: { NIXCAS_STORE: store } });
    assert.equal(second.status, 0, second.stderr);
    assert.equal(readFileSync(join(store, 'nixcas-store'), 'utf8'), 'nixcas-store 2\n', 'the first command that writes upgrades the store to layout 2');
    for (const [name, renderer] of Object.entries(RENDERERS)) {
      assert.ok(nixcasBytes(['nar', path], { NIXCAS_STORE: store, ...renderer }).equals(expected), `${name} renderer, the old path after the upgrade`);
      assert.ok(nixcasBytes(['nar', second.stdout.trim()], { NIXCAS_STORE: store, ...renderer }).equals(nix('nix-store', ['--dump', more])), `${name} renderer, the new path`);
    }
    const check = await verifyLocalStore(store);
    assert.deepEqual(check.problems, []);
  } finally {
    removeDir(work);
  }
});

/** Changes one key of a named database of a store's LMDB environment (no nixcas process has it open). */
function changeInLmdb(store: string, name: string, change: (db: Database<Buffer, Buffer>) => boolean): void {
  const env = openLmdb({ path: join(store, 'metadata'), maxDbs: 8, compression: false });
  try {
    assert.ok(change(env.openDB({ name, encoding: 'binary', keyEncoding: 'binary' })), `${name} had the key`);
  } finally {
    void env.close();
  }
}

function removeFromLmdb(store: string, name: string, key: Uint8Array): void {
  changeInLmdb(store, name, (db) => db.removeSync(Buffer.from(key)));
}

function replaceInLmdb(store: string, name: string, key: Uint8Array, value: Buffer): void {
  changeInLmdb(store, name, (db) => db.doesExist(Buffer.from(key)) && db.putSync(Buffer.from(key), value));
}

test('the native renderer reads a store while lmdb-js writes to it from another process', async () => {
  const work = tempDir('nix-nar-concurrent');
  const store = join(work, 'store');
  try {
    const tree = join(work, 'tree');
    makeAwkwardTree(tree, 1024 * 1024);
    const imported = nixcas(['import', tree], { env: { NIXCAS_STORE: store } });
    assert.equal(imported.status, 0, imported.stderr);
    const path = imported.stdout.trim();
    const expected = nix('nix-store', ['--dump', tree]);

    // This process holds the environment open through lmdb-js and commits small blobs
    // (growing the map) while `nixcas nar` processes open it with the LMDB built into the renderer.
    const blobs = LocalStore.blobService(store);
    let writing = true;
    let commits = 0;
    const writer = (async () => {
      while (writing) {
        const blob = blobs.openWriter();
        await blob.write(randomBytes(4096 + (commits % 1000)));
        await blob.close();
        commits++;
      }
    })();
    try {
      const renders = Array.from({ length: 6 }, () => nixcasAsync(['nar', path], { NIXCAS_STORE: store, ...RENDERERS.native }));
      for (const nar of await Promise.all(renders)) assert.ok(nar.equals(expected), 'NAR rendered during writes');
    } finally {
      writing = false;
      await writer;
      await blobs.close();
    }
    assert.ok(commits > 0, 'the writer committed while the renderers ran');
    assert.deepEqual((await verifyLocalStore(store)).problems, []);
  } finally {
    removeDir(work);
  }
});

/** `nixcas ARGS…` without blocking this process's event loop; resolves to stdout. */
function nixcasAsync(args: string[], env: NodeJS.ProcessEnv): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, encoding: 'buffer', maxBuffer: 1 << 30 }, (err, stdout, stderr) =>
      err ? reject(new Error(`nixcas ${args.join(' ')}: ${err.message} ${stderr.toString()}`)) : resolve(stdout),
    );
  });
}

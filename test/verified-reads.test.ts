// Verified reads (issue #22, item 1): damage a stored object in each way a disk
// or a careless hand does, and check that no read path hands out its bytes:
// `nixcas nar` (both renderers) fails naming the damage, the nar-bridge aborts
// the NAR, gRPC answers DATA_LOSS, a virtio-fs READ and a FUSE read get EIO.
// The store's other files are still served.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { appendFileSync, chmodSync, existsSync, mkdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { blake3, digestKey } from '../src/castore/digest.js';
import { DataLossError } from '../src/castore/errors.js';
import { getBlob } from '../src/castore/blobservice.js';
import { openBlobService, openDirectoryService, openPathInfoService } from '../src/services/addresses.js';
import { parseStorePath } from '../src/store/storepath.js';
import type { GrpcPathInfoService } from '../src/grpc/store-client.js';
import { type Daemon, bridgeNarUrl, nix, nixcas, nixcasBytes, removeDir, startDaemon, startNixcas, tempDir } from './helpers.js';
import { FuseOp, VirtioFsDriver } from './virtiofs-driver.js';

const work = tempDir('verified-reads');
after(() => removeDir(work));

const LARGE = Buffer.alloc(200_000);
for (let i = 0; i < LARGE.length; i++) LARGE[i] = (i * 7 + 3) % 256;
const SMALL = Buffer.from('SMALL-BLOB-UNDER-TEST '.repeat(100));
const DIRECTORY_ENTRY = 'entry-bravo-name';

/** A tree with a large blob, a small blob and a subdirectory, besides a file that stays intact. */
function makeTree(): string {
  const tree = join(work, 'tree');
  mkdirSync(join(tree, 'sub'), { recursive: true });
  writeFileSync(join(tree, 'large'), LARGE);
  writeFileSync(join(tree, 'small'), SMALL);
  writeFileSync(join(tree, 'intact'), 'still here\n');
  // Contents other than the names: the directory damage below rewrites the name's bytes wherever they are.
  ['entry-alpha-name', DIRECTORY_ENTRY, 'entry-charlie-name'].forEach((name, i) => writeFileSync(join(tree, 'sub', name), `sub file ${i}\n`));
  // Small blobs enough (before the damaged one) that the C renderer checks them on its second thread.
  for (let i = 0; i < 10; i++) writeFileSync(join(tree, `filler-${i}`), Buffer.alloc(40_000, 0x41 + i));
  return tree;
}
const tree = makeTree();

function blobFile(store: string, contents: Buffer): string {
  const hex = digestKey(blake3(contents));
  return join(store, 'blobs', hex.slice(0, 2), hex);
}

/** Replaces every occurrence of `from` in the store's LMDB file with `to` (same length), as a stray write would. */
function patchMetadata(store: string, from: Buffer, to: Buffer): void {
  const file = join(store, 'metadata', 'data.mdb');
  const data = readFileSync(file);
  let found = 0;
  for (let at = data.indexOf(from); at >= 0; at = data.indexOf(from, at + 1)) {
    to.copy(data, at);
    found++;
  }
  assert.ok(found > 0, `${from.toString('latin1').slice(0, 20)}… is in ${file}`);
  writeFileSync(file, data);
}

interface Damage {
  name: string;
  /** The file of the tree whose read must fail (a path under the store path). */
  file: string;
  damage(store: string): void;
}

const damages: Damage[] = [
  {
    name: 'a flipped byte in a blob file',
    file: 'large',
    damage(store) {
      const file = blobFile(store, LARGE);
      const bytes = readFileSync(file);
      bytes[1000] ^= 0x01;
      chmodSync(file, 0o644);
      writeFileSync(file, bytes);
      chmodSync(file, 0o444);
    },
  },
  { name: 'a truncated blob file', file: 'large', damage: (store) => truncateSync(blobFile(store, LARGE), LARGE.length - 1) },
  { name: 'an extended blob file', file: 'large', damage: (store) => appendFileSync(blobFile(store, LARGE), 'x') },
  {
    name: 'a flipped byte in a small blob in LMDB',
    file: 'small',
    damage(store) {
      const changed = Buffer.from(SMALL);
      changed[5] ^= 0x01;
      patchMetadata(store, SMALL, changed);
    },
  },
  {
    name: 'a directory record with an entry renamed (order kept)',
    file: `sub/${DIRECTORY_ENTRY}`,
    damage: (store) => patchMetadata(store, Buffer.from(DIRECTORY_ENTRY), Buffer.from('entry-bravx-name')),
  },
];

/** A fresh store holding the tree, damaged; returns it and the store path. */
function damagedStore(damage: Damage, index: number): { store: string; path: string } {
  const store = join(work, `store-${index}`);
  const path = nixcas(['import', '--store', store, tree]).stdout.trim();
  // The intact store renders what Nix would, with every check on.
  assert.ok(nixcasBytes(['nar', '--store', store, path]).equals(nix('nix-store', ['--dump', tree])), 'the store renders before it is damaged');
  damage.damage(store);
  return { store, path };
}

damages.forEach((damage, index) => {
  test(`${damage.name}: no read path serves it`, async () => {
    const { store, path } = damagedStore(damage, index);

    for (const renderer of ['0', '1']) {
      const run = spawnSync(process.execPath, [join(import.meta.dirname, '..', 'dist/cli/nixcas.cjs'), 'nar', '--store', store, path], {
        env: { ...process.env, NIXCAS_NATIVE_NAR: renderer },
        encoding: 'buffer',
      });
      const stderr = run.stderr.toString();
      assert.notEqual(run.status, 0, `nar with NIXCAS_NATIVE_NAR=${renderer} fails`);
      assert.match(stderr, /is damaged/, `nar with NIXCAS_NATIVE_NAR=${renderer} says why: ${stderr}`);
      assert.ok(stderr.includes(store), `and names the store: ${stderr}`);
    }

    checkVerify(store, path, damage);
    await checkBridge(store, path);
    await checkGrpc(store, path, damage);
    await checkVirtioFs(store, path, damage);
    await checkFuse(store, path, damage);
    checkRepair(store, path, damage);
  });
});

/** `nixcas verify` names the damaged object and the file that uses it; --check-contents finds it in every case. */
function checkVerify(store: string, path: string, damage: Damage): void {
  const full = nixcas(['verify', '--store', store, '--check-contents', '--json']);
  assert.equal(full.status, 1, `verify --check-contents fails: ${full.stderr}`);
  const report = JSON.parse(full.stdout) as { paths: number; problems: { kind: string; problem: string; usedBy: string[] }[] };
  assert.equal(report.paths, 1);
  assert.equal(report.problems.length, 1, `one problem: ${full.stdout}`);
  const [problem] = report.problems;
  const damagedFile = damage.file.startsWith('sub/') ? `${path}/sub` : `${path}/${damage.file}`;
  assert.deepEqual(problem!.usedBy, [damagedFile], 'used by the file (or directory) that holds it');
  assert.equal(problem!.kind, damage.file.startsWith('sub/') ? 'directory' : 'blob');
  // Without --check-contents: directories are hashed and blob sizes checked, so only a flipped byte in a blob goes unseen.
  const quick = nixcas(['verify', '--store', store, path]);
  const sizeOrRecord = !/flipped byte in a (blob file|small blob)/.test(damage.name);
  assert.equal(quick.status, sizeOrRecord ? 1 : 0, `verify without --check-contents: ${quick.stderr}`);
  assert.match(quick.stderr, sizeOrRecord ? /1 problems\n.* used by / : /all intact/);
}

/** `verify --repair` moves the damaged object aside: it then reads as missing, and importing the tree again mends the store. */
function checkRepair(store: string, path: string, damage: Damage): void {
  const repair = nixcas(['verify', '--store', store, '--repair', '--json']);
  assert.equal(repair.status, 1, `verify --repair still reports the problem: ${repair.stderr}`);
  const [problem] = (JSON.parse(repair.stdout) as { problems: { movedTo?: string }[] }).problems;
  assert.ok(problem?.movedTo && existsSync(problem.movedTo), `the damaged object was moved aside: ${repair.stdout}`);
  assert.ok(problem.movedTo.startsWith(join(store, 'damaged') + '/'), 'into STORE/damaged/');
  const after = nixcas(['verify', '--store', store, '--check-contents', '--json']);
  assert.equal(after.status, 1);
  assert.match(after.stdout, /"problem": "missing"/, `then it reads as missing, not as wrong: ${after.stdout}`);
  assert.equal(nixcas(['import', '--store', store, tree]).stdout.trim(), path, 'importing the tree again');
  const mended = nixcas(['verify', '--store', store, '--check-contents']);
  assert.equal(mended.status, 0, `mends the store: ${mended.stderr}`);
  assert.ok(nixcasBytes(['nar', '--store', store, path]).equals(nix('nix-store', ['--dump', tree])), 'which renders the path again');
}

test('nixcas verify: an intact store is all intact, an unknown path is an error naming it', () => {
  const store = join(work, 'store-intact');
  const path = nixcas(['import', '--store', store, tree]).stdout.trim();
  const run = nixcas(['verify', '--store', store, '--check-contents']);
  assert.equal(run.status, 0, run.stderr);
  assert.match(run.stderr, /1 paths, 2 directories, 16 blobs .* hashed: all intact/);
  const nowhere = nixcas(['verify', '--store', join(work, 'no-store-here'), '--repair']);
  assert.notEqual(nowhere.status, 0, 'repair of a directory that holds no store');
  assert.match(nowhere.stderr, /holds no nixcas store/);
  assert.equal(existsSync(join(work, 'no-store-here')), false, 'and makes none');
  const unknown = nixcas(['verify', '--store', store, path.replace(/-tree$/, '-other')]);
  assert.notEqual(unknown.status, 0);
  assert.match(unknown.stderr, /-other is not in the store/);
});

async function checkBridge(store: string, path: string): Promise<void> {
  const bridge = await startNixcas(['nar-bridge', '--store', store, '--listen', '127.0.0.1:0'], 'listening on');
  try {
    const { port, url } = await bridgeNarUrl(bridge, path);
    const served = (async () => {
      const response = await fetch(`http://127.0.0.1:${port}/${url}`);
      if (response.status !== 200) return `status ${response.status}`;
      await response.arrayBuffer();
      return 'complete';
    })();
    // Either an error status before the body, or a body cut off: never a complete 200.
    const outcome = await served.catch((err: Error) => `aborted: ${err.message}`);
    assert.notEqual(outcome, 'complete', 'the bridge does not complete the NAR');
    assert.match(bridge.output(), /is damaged/, 'the bridge logs the damage');
  } finally {
    await bridge.stop();
  }
}

async function checkGrpc(store: string, path: string, damage: Damage): Promise<void> {
  const socket = join(work, 'grpc.sock');
  const daemon: Daemon = await startDaemon(['--store', store, '--listen', socket]);
  const url = `grpc+unix://${socket}`;
  const blobs = await openBlobService(url);
  const directories = await openDirectoryService(url);
  const pathInfos = await openPathInfoService(url);
  try {
    const info = await pathInfos.get(parseStorePath(path).digest);
    assert.ok(info, 'the path info is served');
    if (damage.file.startsWith('sub/')) {
      const root = await directories.get((info.node.node as { digest: Buffer }).digest);
      const sub = root!.directories.find((d) => d.name.toString() === 'sub')!;
      await assert.rejects(directories.get(sub.digest), DataLossError, 'Get of the damaged directory: DATA_LOSS');
    } else {
      const contents = damage.file === 'large' ? LARGE : SMALL;
      await assert.rejects(getBlob(blobs, blake3(contents)), DataLossError, 'Read of the damaged blob: DATA_LOSS');
    }
    await assert.rejects((pathInfos as GrpcPathInfoService).calculateNar(info.node), DataLossError, 'CalculateNAR: DATA_LOSS');
    assert.ok((await getBlob(blobs, blake3(Buffer.from('still here\n'))))!.equals(Buffer.from('still here\n')), 'an intact blob is still served');
  } finally {
    await pathInfos.close();
    await directories.close();
    await blobs.close();
    await daemon.stop();
  }
}

async function checkVirtioFs(store: string, path: string, damage: Damage): Promise<void> {
  const socket = join(work, 'fs.sock');
  const backend = await startNixcas(['virtiofs', socket, '--store', store], 'listening on');
  const driver = await VirtioFsDriver.connect(socket, { maxDepth: 1, queueSize: 16, memoryBytes: 16 << 20 });
  try {
    const lookup = async (parent: bigint, name: string) => {
      const reply = await driver.call(FuseOp.LOOKUP, parent, Buffer.from(`${name}\0`));
      return { error: reply.error, nodeid: reply.error === 0 ? reply.body.readBigUInt64LE(0) : 0n };
    };
    const read = async (nodeid: bigint) => {
      const args = Buffer.alloc(40);
      args.writeUInt32LE(256 * 1024, 16);
      return driver.call(FuseOp.READ, nodeid, args, 256 * 1024 + 16);
    };
    let parent = (await lookup(1n, path.slice('/nix/store/'.length))).nodeid;
    assert.notEqual(parent, 0n, 'the store path is found');
    const names = damage.file.split('/');
    const intact = await lookup(parent, 'intact');
    assert.equal(intact.error, 0);
    const readIntact = await read(intact.nodeid);
    assert.equal(readIntact.error, 0);
    assert.equal(readIntact.body.toString(), 'still here\n', 'an intact file reads');
    let error = 0;
    for (const name of names.slice(0, -1)) {
      const found = await lookup(parent, name);
      error = found.error;
      if (error) break;
      parent = found.nodeid;
    }
    if (error === 0) {
      const file = await lookup(parent, names.at(-1)!);
      error = file.error || (await read(file.nodeid)).error;
    }
    assert.equal(error, -5, `reaching and reading ${damage.file} over virtio-fs: EIO`);
    assert.equal((await read(intact.nodeid)).error, 0, 'the intact file still reads afterwards');
  } finally {
    driver.close();
    await backend.stop();
  }
  assert.match(backend.output(), new RegExp(`${damage.file.split('/')[0]}.*is damaged`), 'the back end logs the damage, naming the file');
}

async function checkFuse(store: string, path: string, damage: Damage): Promise<void> {
  const mountpoint = join(work, 'mnt');
  mkdirSync(mountpoint, { recursive: true });
  const mount = await startNixcas(['mount', '--store', store, mountpoint], 'mounted at');
  try {
    const root = join(mountpoint, path.slice('/nix/store/'.length));
    assert.equal(readFileSync(join(root, 'intact'), 'utf8'), 'still here\n', 'an intact file reads through FUSE');
    assert.throws(() => readFileSync(join(root, damage.file)), { code: 'EIO' }, `reading ${damage.file} through FUSE: EIO`);
    assert.equal(readFileSync(join(root, 'intact'), 'utf8'), 'still here\n', 'and the mount keeps working');
  } finally {
    await mount.stop();
  }
}

// `nixcas mount` against the real peer: the Linux kernel through a FUSE mount.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  chmodSync, closeSync, copyFileSync, existsSync, lstatSync, mkdirSync, openSync, readFileSync, readSync, readdirSync,
  readlinkSync, rmSync, statSync, symlinkSync, writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { blake3, formatDigest } from '../src/castore/digest.js';
import { LocalStore } from '../src/castore/backends/local.js';
import { type Daemon, nixcas, removeDir, seededRandom, startDaemon, startNixcas, tempDir } from './helpers.js';

const NON_UTF8 = Buffer.from([0x6e, 0x6f, 0x6e, 0xff, 0xfe, 0x2d, 0x75, 0x74, 0x66, 0x38]); // "non\xff\xfe-utf8"
const BIG_BYTES = 64 * 1024 * 1024 + 12345;
const WIDE_ENTRIES = 10_000;

/** A tree with every kind of entry the store can hold. */
function makeTree(root: string): void {
  mkdirSync(join(root, 'bin'), { recursive: true });
  copyFileSync('/bin/true', join(root, 'bin/true')); // a real program, run from the mount
  writeFileSync(join(root, 'bin/hello'), '#!/bin/sh\necho hello from the store\n');
  chmodSync(join(root, 'bin/hello'), 0o755);
  writeFileSync(join(root, 'plain.txt'), 'plain text\n');
  writeFileSync(join(root, 'empty-file'), '');
  mkdirSync(join(root, 'empty-dir'));
  symlinkSync('plain.txt', join(root, 'relative-link'));
  symlinkSync('/etc/hostname', join(root, 'absolute-link'));
  symlinkSync('does/not/exist', join(root, 'dangling-link'));
  symlinkSync('bin', join(root, 'dir-link'));
  writeFileSync(Buffer.from(join(root, '/') + NON_UTF8.toString('latin1'), 'latin1'), 'a name that is not UTF-8\n');
  let deep = join(root, 'deep');
  for (let i = 0; i < 30; i++) deep = join(deep, `level${i}`);
  mkdirSync(deep, { recursive: true });
  writeFileSync(join(deep, 'bottom'), 'the bottom\n');
  mkdirSync(join(root, 'wide'));
  for (let i = 0; i < WIDE_ENTRIES; i++) writeFileSync(join(root, 'wide', `entry-${i}`), i % 7 === 0 ? `content ${i}\n` : '');
  writeFileSync(join(root, 'big'), randomBytes(BIG_BYTES));
  // Same content, different executable bit: must not share a mode.
  writeFileSync(join(root, 'same-a'), 'same\n');
  writeFileSync(join(root, 'same-x'), 'same\n');
  chmodSync(join(root, 'same-x'), 0o755);
}

function importPath(store: string, path: string): string {
  const run = nixcas(['import', '--store', store, path]);
  assert.equal(run.status, 0, run.stderr);
  return run.stdout.trim().replace('/nix/store/', '');
}

function mount(store: string, mountpoint: string, ...flags: string[]): Promise<Daemon> {
  mkdirSync(mountpoint, { recursive: true });
  return startNixcas(['mount', '--store', store, ...flags, mountpoint], 'mounted at');
}

function isMounted(mountpoint: string): boolean {
  return readFileSync('/proc/mounts', 'utf8').split('\n').some((line) => line.split(' ')[1] === mountpoint);
}

/** Removes a test's directory, detaching anything a failed test left mounted below it first. */
function cleanUp(work: string): void {
  for (const line of readFileSync('/proc/mounts', 'utf8').split('\n')) {
    const mountpoint = line.split(' ')[1];
    if (mountpoint?.startsWith(work + '/')) spawnSync('umount', ['-l', mountpoint]);
  }
  removeDir(work);
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Runs a shell command; resolves with its exit code and output. */
function sh(command: string): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn('sh', ['-c', command], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    child.on('close', (code) => resolve({ code, out })); // 'close': after stdout and stderr have ended, so `out` is whole
  });
}

async function waitFor(condition: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 50 && !condition(); i++) await new Promise((r) => setTimeout(r, 100));
  assert.ok(condition(), what);
}

/** getxattr(2) through Python (Debian's python3 is always there; getfattr is not). */
function getxattr(path: string, name: string): string {
  return python('sys.stdout.write(os.getxattr(sys.argv[1], sys.argv[2]).decode())', path, name);
}

function listxattr(path: string): string[] {
  return JSON.parse(python('sys.stdout.write(json.dumps(os.listxattr(sys.argv[1], follow_symlinks=False)))', path)) as string[];
}

function python(code: string, ...args: string[]): string {
  const run = spawnSync('/usr/bin/python3', ['-c', `import json, os, sys; ${code}`, ...args], { encoding: 'utf8' });
  if (run.status !== 0) throw new Error(run.stderr.trim().split('\n').pop());
  return run.stdout;
}

describe('nixcas mount: a tree of every kind of entry', () => {
  const work = tempDir('fuse');
  const store = join(work, 'store');
  const tree = join(work, 'tree');
  const mnt = join(work, 'mnt');
  let base = '';
  let other = '';
  let mounted: Daemon;

  before(async () => {
    makeTree(tree);
    base = importPath(store, tree);
    writeFileSync(join(work, 'lone-file'), 'a store path that is a file\n');
    other = importPath(store, join(work, 'lone-file'));
    mounted = await mount(store, mnt, '--list-root');
  });

  after(async () => {
    try {
      if (mounted) assert.equal(await mounted.stop(), 0, mounted.output());
      assert.ok(!isMounted(mnt), 'still mounted after SIGTERM');
    } finally {
      cleanUp(work);
    }
  });

  test('diff -r finds the mounted tree identical to the original', async () => {
    const diff = await sh(`diff -r --no-dereference '${tree}' '${mnt}/${base}'`);
    assert.equal(diff.code, 0, diff.out);
  });

  test('modes, sizes, owners, mtime and link counts follow the store rules', () => {
    const check = (relative: Buffer | string) => {
      const original = lstatSync(Buffer.concat([Buffer.from(tree + '/'), Buffer.from(relative)]));
      const seen = lstatSync(Buffer.concat([Buffer.from(`${mnt}/${base}/`), Buffer.from(relative)]));
      const what = Buffer.from(relative).toString('latin1');
      assert.equal(seen.uid, 0, what);
      assert.equal(seen.gid, 0, what);
      assert.equal(seen.mtimeMs, 1000, what);
      if (original.isSymbolicLink()) {
        assert.ok(seen.isSymbolicLink(), what);
        assert.equal(seen.mode & 0o777, 0o444, what);
      } else if (original.isDirectory()) {
        assert.ok(seen.isDirectory(), what);
        assert.equal(seen.mode & 0o777, 0o555, what);
        assert.equal(seen.nlink, original.nlink, `${what}: link count`);
      } else {
        assert.ok(seen.isFile(), what);
        assert.equal(seen.size, original.size, what);
        assert.equal(seen.blocks, Math.ceil(original.size / 512), what);
        assert.equal(seen.mode & 0o777, original.mode & 0o100 ? 0o555 : 0o444, what);
      }
    };
    for (const name of readdirSync(tree, { encoding: 'buffer' })) check(name);
    for (const name of ['bin/true', 'bin/hello', 'deep/level0', 'wide/entry-7']) check(name);
    assert.equal(lstatSync(`${mnt}/${base}/same-a`).mode & 0o777, 0o444);
    assert.equal(lstatSync(`${mnt}/${base}/same-x`).mode & 0o777, 0o555);
  });

  test('symlinks read back as they were, and resolve', () => {
    for (const link of ['relative-link', 'absolute-link', 'dangling-link', 'dir-link']) {
      assert.equal(readlinkSync(`${mnt}/${base}/${link}`), readlinkSync(`${tree}/${link}`));
    }
    assert.equal(readFileSync(`${mnt}/${base}/relative-link`, 'utf8'), 'plain text\n');
    assert.ok(statSync(`${mnt}/${base}/dir-link`).isDirectory());
  });

  test('programs run from the mount', () => {
    const binary = spawnSync(`${mnt}/${base}/bin/true`);
    assert.equal(binary.status, 0, String(binary.error));
    const script = spawnSync(`${mnt}/${base}/bin/hello`, { encoding: 'utf8' });
    assert.equal(script.stdout, 'hello from the store\n');
  });

  test('a non-UTF-8 name is listed and read back byte for byte', () => {
    const names = readdirSync(`${mnt}/${base}`, { encoding: 'buffer' });
    assert.ok(names.some((name) => name.equals(NON_UTF8)));
    const path = Buffer.concat([Buffer.from(`${mnt}/${base}/`), NON_UTF8]);
    assert.equal(readFileSync(path, 'utf8'), 'a name that is not UTF-8\n');
  });

  test(`a directory of ${WIDE_ENTRIES} entries lists completely`, () => {
    const names = readdirSync(`${mnt}/${base}/wide`);
    assert.equal(names.length, WIDE_ENTRIES);
    assert.equal(new Set(names).size, WIDE_ENTRIES);
    assert.equal(readFileSync(`${mnt}/${base}/wide/entry-9996`, 'utf8'), 'content 9996\n');
  });

  test('many processes read the big file at once', async () => {
    const expected = sha256(readFileSync(`${tree}/big`));
    const runs = await Promise.all(Array.from({ length: 6 }, () => sh(`sha256sum '${mnt}/${base}/big'`)));
    for (const run of runs) {
      assert.equal(run.code, 0, run.out);
      assert.equal(run.out.split(' ')[0], expected);
    }
  });

  test('reads at random offsets return the original bytes', () => {
    const original = readFileSync(`${tree}/big`);
    const fd = openSync(`${mnt}/${base}/big`, 'r');
    const random = seededRandom('reads at random offsets');
    try {
      for (let i = 0; i < 300; i++) {
        const position = random.int(0, BIG_BYTES + 100);
        const length = random.int(1, 300_001);
        const target = Buffer.alloc(length);
        const n = readSync(fd, target, 0, length, position);
        const want = original.subarray(position, position + length);
        assert.equal(n, want.length, `read at ${position}`);
        assert.ok(target.subarray(0, n).equals(want), `bytes at ${position}`);
      }
    } finally {
      closeSync(fd);
    }
  });

  test('digests as xattrs, in the b3: form', () => {
    const file = `${mnt}/${base}/plain.txt`;
    assert.equal(getxattr(file, 'user.tvix.castore.blob.digest'), formatDigest(blake3(readFileSync(file))));
    assert.match(getxattr(`${mnt}/${base}`, 'user.tvix.castore.directory.digest'), /^b3:[A-Za-z0-9+/]{43}=$/);
    assert.throws(() => getxattr(file, 'user.other'), /No data available/);
    assert.deepEqual(listxattr(file), ['user.tvix.castore.blob.digest']);
    assert.deepEqual(listxattr(`${mnt}/${base}/bin`), ['user.tvix.castore.directory.digest']);
    assert.deepEqual(listxattr(`${mnt}/${base}/relative-link`), []);
  });

  test('the root lists every store path with --list-root', () => {
    assert.deepEqual(readdirSync(mnt).sort(), [base, other].sort());
    assert.equal(readFileSync(`${mnt}/${other}`, 'utf8'), 'a store path that is a file\n');
  });

  test('a store path registered while mounted appears at once; unknown names do not exist', () => {
    writeFileSync(join(work, 'later'), 'registered after the mount\n');
    const later = importPath(store, join(work, 'later'));
    assert.equal(readFileSync(`${mnt}/${later}`, 'utf8'), 'registered after the mount\n');
    assert.throws(() => statSync(`${mnt}/00000000000000000000000000000000-nothing`), { code: 'ENOENT' });
    assert.throws(() => statSync(`${mnt}/not-a-store-path`), { code: 'ENOENT' });
  });

  test('the inode table shrinks when the kernel forgets', async () => {
    const inodes = () => Number(spawnSync('stat', ['-f', '-c', '%c', mnt], { encoding: 'utf8' }).stdout.trim());
    readdirSync(`${mnt}/${base}/wide`).forEach((name) => statSync(`${mnt}/${base}/wide/${name}`));
    assert.ok(inodes() > WIDE_ENTRIES, `after visiting: ${inodes()}`);
    // Make the kernel drop its dentries and inodes: it sends FORGETs for them.
    writeFileSync('/proc/sys/vm/drop_caches', '2');
    await waitFor(() => inodes() < WIDE_ENTRIES / 2, `inodes after drop_caches: ${inodes()}`);
  });

  test('writes are refused: the mount is read-only', () => {
    assert.throws(() => writeFileSync(`${mnt}/${base}/plain.txt`, 'x'), { code: 'EROFS' });
    assert.throws(() => mkdirSync(`${mnt}/new-dir`), { code: 'EROFS' });
  });
});

describe('nixcas mount: root listing off, faults, unmounting', () => {
  const work = tempDir('fuse-faults');
  const store = join(work, 'store');
  after(() => cleanUp(work));

  test('without --list-root the root cannot be listed but store paths can be looked up', async () => {
    writeFileSync(join(work, 'file'), 'looked up\n');
    const base = importPath(store, join(work, 'file'));
    const mnt = join(work, 'mnt-nolist');
    const mounted = await mount(store, mnt);
    try {
      assert.throws(() => readdirSync(mnt), { code: 'EPERM' });
      const opened = openSync(mnt, 'r'); // opening the root is fine (tar -C, openat), listing is not
      closeSync(opened);
      assert.equal(readFileSync(`${mnt}/${base}`, 'utf8'), 'looked up\n');
    } finally {
      assert.equal(await mounted.stop('SIGINT'), 0);
    }
    assert.ok(!isMounted(mnt));
  });

  test('a missing blob or directory gives EIO for that entry only', async () => {
    const tree = join(work, 'broken');
    mkdirSync(join(tree, 'gone-dir'), { recursive: true });
    mkdirSync(join(tree, 'kept-dir'));
    writeFileSync(join(tree, 'gone-dir/inside'), 'unreachable\n');
    writeFileSync(join(tree, 'kept-dir/inside'), 'still here\n');
    const lost = randomBytes(200_000); // above the small-blob limit: a blob file
    writeFileSync(join(tree, 'lost'), lost);
    writeFileSync(join(tree, 'kept'), randomBytes(200_000));
    const base = importPath(store, tree);
    // Take the blob file and the directory away behind the store's back.
    const blobHex = Buffer.from(blake3(lost)).toString('hex');
    rmSync(join(store, 'blobs', blobHex.slice(0, 2), blobHex));
    const { db, release } = LocalStore.metadataDb<Buffer>(store, 'directories', { encoding: 'binary' });
    const keys = [...db.getKeys()] as Buffer[];
    // The directory holding only "inside" -> "unreachable\n" is the one to remove.
    const { decodeDirectory } = await import('../src/castore/wire.js');
    for (const key of keys) {
      const directory = decodeDirectory(db.get(key) as Buffer);
      if (directory.files.length === 1 && directory.files[0].digest.equals(blake3(Buffer.from('unreachable\n')))) await db.remove(key);
    }
    await release();

    const mnt = join(work, 'mnt-broken');
    const mounted = await mount(store, mnt);
    try {
      assert.throws(() => readFileSync(`${mnt}/${base}/lost`), { code: 'EIO' });
      assert.throws(() => readdirSync(`${mnt}/${base}/gone-dir`), { code: 'EIO' });
      assert.equal(readFileSync(`${mnt}/${base}/kept`).length, 200_000);
      assert.equal(readFileSync(`${mnt}/${base}/kept-dir/inside`, 'utf8'), 'still here\n');
      assert.throws(() => readFileSync(`${mnt}/${base}/lost`), { code: 'EIO' }); // still serving, still EIO
      await waitFor(() => /the blob is missing from the store/.test(mounted.output()), 'the log names the missing blob');
    } finally {
      assert.equal(await mounted.stop(), 0);
    }
  });

  test('a backing gRPC store that goes away and comes back: EIO meanwhile, then reads work without remounting', async () => {
    const tree = join(work, 'remote');
    mkdirSync(tree);
    for (let i = 0; i < 3; i++) writeFileSync(join(tree, `file${i}`), `remote file ${i}\n`.repeat(10_000));
    const base = importPath(store, tree);
    const socket = join(work, 'daemon.sock');
    let daemon = await startDaemon(['--store', store, '--listen', socket]);
    const mnt = join(work, 'mnt-remote');
    const mounted = await mount(store, mnt, '--blob-service-addr', `grpc+unix://${socket}`);
    try {
      assert.equal(readFileSync(`${mnt}/${base}/file0`, 'utf8'), 'remote file 0\n'.repeat(10_000));
      await daemon.stop();
      assert.throws(() => readFileSync(`${mnt}/${base}/file1`), { code: 'EIO' });
      daemon = await startDaemon(['--store', store, '--listen', socket]);
      let content: string | undefined;
      for (let attempt = 0; attempt < 40 && content === undefined; attempt++) {
        try {
          content = readFileSync(`${mnt}/${base}/file1`, 'utf8');
        } catch (err) {
          assert.equal((err as NodeJS.ErrnoException).code, 'EIO');
          await new Promise((r) => setTimeout(r, 500));
        }
      }
      assert.equal(content, 'remote file 1\n'.repeat(10_000));
    } finally {
      await mounted.stop();
      await daemon.stop();
    }
  });

  test('unmounting while reads are in flight: the mount goes, the process exits cleanly', async () => {
    const tree = join(work, 'busy');
    mkdirSync(tree);
    writeFileSync(join(tree, 'data'), randomBytes(32 * 1024 * 1024));
    const base = importPath(store, tree);
    const mnt = join(work, 'mnt-busy');
    const mounted = await mount(store, mnt);
    const readers = Array.from({ length: 4 }, () => sh(`for i in 1 2 3; do cat '${mnt}/${base}/data' > /dev/null; done`));
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(await mounted.stop('SIGTERM'), 0, mounted.output());
    assert.ok(!isMounted(mnt));
    await Promise.all(readers); // they finish one way or the other; nothing hangs
  });

  test('`umount` from outside ends nixcas mount with exit 0', async () => {
    writeFileSync(join(work, 'u'), 'u\n');
    importPath(store, join(work, 'u'));
    const mnt = join(work, 'mnt-umount');
    const mounted = await mount(store, mnt);
    const umount = spawnSync('umount', [mnt], { encoding: 'utf8' });
    assert.equal(umount.status, 0, umount.stderr);
    assert.equal(await mounted.stop('SIGCONT'), 0, mounted.output()); // exits by itself; SIGCONT only waits
    assert.match(mounted.output(), /unmounted/);
  });

  test('as an ordinary user, through fusermount3', async () => {
    // fusermount3 opens /dev/fuse as the calling user: most distributions make it 0666.
    const devMode = statSync('/dev/fuse').mode & 0o777;
    const user = join(work, 'user');
    mkdirSync(user);
    chmodSync(work, 0o755);
    writeFileSync(join(user, 'f'), 'mounted by nobody\n');
    const base = importPath(join(user, 'store'), join(user, 'f'));
    mkdirSync(join(user, 'mnt'));
    spawnSync('chown', ['-R', 'nobody:nogroup', user]);
    chmodSync('/dev/fuse', 0o666);
    const asNobody = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'];
    let mounted: Daemon | undefined;
    try {
      mounted = await startNixcas(['mount', '--store', join(user, 'store'), join(user, 'mnt')], 'mounted at', { HOME: user }, asNobody);
      const mountLine = readFileSync('/proc/mounts', 'utf8').split('\n').find((line) => line.split(' ')[1] === join(user, 'mnt'));
      assert.match(mountLine ?? '', /fuse\.nixcas ro,nosuid,nodev.*user_id=65534/);
      const read = spawnSync(asNobody[0], [...asNobody.slice(1), 'cat', join(user, 'mnt', base)], { encoding: 'utf8' });
      assert.equal(read.stdout, 'mounted by nobody\n', read.stderr);
    } finally {
      chmodSync('/dev/fuse', devMode);
      if (mounted) assert.equal(await mounted.stop(), 0, mounted.output());
    }
    assert.ok(!isMounted(join(user, 'mnt')));
  });

  test('clear errors: a missing mountpoint, a file as mountpoint, a mountpoint with a nixcas mount on it', async () => {
    const missing = nixcas(['mount', '--store', store, join(work, 'no-such-dir')]);
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /does not exist; create the directory first/);
    writeFileSync(join(work, 'a-file'), '');
    const file = nixcas(['mount', '--store', store, join(work, 'a-file')]);
    assert.equal(file.status, 1);
    assert.match(file.stderr, /is not a directory/);
    assert.ok(existsSync(join(work, 'a-file')));
    // A second mount on a mounted directory is refused, not stacked on the first.
    const mnt = join(work, 'mnt-twice');
    const first = await mount(store, mnt);
    try {
      const stacked = nixcas(['mount', '--store', store, mnt]);
      assert.equal(stacked.status, 1);
      assert.match(stacked.stderr, new RegExp(`${mnt} is already a FUSE mount \\(fuse[.a-z]*\\), another nixcas mount perhaps: unmount it first`));
      assert.equal(readFileSync('/proc/mounts', 'utf8').split('\n').filter((line) => line.split(' ')[1] === mnt).length, 1);
    } finally {
      assert.equal(await first.stop(), 0);
    }
  });
});

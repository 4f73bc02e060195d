// One contract, every backend: memory, the local store, and the gRPC clients
// talking to a real `nixcas daemon` process through both package names.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { type BlobService, getBlob, putBlob } from '../src/castore/blobservice.js';
import { blake3, digestKey } from '../src/castore/digest.js';
import { type DirectoryService, directoryDigest } from '../src/castore/directoryservice.js';
import { AlreadyExistsError, InvalidInputError } from '../src/castore/errors.js';
import { type Directory, directorySize } from '../src/castore/model.js';
import { openBlobService, openDirectoryService, openPathInfoService } from '../src/services/addresses.js';
import { GrpcPathInfoService } from '../src/grpc/store-client.js';
import { importPath } from '../src/store/import.js';
import { calculateNar } from '../src/store/nar/render.js';
import type { PathInfo } from '../src/store/pathinfo.js';
import type { PathInfoService } from '../src/store/pathinfoservice.js';
import { makeSourcePath, formatBasename } from '../src/store/storepath.js';
import { mkdirSync, writeFileSync } from 'node:fs';
import { type Daemon, removeDir, startDaemon, tempDir } from './helpers.js';

const work = tempDir('services');
let daemon: Daemon;
before(async () => {
  daemon = await startDaemon(['--store', join(work, 'daemon-store'), '--listen', join(work, 'd.sock')]);
});
after(async () => {
  await daemon.stop();
  removeDir(work);
});

const backends: [string, () => string][] = [
  ['memory', () => 'memory://'],
  ['local', () => `local://${join(work, 'local-store')}`],
  ['grpc (tvix.castore.v1)', () => `grpc+unix://${join(work, 'd.sock')}`],
  ['grpc (snix.castore.v1)', () => `grpc+unix://${join(work, 'd.sock')}?package=snix`],
];

const bytes = (s: string) => Buffer.from(s);

for (const [name, url] of backends) {
  describe(`${name} backend`, () => {
    let blobs: BlobService;
    let directories: DirectoryService;
    let pathInfos: PathInfoService;
    before(async () => {
      blobs = await openBlobService(url());
      directories = await openDirectoryService(url());
      pathInfos = await openPathInfoService(url());
    });
    after(async () => {
      await blobs.close();
      await directories.close();
      await pathInfos.close();
    });

    test('path infos: put after the tree, get, list, NAR calculation; invalid ones refused', async () => {
      const tree = join(work, `tree-${name.replace(/\W+/g, '-')}`);
      mkdirSync(join(tree, 'sub'), { recursive: true });
      writeFileSync(join(tree, 'sub/file'), `content for ${name}`);
      const { storePath, info } = await importPath(tree, { blobs, directories, pathInfos });
      const fetched = (await pathInfos.get(storePath.digest))!;
      assert.deepEqual(fetched, info);
      const listed: PathInfo[] = [];
      for await (const one of pathInfos.list()) listed.push(one);
      assert.ok(listed.some((one) => one.node.node.name.equals(info.node.node.name)));
      assert.equal(await pathInfos.get(Buffer.alloc(20, 9)), undefined);
      const nar = await calculateNar(info.node, { blobs, directories });
      assert.equal(nar.size, info.narSize);
      assert.deepEqual(nar.sha256, info.narSha256);
      if (pathInfos instanceof GrpcPathInfoService) {
        assert.deepEqual(await pathInfos.calculateNar({ ...info.node, node: { ...info.node.node, name: Buffer.alloc(0) } } as PathInfo['node']), nar);
      }

      // A registered path does not change: the same again only adds signatures, anything else is refused.
      const signed: PathInfo = { ...info, signatures: [...info.signatures, { name: 'test-1', data: Buffer.alloc(64, 1) }] };
      assert.deepEqual(await pathInfos.put(signed), signed, 'a new signature is added');
      assert.deepEqual(await pathInfos.put(info), signed, 'the same again keeps the signatures it has');
      assert.deepEqual((await pathInfos.get(storePath.digest))!.signatures, signed.signatures);
      for (const [what, other] of [
        ['References', { ...info, references: [storePath] }],
        ['Deriver', { ...info, deriver: { digest: Buffer.alloc(20, 3), name: 'other' } }],
      ] as [string, PathInfo][]) {
        await assert.rejects(pathInfos.put(other), (err: Error) => err instanceof AlreadyExistsError && err.message.includes(what), `another ${what} is refused`);
      }
      // Another NAR: refused as a change, or (over gRPC, which renders the tree first) as a NAR that is not the tree's.
      await assert.rejects(
        pathInfos.put({ ...info, narSize: info.narSize + 1 }),
        (err: Error) => (err instanceof AlreadyExistsError && err.message.includes('NAR')) || (err instanceof InvalidInputError && err.message.includes('NarSize')),
        'another NAR is refused',
      );
      assert.deepEqual(await pathInfos.get(storePath.digest), signed, 'and nothing changed');

      const invalid: [string, PathInfo][] = [
        ['NAR SHA-256 is 31 bytes', { ...info, narSha256: Buffer.alloc(31) }],
        ['not a store path basename', { ...info, node: { kind: 'symlink', node: { name: Buffer.from('no-hash'), target: Buffer.from('x') } } }],
        ['signature by "k" is 10 bytes', { ...info, signatures: [{ name: 'k', data: Buffer.alloc(10) }] }],
        ['reference #0 is 19 bytes', { ...info, references: [{ digest: Buffer.alloc(19), name: 'x' }] }],
      ];
      for (const [problem, bad] of invalid) {
        await assert.rejects(pathInfos.put(bad), (err: Error) => err instanceof InvalidInputError && err.message.includes(problem), problem);
      }
      if (name.startsWith('grpc')) {
        // The daemon refuses a PathInfo whose tree it does not have.
        const ghost = makeSourcePath(Buffer.alloc(32, 3), 'ghost');
        const orphan: PathInfo = { ...info, node: { kind: 'directory', node: { name: Buffer.from(formatBasename(ghost)), digest: blake3(bytes('ghost')), size: 1 } } };
        await assert.rejects(pathInfos.put(orphan), /is not in the store: upload its tree before its PathInfo/);
        assert.equal(await pathInfos.get(ghost.digest), undefined);
      }
    });

    test('blobs: put, stat, stream, random access, absent', async () => {
      const data = randomBytes(2.5 * 1024 * 1024);
      const digest = await putBlob(blobs, data);
      assert.deepEqual(digest, blake3(data));
      assert.equal(await blobs.has(digest), true);
      assert.deepEqual(await blobs.stat(digest), { size: data.length });
      assert.deepEqual(await getBlob(blobs, digest), data);
      const reader = (await blobs.openReader(digest))!;
      const target = Buffer.alloc(4096);
      for (const position of [2_000_000, 17, 1_048_570, data.length - 100]) {
        const n = await reader.read(target, 0, 4096, position);
        assert.ok(n > 0);
        assert.deepEqual(target.subarray(0, n), data.subarray(position, position + n), `read at ${position}`);
      }
      assert.equal(await reader.read(target, 0, 10, data.length), 0);
      await reader.close();
      const absent = blake3(bytes(`absent ${name}`));
      assert.equal(await blobs.has(absent), false);
      assert.equal(await blobs.stat(absent), undefined);
      assert.equal(await blobs.openReader(absent), undefined);
      assert.equal(await blobs.readStream(absent), undefined);
      assert.deepEqual(await getBlob(blobs, await putBlob(blobs, Buffer.alloc(0))), Buffer.alloc(0));
    });

    test('blobs: an aborted writer stores nothing', async () => {
      const data = bytes(`aborted upload for ${name}`);
      const writer = blobs.openWriter();
      await writer.write(data);
      await writer.abort();
      // Give a remote end the moment it needs to see the cancellation.
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(await blobs.has(blake3(data)), false);
    });

    test('directories: put a tree, get, get recursive breadth-first once each', async () => {
      const blob = await putBlob(blobs, bytes('content'));
      const leaf: Directory = {
        directories: [],
        files: [{ name: Buffer.from([0xc3, 0x28]), digest: blob, size: 7, executable: true }],
        symlinks: [{ name: bytes('up'), target: bytes('..') }],
      };
      const mid: Directory = { directories: [{ name: bytes('leaf'), digest: directoryDigest(leaf), size: directorySize(leaf) }], files: [], symlinks: [] };
      const root: Directory = {
        directories: [
          { name: bytes('a'), digest: directoryDigest(mid), size: directorySize(mid) },
          { name: bytes('b'), digest: directoryDigest(leaf), size: directorySize(leaf) },
        ],
        files: [],
        symlinks: [],
      };
      const rootDigest = await directories.put([leaf, mid, root]);
      assert.deepEqual(rootDigest, directoryDigest(root));
      assert.deepEqual(await directories.get(rootDigest), root);
      const all: Directory[] = [];
      for await (const d of directories.getRecursive(rootDigest)) all.push(d);
      assert.deepEqual(all.map((d) => digestKey(directoryDigest(d))), [root, mid, leaf].map((d) => digestKey(directoryDigest(d))));
      assert.equal(await directories.get(blake3(bytes('no such directory'))), undefined);
      // A later batch may reference what is already stored.
      const extension: Directory = { directories: [{ name: bytes('old'), digest: rootDigest, size: directorySize(root) }], files: [], symlinks: [] };
      assert.deepEqual(await directories.put([extension]), directoryDigest(extension));
    });

    test('directories: an invalid batch stores nothing', async () => {
      const good: Directory = { directories: [], files: [], symlinks: [{ name: bytes(`good-${name}`), target: bytes('x') }] };
      const bad: Directory = { directories: [], files: [], symlinks: [{ name: bytes('a/b'), target: bytes('x') }] };
      await assert.rejects(directories.put([good, bad]), (err: Error) => err instanceof InvalidInputError && /name contains '\/'/.test(err.message));
      assert.equal(await directories.get(directoryDigest(good)), undefined);
    });
  });
}

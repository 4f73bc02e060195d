// The local store's large blobs: written through reused aligned slabs, with
// O_DIRECT past the first 8 MiB. Checked against the kernel: the files' bytes
// and sizes as read back, and what the page cache holds (fincore).
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { type BigIntStats, appendFileSync, mkdirSync, readFileSync, readdirSync, statSync, statfsSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { BlobService } from '../src/castore/blobservice.js';
import { blake3, digestKey } from '../src/castore/digest.js';
import { LENT_SLAB_SIZE, lentSlabs } from '../src/castore/lent-slabs.js';
import { type TreeObserver, importTree } from '../src/castore/import.js';
import { openBlobService, openDirectoryService } from '../src/services/addresses.js';
import { BLOB_FILE_RECORD_LENGTH, BLOB_FILE_RECORD_VERSION, blobFileRecord } from '../src/castore/backends/blob-file-record.js';
import { removeDir, tempDir } from './helpers.js';

const MiB = 1024 * 1024;
const work = tempDir('blob-files');
const store = join(work, 'store');
let blobs: BlobService;
before(async () => {
  blobs = await openBlobService(`local://${store}`);
});
after(async () => {
  await blobs.close();
  removeDir(work);
});

function blobFile(digest: Buffer): string {
  const hex = digestKey(digest);
  return join(store, 'blobs', hex.slice(0, 2), hex);
}

/** Writes `data` in pieces of the given sizes, in turn. */
async function writeInPieces(data: Buffer, pieces: number[]): Promise<Buffer> {
  const writer = blobs.openWriter();
  for (let at = 0, i = 0; at < data.length; i++) {
    const piece = data.subarray(at, at + pieces[i % pieces.length]!);
    await writer.write(piece);
    at += piece.length;
  }
  return writer.close();
}

test('blob files of every size around the slab and direct-I/O boundaries hold exactly their bytes', async () => {
  const sizes = [
    64 * 1024 + 1, // just past LMDB's limit
    256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, // the first slab
    8 * MiB - 1, 8 * MiB, 8 * MiB + 1, // where O_DIRECT starts
    8 * MiB + 4 * MiB + 4096, // ends on a sector, not a slab
    20 * MiB + 12345, // a padded last write, truncated back
  ];
  // Odd pieces (as a NAR or the network hands them over) and pieces larger than a slab.
  const pieceSizes = [[7777], [MiB], [5 * MiB + 3, 100]];
  for (const size of sizes) {
    for (const pieces of pieceSizes) {
      const data = randomBytes(size);
      const digest = await writeInPieces(data, pieces);
      assert.deepEqual(digest, blake3(data), `digest of ${size} bytes in pieces of ${pieces}`);
      const file = blobFile(digest);
      assert.equal(statSync(file).size, size, `${file}: size`);
      assert.ok(readFileSync(file).equals(data), `${file}: ${size} bytes in pieces of ${pieces} read back differently`);
    }
  }
  assert.deepEqual(readdirSync(join(store, 'tmp')), [], 'no temp file is left behind');
});

test('blobs written at once do not share slabs', async () => {
  const datas = [randomBytes(9 * MiB + 1), randomBytes(10 * MiB + 7), randomBytes(300 * 1024)];
  const writers = datas.map(() => blobs.openWriter());
  // Interleave the writes, so each writer takes slabs while the others hold theirs.
  for (let at = 0; at < 10 * MiB + 7; at += 999_999) {
    await Promise.all(writers.map((writer, i) => (at < datas[i]!.length ? writer.write(datas[i]!.subarray(at, at + 999_999)) : undefined)));
  }
  const digests = await Promise.all(writers.map((writer) => writer.close()));
  datas.forEach((data, i) => assert.ok(readFileSync(blobFile(digests[i]!)).equals(data), `blob ${i}`));
});

test('a large blob reaches the disk around the page cache, past its first 8 MiB', async (t) => {
  if (statfsSync(store).type === 0x01021994) return t.skip('the store is on tmpfs, which is all page cache');
  const data = randomBytes(48 * MiB);
  const file = blobFile(await writeInPieces(data, [MiB]));
  const cached = Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' }).trim());
  // Buffered, the whole 48 MiB would stay cached after the fsync; direct, only the first 8 MiB is.
  assert.ok(cached <= 12 * MiB, `${cached} bytes of a 48 MiB blob are in the page cache`);
  assert.ok(readFileSync(file).equals(data));
});

test('an aborted or failed large blob leaves no file behind and the next one is whole', async () => {
  const writer = blobs.openWriter();
  await writer.write(randomBytes(12 * MiB));
  await writer.abort();
  assert.deepEqual(readdirSync(join(store, 'tmp')), []);
  await assert.rejects(writer.write(randomBytes(10)), /aborted/);

  const data = randomBytes(13 * MiB + 5);
  assert.ok(readFileSync(blobFile(await writeInPieces(data, [3 * MiB]))).equals(data));
});

test('chunks in lent slabs are written from where they lie, and no slab is reused before its bytes are written', async () => {
  // Aligned whole slabs (written in place), views at an odd offset (copied), and a tail that is not a whole sector.
  const layouts = [{ offset: 0, size: 21 * MiB + 4097 }, { offset: 3, size: 10 * MiB + 1 }, { offset: 4096, size: 9 * MiB }];
  for (const { offset, size } of layouts) {
    const data = randomBytes(size);
    const writer = blobs.openWriter();
    for (let at = 0; at < size; ) {
      const slab = lentSlabs.take();
      const chunk = slab.bytes.subarray(offset, offset + Math.min(LENT_SLAB_SIZE - offset, size - at));
      data.copy(chunk, 0, at);
      await writer.write(chunk);
      at += chunk.length;
      slab.release();
      // The pool hands out the slab given back last: were the writer's write still reading a slab
      // it did not hold, this would change the bytes under it.
      const next = lentSlabs.take();
      next.bytes.fill(0xee);
      next.release();
    }
    const file = blobFile(await writer.close());
    assert.ok(readFileSync(file).equals(data), `${size} bytes from lent slabs at offset ${offset} read back differently`);
  }
});

test('a large file that shrinks or grows while it is imported fails the import, names the file, and leaves nothing behind', async () => {
  const directories = await openDirectoryService(`local://${store}`);
  try {
    const tree = join(work, 'changing');
    mkdirSync(tree, { recursive: true });
    const file = join(tree, 'big.bin');
    /** Runs `change` on the file once its first chunk has been read (the walk has its size by then). */
    const changingOnce = (change: () => void): TreeObserver => {
      let changed = false;
      const ignore = () => {};
      return {
        directoryStart: ignore, entryStart: ignore, entryEnd: ignore, directoryEnd: ignore, fileStart: ignore, fileEnd: ignore, symlink: ignore,
        fileData: () => {
          if (!changed) change();
          changed = true;
        },
      };
    };
    const cases = [
      { change: () => truncateSync(file, 5 * MiB), error: /big\.bin: shrank while being imported/ },
      { change: () => appendFileSync(file, 'more'), error: /big\.bin: changed while being imported/ },
    ];
    for (const { change, error } of cases) {
      writeFileSync(file, randomBytes(20 * MiB));
      await assert.rejects(importTree(tree, Buffer.from('changing'), { blobs, directories }, { observer: changingOnce(change) }), error);
      assert.deepEqual(readdirSync(join(store, 'tmp')), [], 'no temp file is left behind');
    }
    // The slabs the failed imports had are back in use, whole: the next import of the same file is right.
    const data = randomBytes(20 * MiB + 3);
    writeFileSync(file, data);
    const root = await importTree(tree, Buffer.from('changing'), { blobs, directories });
    assert.equal(root.kind, 'directory');
    const [entry] = (await directories.get(root.node.digest))!.files;
    assert.ok(readFileSync(blobFile(entry!.digest)).equals(data));
  } finally {
    await directories.close();
  }
});

test('the blob-files record has its versioned layout (golden bytes), as local-nar.c reads it', () => {
  const stats = { ino: 0x0102030405060708n, size: 200_000n, mtimeNs: 1_700_000_000_123_456_789n, ctimeNs: 1_700_000_001_000_000_001n } as BigIntStats;
  assert.equal(
    blobFileRecord(stats).toString('hex'),
    '0100000000000000' + '0807060504030201' + '400d030000000000' + '15cd853dfe9c9717' + '01cac471fe9c9717',
  );
  assert.equal(BLOB_FILE_RECORD_LENGTH, 40);
  const source = readFileSync(join(import.meta.dirname, '..', 'src/store/nar/native/local-nar.c'), 'utf8');
  assert.match(source, new RegExp(`#define BLOB_FILE_RECORD_VERSION ${BLOB_FILE_RECORD_VERSION}\\b`));
  assert.match(source, new RegExp(`#define BLOB_FILE_RECORD_LENGTH ${BLOB_FILE_RECORD_LENGTH}\\b`));
});

// The native NAR ingest (store/nar/native/nar-ingest.c) against the
// TypeScript reader it must match: the same trees from the same NARs split at
// every byte, the same refusals, nothing left in the store's tmp/ either way,
// and zstd bodies as the zstd program writes them.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { LocalStore } from '../src/castore/backends/local.js';
import { DecompressionError } from '../src/store/nar/decompress.js';
import { NarEncoder } from '../src/store/nar/encoder.js';
import { NarFormatError, ingestNar } from '../src/store/nar/ingest.js';
import { type FileAdoptingBlobService, ingestNarNatively, nativeIngestTarget } from '../src/store/nar/native-ingest.js';
import { renderNar } from '../src/store/nar/render.js';
import { narIngestAddon } from '../src/native/ingest.js';
import { malformedNars, nar, narString, sampleNar } from './nar-samples.js';
import { removeDir, seededBytes, tempDir } from './helpers.js';

const addon = narIngestAddon();

function openStore(dir: string) {
  const blobs = LocalStore.blobService(dir, { create: true });
  const directories = LocalStore.directoryService(dir, { create: true });
  const target = nativeIngestTarget(blobs);
  assert.ok(target, 'the local blob service takes files from the native ingest');
  return { blobs: target as FileAdoptingBlobService, directories, close: async () => { await blobs.close(); await directories.close(); } };
}

/** A NAR with files on both sides of the 64 KiB limit, executables, a symlink and nested directories. */
function richNar(): Buffer {
  const chunks: Buffer[] = [];
  const e = new NarEncoder((c) => chunks.push(Buffer.from(c)));
  e.directoryStart();
  const sizes = [0, 1, 7, 8, 65535, 65536, 65537, 200_003];
  sizes.forEach((size, i) => {
    e.entryStart(Buffer.from(`f${i}`));
    e.fileStart(i % 2 === 1, size);
    e.fileData(seededBytes(size, 70 + i));
    e.fileEnd();
    e.entryEnd();
  });
  e.entryStart(Buffer.from('link'));
  e.symlink(Buffer.from('f0'));
  e.entryEnd();
  e.entryStart(Buffer.from('sub'));
  e.directoryStart();
  e.entryStart(Buffer.from('deep'));
  e.directoryStart();
  e.directoryEnd();
  e.entryEnd();
  e.entryStart(Buffer.from('x'));
  e.fileStart(false, 3);
  e.fileData(Buffer.from('xyz'));
  e.fileEnd();
  e.entryEnd();
  e.directoryEnd();
  e.entryEnd();
  e.directoryEnd();
  e.flush();
  return Buffer.concat(chunks);
}

function pieces(bytes: Buffer, size: number): Buffer[] {
  return Array.from({ length: Math.ceil(bytes.length / size) }, (_, i) => bytes.subarray(i * size, (i + 1) * size));
}

/** One byte at a time over the first and last `edge` bytes (where the tokens are), `size` bytes at a time between. */
function bytewiseAtEdges(bytes: Buffer, edge: number, size: number): Buffer[] {
  if (bytes.length <= 2 * edge) return pieces(bytes, 1);
  return [...pieces(bytes.subarray(0, edge), 1), ...pieces(bytes.subarray(edge, bytes.length - edge), size), ...pieces(bytes.subarray(bytes.length - edge), 1)];
}

async function* yielded(chunks: Buffer[]): AsyncGenerator<Buffer> {
  yield* chunks;
}

async function rendered(root: Parameters<typeof renderNar>[0], services: Parameters<typeof renderNar>[1]): Promise<Buffer> {
  const out: Buffer[] = [];
  for await (const chunk of renderNar(root, services)) out.push(Buffer.from(chunk));
  return Buffer.concat(out);
}

const tooLarge = () => new Error('too large');

test('native ingest: the same tree as the TypeScript reader, whatever the chunks and batches; sums right; tmp/ left empty', { skip: !addon && 'the nixcas_ingest addon is not built (libzstd-dev)' }, async () => {
  const dir = tempDir('native-ingest');
  try {
    const store = openStore(dir);
    const bytes = richNar();
    const reference = await ingestNar([bytes], store);
    // One byte per batch where the tokens are (the first files, the symlink and the nested
    // directory at the end), and the whole NAR in pieces of several sizes, each its own batch or gathered.
    const splits: [string, Buffer[], number][] = [
      ['one byte per batch at both ends', bytewiseAtEdges(bytes, 2000, 4099), 1],
      ['7 bytes per batch at both ends', bytewiseAtEdges(bytes, 20000, 7), 1],
      ['1000 bytes per batch', pieces(bytes, 1000), 1],
      ['4 KiB chunks, 64 KiB batches', pieces(bytes, 4096), 65536],
      ['whole', [bytes], 1 << 20],
    ];
    for (const [what, chunks, batchBytes] of splits) {
      const got = await ingestNarNatively(yielded(chunks), { compression: 'none', hashFile: true, narSizeMax: bytes.length, tooLarge, batchBytes, ...store });
      assert.deepEqual(got.root, reference.root, what);
      assert.equal(got.narSize, bytes.length, what);
      assert.ok(got.narSha256.equals(createHash('sha256').update(bytes).digest()), `${what}: NarHash`);
      assert.ok(got.fileSha256!.equals(got.narSha256), `${what}: an uncompressed body's FileHash is its NarHash`);
      assert.ok((await rendered(got.root, store)).equals(bytes), `${what}: renders back`);
      assert.deepEqual(readdirSync(join(dir, 'tmp')), [], `${what}: tmp/ is empty`);
    }
    await store.close();
  } finally {
    removeDir(dir);
  }
});

test('native ingest: malformed NARs are refused with the TypeScript reader\'s errors, nothing stored, temp files of finished large files removed', { skip: !addon && 'the nixcas_ingest addon is not built' }, async () => {
  const dir = tempDir('native-ingest-bad');
  try {
    const store = openStore(dir);
    const large = seededBytes(100_000, 5);
    // A large file written whole, then an error in the same batch, and in a later one.
    const afterLarge = nar('nix-archive-1', '(', 'type', 'directory', 'entry', '(', 'name', 'a', 'node', '(', 'type', 'regular', 'contents', narString(large), ')', ')', 'entry', '(', 'name', 'a', 'node');
    const cases: [string, Buffer, RegExp][] = [...malformedNars(), ['a duplicate after a large file', afterLarge, /entry "a" appears twice/]];
    for (const [what, bytes, why] of cases) {
      for (const batchBytes of [1 << 20, 4096]) {
        let puts = 0;
        const put = store.directories.put.bind(store.directories);
        store.directories.put = (batch) => {
          puts++;
          return put(batch);
        };
        await assert.rejects(
          ingestNarNatively(yielded(pieces(bytes, 4096)), { compression: 'none', hashFile: false, narSizeMax: 1 << 30, tooLarge, batchBytes, ...store }),
          (err: Error) => err instanceof NarFormatError && why.test(err.message),
          `${what}, batches of ${batchBytes}: ${why}`,
        );
        store.directories.put = put;
        assert.equal(puts, 0, `${what}: no directory stored`);
        assert.deepEqual(readdirSync(join(dir, 'tmp')), [], `${what}, batches of ${batchBytes}: tmp/ is empty`);
      }
    }
    // Cut inside a large file: its temp file goes when the ingest does.
    const cut = afterLarge.subarray(0, 200 + 50_000);
    await assert.rejects(ingestNarNatively(yielded([cut]), { compression: 'none', hashFile: false, narSizeMax: 1 << 30, tooLarge, ...store }), /NAR is truncated: it ends at byte \d+ inside file contents/);
    assert.deepEqual(readdirSync(join(dir, 'tmp')), []);
    // More than NarSize.
    await assert.rejects(ingestNarNatively(yielded([sampleNar()]), { compression: 'none', hashFile: false, narSizeMax: 100, tooLarge, ...store }), /too large/);
    await store.close();
  } finally {
    removeDir(dir);
  }
});

test('native ingest: zstd bodies from the zstd program, in one frame or two; corrupt and cut bodies refused', { skip: !addon && 'the nixcas_ingest addon is not built' }, async () => {
  const dir = tempDir('native-ingest-zstd');
  try {
    const store = openStore(dir);
    const bytes = richNar();
    const zstd = (data: Buffer) => {
      const result = spawnSync('zstd', ['-c', '-q', '-3'], { input: data, maxBuffer: 1 << 26 });
      assert.equal(result.status, 0, `zstd -c: ${result.stderr}`);
      return result.stdout;
    };
    const reference = await ingestNar([bytes], store);
    const oneFrame = zstd(bytes);
    const twoFrames = Buffer.concat([zstd(bytes.subarray(0, 70_001)), zstd(bytes.subarray(70_001))]);
    for (const [what, body] of [['one frame', oneFrame], ['two frames', twoFrames]] as const) {
      for (const [size, chunks] of [[1, bytewiseAtEdges(body, 3000, 8191)], [1000, pieces(body, 1000)], [1 << 20, [body]]] as const) {
        const got = await ingestNarNatively(yielded([...chunks]), { compression: 'zstd', hashFile: true, narSizeMax: bytes.length, tooLarge, batchBytes: size, ...store });
        assert.deepEqual(got.root, reference.root, `${what}, pieces of ${size}`);
        assert.ok(got.narSha256.equals(createHash('sha256').update(bytes).digest()), `${what}: NarHash`);
        assert.ok(got.fileSha256!.equals(createHash('sha256').update(body).digest()), `${what}: FileHash`);
        assert.equal(got.fileSize, body.length);
      }
    }
    const corrupt = Buffer.from(oneFrame);
    corrupt[Math.floor(corrupt.length / 2)]! ^= 0xff;
    corrupt[corrupt.length - 6]! ^= 0xff;
    await assert.rejects(ingestNarNatively(yielded([corrupt]), { compression: 'zstd', hashFile: true, narSizeMax: 1 << 30, tooLarge, ...store }), (err: Error) => err instanceof DecompressionError || err instanceof NarFormatError);
    await assert.rejects(ingestNarNatively(yielded([oneFrame.subarray(0, oneFrame.length - 3)]), { compression: 'zstd', hashFile: true, narSizeMax: 1 << 30, tooLarge, ...store }), (err: Error) => err instanceof DecompressionError && /ends inside a frame/.test(err.message) || err instanceof NarFormatError && /truncated/.test(err.message));
    assert.deepEqual(readdirSync(join(dir, 'tmp')), []);
    await store.close();
  } finally {
    removeDir(dir);
  }
});

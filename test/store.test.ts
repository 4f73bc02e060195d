// The Nix layer's building blocks: nixbase32, store paths, the NAR reader's
// refusals, closure parsing. (Agreement with real Nix is in nix.test.ts.)
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { LocalStore } from '../src/castore/backends/local.js';
import { LentSlabPool } from '../src/castore/lent-slabs.js';
import { MemoryBlobService, MemoryDirectoryService } from '../src/castore/backends/memory.js';
import type { Node } from '../src/castore/model.js';
import { renderNar } from '../src/store/nar/render.js';
import { removeDir, seededBytes, tempDir } from './helpers.js';
import { InvalidInputError } from '../src/castore/errors.js';
import { parseClosure, parseContentAddress, parseNixHash } from '../src/store/closure.js';
import { NarEncoder } from '../src/store/nar/encoder.js';
import { malformedNars, nar, narString, sampleNar } from './nar-samples.js';
import { RecycledSlabs } from '../src/store/nar/recycled-slabs.js';
import { NarFormatError, ingestNar } from '../src/store/nar/ingest.js';
import * as nixbase32 from '../src/store/nixbase32.js';
import { compressHash, formatStorePath, parseStorePath } from '../src/store/storepath.js';

test('nixbase32: the vectors from Nix and tvix, both ways; bad input refused', () => {
  const vectors: [string, string][] = [
    ['', ''],
    ['1f', '0z'],
    ['8a12321522fd91efbd60ebb2481af88580f61600', '00bgd045z0d4icpbc2yyz4gx48ak44la'],
    ['13a8cf7ca57f68a9f1752acee36a72a55187d3a954443c112818926f26109d91', '14cx20k6z4hq508kqi2lm79qfld5f9mf7kiafpqsjs3zlmycza0k'],
  ];
  for (const [hex, text] of vectors) {
    assert.equal(nixbase32.encode(Buffer.from(hex, 'hex')), text);
    assert.equal(nixbase32.decode(text).toString('hex'), hex);
  }
  assert.throws(() => nixbase32.decode('00bgd045z0d4icpbc2yyz4gx48ak44le'), /"e" is not a nixbase32 character/);
  assert.throws(() => nixbase32.decode('0'.repeat(33)), /not a nixbase32 length/);
  assert.throws(() => nixbase32.decode('zz'), /bits set beyond its length/);
});

test('store paths: parse, format, refuse bad ones', () => {
  const path = '/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432';
  const parsed = parseStorePath(path);
  assert.equal(parsed.digest.toString('hex'), '8a12321522fd91efbd60ebb2481af88580f61600');
  assert.equal(parsed.name, 'net-tools-1.60_p20170221182432');
  assert.equal(formatStorePath(parsed), path);
  const bad: [string, RegExp][] = [
    ['/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la', /not a store path basename/],
    ['/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-', /not a store path basename/],
    ['/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44le-x', /hash part is not nixbase32/],
    ['/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-a b', /contains " "/],
    [`/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-${'x'.repeat(212)}`, /longer than 211/],
    ['/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x/bin', /inside a store path/],
    ['/usr/bin/00bgd045z0d4icpbc2yyz4gx48ak44la-x', /is not in \/nix\/store/],
    ['/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-..', /the name is "\.\."/],
  ];
  for (const [text, why] of bad) assert.throws(() => parseStorePath(text), (err: Error) => err instanceof InvalidInputError && why.test(err.message), text);
  assert.deepEqual([...compressHash(Buffer.from([1, 2, 3, 4, 5]), 2)], [1 ^ 3 ^ 5, 2 ^ 4]);
});

test('Nix hashes and content addresses in their textual forms', () => {
  const digest = Buffer.from('13a8cf7ca57f68a9f1752acee36a72a55187d3a954443c112818926f26109d91', 'hex');
  for (const text of [
    'sha256:14cx20k6z4hq508kqi2lm79qfld5f9mf7kiafpqsjs3zlmycza0k',
    `sha256:${digest.toString('hex')}`,
    `sha256-${digest.toString('base64')}`,
  ]) assert.deepEqual(parseNixHash(text).digest, digest, text);
  assert.throws(() => parseNixHash('sha256:abc'), /not a sha256 digest/);
  assert.throws(() => parseNixHash('sha1-AAAA', 'sha256'), /not a sha1 digest|expected a sha256/);
  assert.deepEqual(parseContentAddress(`fixed:r:sha256:${digest.toString('hex')}`), { type: 'NAR_SHA256', digest });
  assert.deepEqual(parseContentAddress(`fixed:sha256:${digest.toString('hex')}`), { type: 'FLAT_SHA256', digest });
  assert.deepEqual(parseContentAddress(`text:sha256:${digest.toString('hex')}`), { type: 'TEXT_SHA256', digest });
});

test('closure descriptions: attrs.json, path-info list and object; bad entries reported alone', () => {
  const entry = {
    path: '/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x',
    narHash: 'sha256:14cx20k6z4hq508kqi2lm79qfld5f9mf7kiafpqsjs3zlmycza0k',
    narSize: 120,
    references: ['/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x'],
  };
  assert.equal(parseClosure({ closure: [entry], name: 'x' }).entries.length, 1);
  assert.equal(parseClosure([entry, entry]).entries.length, 1);
  const { path, ...rest } = entry;
  assert.equal(parseClosure({ [path]: rest }).entries[0]!.path.name, 'x');
  const mixed = parseClosure([entry, { ...entry, path: '/nix/store/bad', narSize: 1 }, { ...entry, path: entry.path + 'y', narSize: -1 }]);
  assert.equal(mixed.entries.length, 1);
  assert.deepEqual(mixed.problems.map((p) => p.path), ['/nix/store/bad', entry.path + 'y']);
  assert.throws(() => parseClosure({ name: 'nothing' }), /no closure entries found/);
});

test('NAR encoder: a file size above 4 GiB is written as a full little-endian u64', () => {
  const chunks: Buffer[] = [];
  const encoder = new NarEncoder((chunk) => chunks.push(Buffer.from(chunk)));
  const size = 2 ** 32 * 3 + 0x89abcdef; // both halves non-zero, the low one with its top bit set
  encoder.fileStart(true, size);
  encoder.fileSkip(size); // the contents are not emitted, only counted
  encoder.fileEnd();
  encoder.flush();
  const nar = Buffer.concat(chunks);
  const header = nar.subarray(0, nar.length - 1 - 16); // before the padding (size % 8 = 7: one zero) and ")"
  assert.equal(header.readBigUInt64LE(header.length - 8), BigInt(size));
  assert.equal(encoder.size, nar.length + size);
});

test('NAR encoder: recycled slabs are reused only once the consumer is past them', () => {
  const files = Array.from({ length: 200 }, (_, i) => Buffer.alloc(3 + ((i * 37) % 90), i));
  const encode = (encoder: NarEncoder, afterFile: () => void) => {
    encoder.directoryStart();
    files.forEach((contents, i) => {
      encoder.entryStart(Buffer.from(`f${String(i).padStart(3, '0')}`));
      encoder.fileStart(i % 3 === 0, contents.length);
      encoder.fileData(contents, true);
      encoder.fileEnd();
      encoder.entryEnd();
      afterFile();
    });
    encoder.directoryEnd();
    encoder.flush();
  };
  const expected: Buffer[] = [];
  encode(new NarEncoder((chunk) => expected.push(Buffer.from(chunk)), 256), () => {});

  // A consumer that holds chunks (no copy) and writes them some files later, as a slow pipe would.
  const queued: Buffer[] = [];
  const written: Buffer[] = [];
  let writtenBytes = 0;
  const writeOldest = (keep: number) => {
    while (queued.length > keep) {
      const chunk = queued.shift()!;
      written.push(Buffer.from(chunk)); // the bytes as they were when written
      writtenBytes += chunk.length;
    }
  };
  const recycled = new RecycledSlabs(256, () => writtenBytes);
  const distinct = new Set<Buffer>();
  const slabs = {
    take: (size: number) => {
      const slab = recycled.take(size);
      distinct.add(slab);
      return slab;
    },
    retire: recycled.retire.bind(recycled),
  };
  let file = 0;
  encode(new NarEncoder((chunk) => queued.push(chunk), 256, slabs), () => writeOldest(++file % 5 === 0 ? 0 : 3));
  writeOldest(0);
  assert.ok(Buffer.concat(written).equals(Buffer.concat(expected)), 'a slab was reused before its bytes were written');
  const slabsWorth = Math.ceil(Buffer.concat(expected).length / 256);
  assert.ok(distinct.size < slabsWorth / 4, `${distinct.size} distinct slabs for ${slabsWorth} slabs' worth of NAR`);
});

test('NAR reader: a NAR whose chunks the producer reuses (as decompression does) is stored as it is, small and large files alike, at every chunk size', async () => {
  // Files around the reader's 64 KiB limit for storing whole, and the local store's small-blob limit.
  const sizes = [0, 1, 7, 8, 4096, 65535, 65536, 65537, 200_000];
  const chunks: Buffer[] = [];
  const e = new NarEncoder((c) => chunks.push(Buffer.from(c)));
  e.directoryStart();
  sizes.forEach((size, i) => {
    e.entryStart(Buffer.from(`f${String(i).padStart(2, '0')}`));
    e.fileStart(i % 2 === 1, size);
    e.fileData(seededBytes(size, 1000 + i));
    e.fileEnd();
    e.entryEnd();
  });
  e.entryStart(Buffer.from('link'));
  e.symlink(Buffer.from('f00'.repeat(100)));
  e.entryEnd();
  e.directoryEnd();
  e.flush();
  const nar = Buffer.concat(chunks);
  const dir = tempDir('nar-reader');
  try {
    const local = { blobs: LocalStore.blobService(dir, { create: true }), directories: LocalStore.directoryService(dir, { create: true }) };
    // A service may keep what put() is given and read it later, as its contract allows.
    const latePut = new MemoryBlobService();
    latePut.put = (data: Buffer) =>
      new Promise((resolve, reject) => setImmediate(() => {
        const writer = latePut.openWriter();
        writer.write(data).then(() => writer.close()).then(resolve, reject);
      }));
    for (const [name, services] of [['the local store', local], ['a service reading put() data later', { blobs: latePut, directories: new MemoryDirectoryService() }]] as const)
    for (const piece of [1, 5, 8, 13, 4096, 65536, 1 << 20]) {
      // Each chunk in a lent slab of a pool of one, released once the reader asks for the next and
      // scribbled over when it is taken again: whatever the reader kept of a chunk past that,
      // without holding its slab, would come out wrong.
      const pool = new LentSlabPool(piece, 1);
      async function* reused(): AsyncGenerator<Buffer> {
        for (let at = 0; at < nar.length; at += piece) {
          const slab = pool.take();
          slab.bytes.fill(0xee);
          const length = nar.copy(slab.bytes, 0, at, Math.min(at + piece, nar.length));
          try {
            yield slab.bytes.subarray(0, length);
          } finally {
            slab.release();
          }
        }
      }
      const { root, narSize, narSha256 } = await ingestNar(reused(), services);
      assert.equal(narSize, nar.length, `${name}, chunks of ${piece}`);
      assert.ok(narSha256.equals(createHash('sha256').update(nar).digest()), `${name}, chunks of ${piece}: NAR hash`);
      const rendered: Buffer[] = [];
      for await (const chunk of renderNar(root, services)) rendered.push(Buffer.from(chunk));
      assert.ok(Buffer.concat(rendered).equals(nar), `${name}, chunks of ${piece}: the stored tree renders back the same NAR`);
    }
    await local.blobs.close();
    await local.directories.close();
  } finally {
    removeDir(dir);
  }
});

test('NAR reader: directories nested as deep as allowed (2048) are read, in chunks of 8 bytes; one level deeper is refused, naming the limit', async () => {
  const nested = (depth: number) => {
    const opening = ['nix-archive-1'];
    const closing: string[] = [];
    for (let i = 0; i < depth; i++) {
      opening.push('(', 'type', 'directory', 'entry', '(', 'name', 'a', 'node');
      closing.push(')', ')');
    }
    return nar(...opening, '(', 'type', 'regular', 'contents', narString('hello'), ')', ...closing);
  };
  const inPieces = (bytes: Buffer) => Array.from({ length: Math.ceil(bytes.length / 8) }, (_, i) => bytes.subarray(i * 8, i * 8 + 8));
  const deepest = nested(2048);
  const services = { blobs: new MemoryBlobService(), directories: new MemoryDirectoryService() };
  const { root, narSize } = await ingestNar(inPieces(deepest), services);
  assert.equal(narSize, deepest.length);
  const rendered: Buffer[] = [];
  for await (const chunk of renderNar(root, services)) rendered.push(Buffer.from(chunk));
  assert.ok(Buffer.concat(rendered).equals(deepest));
  await assert.rejects(ingestNar(inPieces(nested(2049)), { blobs: new MemoryBlobService(), directories: new MemoryDirectoryService() }), (err: Error) => err instanceof NarFormatError && /directories nested deeper than 2048/.test(err.message));
});

test('NAR reader: refuses malformed NARs with a clear error and registers no directory', async () => {
  const good = sampleNar();
  const services = () => ({ blobs: new MemoryBlobService(), directories: new MemoryDirectoryService() });
  const ok = await ingestNar([good], services());
  assert.equal(ok.narSize, good.length);

  const cases = malformedNars();
  for (const [what, bytes, why] of cases) {
    const s = services();
    let puts = 0;
    const put = s.directories.put.bind(s.directories);
    s.directories.put = (batch) => {
      puts++;
      return put(batch);
    };
    await assert.rejects(ingestNar([bytes], s), (err: Error) => err instanceof NarFormatError && why.test(err.message), `${what}: ${why}`);
    assert.equal(puts, 0, `${what}: no directory stored`);
  }
});

test('SHA-256 on the hashing thread equals node:crypto, across ring wraps, oversized updates, lent slabs and concurrent streams', async () => {
  const { createHash, randomBytes } = await import('node:crypto');
  const { OffThreadSha256 } = await import('../src/store/sha256-off-thread.js');
  const data = randomBytes(40 * 1024 * 1024);
  // Sizes chosen so pieces straddle the 16 MiB ring's end; one update is larger than the ring.
  const plans = [
    [1, 7, 4093, 1 << 20, 3 << 20, 5, 17 << 20, 65536, 9],
    [8 << 20, 7 << 20, 3 << 20, 1, 8 << 20, 8 << 20],
    [0, 12, 0],
  ];
  const streams = plans.map((sizes) => ({ sizes, sha: new OffThreadSha256(), expected: createHash('sha256') }));
  let at = 0;
  for (let step = 0; streams.some((s) => s.sizes.length); step++) {
    for (const stream of streams) {
      const size = stream.sizes.shift();
      if (size === undefined) continue;
      const piece = data.subarray(at % (24 << 20), (at % (24 << 20)) + size);
      at += 4099;
      stream.sha.update(piece);
      stream.expected.update(piece);
      await stream.sha.ready();
    }
  }
  for (const stream of streams) assert.ok((await stream.sha.digest()).equals(stream.expected.digest()));
  // Chunks in lent slabs are hashed where they lie: a slab scribbled on as soon as the pool gives
  // it out again shows whether the thread read one it no longer held.
  const { lentSlabs } = await import('../src/castore/lent-slabs.js');
  const lent = new OffThreadSha256();
  const lentExpected = createHash('sha256');
  for (let at = 0; at < 24 << 20; at += 3 << 20) {
    const slab = lentSlabs.take();
    const chunk = slab.bytes.subarray(at % 4096, (at % 4096) + (3 << 20));
    data.copy(chunk, 0, at);
    lent.update(chunk);
    lentExpected.update(chunk);
    slab.release();
    const next = lentSlabs.take();
    next.bytes.fill(0xee);
    next.release();
    await lent.ready();
  }
  assert.ok((await lent.digest()).equals(lentExpected.digest()), 'SHA-256 of chunks in lent slabs');
  const dropped = new OffThreadSha256();
  dropped.update(data.subarray(0, 100));
  dropped.drop();
  const empty = new OffThreadSha256();
  assert.equal((await empty.digest()).toString('hex'), createHash('sha256').digest('hex'));
});

test('renderNar of small blobs read in place from the local store: a node whose size disagrees with its blob is an error naming the path', async () => {
  const work = tempDir('render-inline');
  const blobs = LocalStore.blobService(work);
  const directories = LocalStore.directoryService(work);
  try {
    const writer = blobs.openWriter();
    await writer.write(Buffer.from('five!'));
    const digest = await writer.close();
    const file = (size: number): Node => ({ kind: 'file', node: { name: Buffer.from('f'), digest, size, executable: false } });
    const render = async (node: Node) => {
      const chunks: Buffer[] = [];
      for await (const chunk of renderNar(node, { blobs, directories })) chunks.push(chunk);
      return Buffer.concat(chunks);
    };
    let expected = Buffer.alloc(0);
    const encoder = new NarEncoder((chunk) => (expected = Buffer.concat([expected, chunk])));
    encoder.fileStart(false, 5);
    encoder.fileData(Buffer.from('five!'));
    encoder.fileEnd();
    encoder.flush();
    assert.ok((await render(file(5))).equals(expected));
    const dirDigest = await directories.put([{ directories: [], files: [{ name: Buffer.from('short'), digest, size: 9, executable: false }], symlinks: [] }]);
    await assert.rejects(render({ kind: 'directory', node: { name: Buffer.from('d'), digest: dirDigest, size: 1 } }), /short: blob b3:\S+ has 5 bytes, its node says 9/);
    await assert.rejects(render(file(3)), /root: blob b3:\S+ has 5 bytes, its node says 3/);
  } finally {
    await blobs.close();
    await directories.close();
    removeDir(work);
  }
});

// The data model: canonical encoding, digests, validation, size rules.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { blake3, blake3Implementations, formatDigest, parseDigest } from '../src/castore/digest.js';
import { DirectoryBatch, directoryDigest } from '../src/castore/directoryservice.js';
import { DataLossError, InvalidInputError } from '../src/castore/errors.js';
import { verifiedStream } from '../src/castore/blobservice.js';
import { type Directory, directorySize, emptyDirectory, legacyDirectorySize } from '../src/castore/model.js';
import { DirectoryValidationError, validateDirectory } from '../src/castore/validate.js';
import { decodeDirectory, encodeDirectory } from '../src/castore/wire.js';

const D = (byte: number) => Buffer.alloc(32, byte);
const name = (s: string | number[]) => (typeof s === 'string' ? Buffer.from(s) : Buffer.from(s));

test('the empty directory has the well-known digest', () => {
  assert.equal(directoryDigest(emptyDirectory()).toString('hex'), 'af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262');
});

test('native and wasm BLAKE3 agree', () => {
  const data = Buffer.alloc(1_000_003);
  for (let i = 0; i < data.length; i++) data[i] = (i * 31) & 0xff;
  const native = blake3Implementations.native().create();
  const wasm = blake3Implementations.wasm().create();
  native.update(data);
  wasm.update(data);
  assert.deepEqual(native.digest(), wasm.digest());
});

test('digests print and parse as b3:<base64>', () => {
  const digest = blake3(Buffer.from('x'));
  const text = formatDigest(digest);
  assert.match(text, /^b3:[A-Za-z0-9+/]{43}=$/);
  assert.deepEqual(parseDigest(text), digest);
  assert.deepEqual(parseDigest(digest.toString('hex')), digest);
  assert.deepEqual(parseDigest('b3:' + digest.toString('base64url')), digest);
  assert.throws(() => parseDigest('b3:AAAA'), /32 bytes/);
  assert.throws(() => parseDigest('sha256:xyz'), InvalidInputError);
});

test('canonical encoding: field order, defaults omitted, decode round trip with non-UTF-8 names', () => {
  const directory: Directory = {
    directories: [{ name: name('d'), digest: D(1), size: 0 }],
    files: [
      { name: name([0xff, 0xfe]), digest: D(2), size: 0, executable: false },
      { name: name([0xff, 0xff]), digest: D(3), size: 300, executable: true },
    ],
    symlinks: [{ name: name('s'), target: name([0x80, 0x2f]) }],
  };
  const encoded = encodeDirectory(directory);
  // DirectoryNode with size 0: name and digest only (0x0a len 'd', 0x12 len digest), no size field.
  assert.equal(encoded.subarray(0, 4).toString('hex'), '0a250a01');
  assert.ok(!encoded.subarray(2, 2 + 0x25).includes(Buffer.from([0x18, 0x00])), 'a zero size is omitted');
  assert.deepEqual(decodeDirectory(encoded), directory);
  assert.deepEqual(encodeDirectory(decodeDirectory(encoded)), encoded);
});

test('decoding skips unknown fields, so identity comes from the canonical re-encoding', () => {
  const canonical = encodeDirectory({ directories: [], files: [], symlinks: [{ name: name('a'), target: name('b') }] });
  const withUnknown = Buffer.concat([canonical, Buffer.from([0x20, 0x07])]); // field 4, varint 7
  assert.deepEqual(encodeDirectory(decodeDirectory(withUnknown)), canonical);
  assert.throws(() => decodeDirectory(Buffer.from([0x0a, 0x05, 0x01])), /truncated/);
});

test('sizes at every varint width encode as protobuf does and decode back', () => {
  for (const size of [1, 127, 128, 300, 16384, 2 ** 31, 2 ** 32 + 1, 2 ** 35 + 5, Number.MAX_SAFE_INTEGER]) {
    const directory: Directory = { directories: [], files: [{ name: name('f'), digest: D(3), size, executable: false }], symlinks: [] };
    const encoded = encodeDirectory(directory);
    assert.deepEqual(decodeDirectory(encoded), directory, `size ${size}`);
    // FileNode: name (3 bytes) + digest (34) + the size field: tag 0x18 and the varint.
    const sizeField = encoded.subarray(2 + 3 + 34);
    assert.equal(sizeField[0], 0x18);
    let decoded = 0;
    for (let i = sizeField.length - 1; i >= 1; i--) decoded = decoded * 128 + (sizeField[i]! & 0x7f);
    assert.equal(decoded, size, `size ${size} written as ${sizeField.toString('hex')}`);
  }
  assert.equal(encodeDirectory({ directories: [], files: [{ name: name('f'), digest: D(3), size: 300, executable: false }], symlinks: [] }).subarray(-2).toString('hex'), 'ac02');
});

test('decoding keeps each node inside its own length', () => {
  const file = encodeDirectory({ directories: [], files: [{ name: name('f'), digest: D(7), size: 9, executable: true }], symlinks: [] });
  // A FileNode (field 2) of 3 bytes whose name claims 5: the bytes after the node must not be read as its name.
  const overrun = Buffer.concat([Buffer.from([0x12, 0x03, 0x0a, 0x05, 0x61]), file]);
  assert.throws(() => decodeDirectory(overrun), /FileNode: truncated length-delimited field/);
  // A SymlinkNode (field 3) with an unknown field 3 of its own (varint 5) after its name and target:
  // that field is skipped, and the FileNode after it is read from where the symlink ended.
  const symlink = Buffer.from([0x1a, 0x08, 0x0a, 0x01, 0x61, 0x12, 0x01, 0x62, 0x18, 0x05]);
  assert.deepEqual(decodeDirectory(Buffer.concat([symlink, file])), {
    directories: [],
    files: [{ name: name('f'), digest: D(7), size: 9, executable: true }],
    symlinks: [{ name: name('a'), target: name('b') }],
  });
});

test('validation names each problem', () => {
  const file = (n: Buffer | string, digest = D(1)) => ({ name: typeof n === 'string' ? name(n) : n, digest, size: 1, executable: false });
  const cases: [string, Directory, RegExp][] = [
    ['unsorted', { directories: [], files: [file('b'), file('a')], symlinks: [] }, /not sorted/],
    ['duplicate', { directories: [], files: [file('a'), file('a')], symlinks: [] }, /duplicate/],
    ['across lists', { directories: [{ name: name('a'), digest: D(1), size: 0 }], files: [file('a')], symlinks: [] }, /more than one list/],
    ['dot', { directories: [], files: [file('.')], symlinks: [] }, /'\.'/],
    ['slash', { directories: [], files: [file('a/b')], symlinks: [] }, /'\/'/],
    ['long', { directories: [], files: [file('x'.repeat(256))], symlinks: [] }, /longer than 255/],
    ['digest', { directories: [], files: [file('a', Buffer.alloc(31))], symlinks: [] }, /31 bytes/],
    ['target NUL', { directories: [], files: [], symlinks: [{ name: name('l'), target: Buffer.from([0x61, 0]) }] }, /NUL/],
    ['target long', { directories: [], files: [], symlinks: [{ name: name('l'), target: Buffer.alloc(4096, 0x61) }] }, /longer than 4095/],
  ];
  for (const [what, directory, message] of cases) {
    assert.throws(() => validateDirectory(directory), (err: Error) => err instanceof DirectoryValidationError && message.test(err.message), what);
  }
  validateDirectory({ directories: [], files: [file('x'.repeat(255))], symlinks: [{ name: name('l'), target: Buffer.alloc(4095, 0x61) }] });
});

test('size: the documented rule is written, the legacy Rust rule accepted, anything else refused', async () => {
  const leaf: Directory = { directories: [], files: [{ name: name('f'), digest: D(1), size: 1, executable: false }], symlinks: [{ name: name('s'), target: name('t') }] };
  const mid: Directory = { directories: [{ name: name('leaf'), digest: directoryDigest(leaf), size: directorySize(leaf) }], files: [], symlinks: [] };
  assert.equal(directorySize(leaf), 2);
  assert.equal(directorySize(mid), 3);
  assert.equal(legacyDirectorySize(leaf), 4);
  const parentWith = (size: number): Directory => ({ directories: [{ name: name('m'), digest: directoryDigest(mid), size }], files: [], symlinks: [] });
  for (const size of [directorySize(mid), legacyDirectorySize(mid)]) {
    const batch = new DirectoryBatch();
    [leaf, mid, parentWith(size)].forEach((d) => batch.add(d));
    await batch.finish(async () => undefined);
  }
  const batch = new DirectoryBatch();
  [leaf, mid].forEach((d) => batch.add(d));
  assert.throws(() => batch.add(parentWith(legacyDirectorySize(mid) + 1)), /size 5 is wrong, the directory has size 3/);
});

test('a batch needs its references and exactly one root', async () => {
  const a: Directory = { directories: [], files: [], symlinks: [{ name: name('a'), target: name('x') }] };
  const b: Directory = { directories: [], files: [], symlinks: [{ name: name('b'), target: name('x') }] };
  const two = new DirectoryBatch();
  two.add(a);
  two.add(b);
  await assert.rejects(two.finish(async () => undefined), /exactly one root, this one has 2/);
  const dangling = new DirectoryBatch();
  dangling.add({ directories: [{ name: name('c'), digest: D(9), size: 0 }], files: [], symlinks: [] });
  await assert.rejects(dangling.finish(async () => undefined), /neither earlier in the batch nor stored/);
  const stored = new DirectoryBatch();
  stored.add({ directories: [{ name: name('c'), digest: directoryDigest(a), size: 1 }], files: [], symlinks: [] });
  await stored.finish(async () => a);
  await assert.rejects(new DirectoryBatch().finish(async () => undefined), /no directories/);
});

test('verifiedStream passes a matching blob on whole and holds back the end of one that does not match', async () => {
  const chunks = [Buffer.from('first '), Buffer.from('second '), Buffer.from('last')];
  async function* source(list: Buffer[]) {
    yield* list;
  }
  const whole = Buffer.concat(chunks);
  const received: Buffer[] = [];
  for await (const chunk of verifiedStream(source(chunks), blake3(whole), 'test')) received.push(chunk);
  assert.ok(Buffer.concat(received).equals(whole));

  const lying = [chunks[0], Buffer.from('SECOND '), chunks[2]];
  const partial: Buffer[] = [];
  await assert.rejects(
    (async () => {
      for await (const chunk of verifiedStream(source(lying), blake3(whole), 'the blob service at test')) partial.push(chunk);
    })(),
    (err: Error) => err instanceof DataLossError && /the blob service at test sent blob/.test(err.message),
  );
  assert.equal(Buffer.concat(partial).length, whole.length - chunks[2].length, 'everything but the last chunk, never the whole');
  for await (const chunk of verifiedStream(source([]), blake3(Buffer.alloc(0)), 'test')) assert.fail(`the empty blob has no chunks, got ${chunk.length} bytes`);
});

// The pieces nar-bridge is built from: narinfo text, signatures, byte ranges
// of rendered NARs, reference scanning, Range headers and URL routes.
// (Agreement with real Nix over HTTP is in nar-bridge.test.ts.)
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { MemoryBlobService, MemoryDirectoryService } from '../src/castore/backends/memory.js';
import { parseRange } from '../src/narbridge/range.js';
import { BadRequestError, parseRoute } from '../src/narbridge/routes.js';
import { ingestNar } from '../src/store/nar/ingest.js';
import { renderNar } from '../src/store/nar/render.js';
import { formatContentAddress, formatNarInfo, narInfoFingerprint, parseNarInfo } from '../src/store/narinfo.js';
import * as nixbase32 from '../src/store/nixbase32.js';
import type { PathInfo } from '../src/store/pathinfo.js';
import { ReferenceScanner } from '../src/store/reference-scan.js';
import { parseSecretKey, signFingerprint, verifyFingerprint } from '../src/store/signing.js';
import { parseBasename, parseStorePath } from '../src/store/storepath.js';
import { nix, removeDir, seededRandom, tempDir } from './helpers.js';

async function collect(stream: AsyncIterable<Buffer>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk));
  return Buffer.concat(chunks);
}

const PATH = parseStorePath('/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60');
const REF = parseBasename('14cx20k6z4hq508kqi2lm79qfld5f9mf-glibc-2.40');

function samplePathInfo(): PathInfo {
  return {
    node: { kind: 'file', node: { name: Buffer.from('00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60'), digest: Buffer.alloc(32, 7), size: 3, executable: false } },
    references: [REF, PATH],
    narSize: 120,
    narSha256: Buffer.alloc(32, 1),
    signatures: [{ name: 'cache.example.org-1', data: Buffer.alloc(64, 2) }],
    deriver: { digest: REF.digest, name: 'net-tools-1.60' },
    ca: { type: 'NAR_SHA256', digest: Buffer.alloc(32, 3) },
  };
}

test('narinfo: formatted in Nix\'s field order with Compression: none, and parsed back', () => {
  const info = samplePathInfo();
  const text = formatNarInfo(info, PATH, 'nar/x.nar');
  const lines = text.trimEnd().split('\n').map((line) => line.slice(0, line.indexOf(':')));
  assert.deepEqual(lines, ['StorePath', 'URL', 'Compression', 'NarHash', 'NarSize', 'References', 'Deriver', 'Sig', 'CA']);
  assert.match(text, /^References: 00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60 14cx20k6z4hq508kqi2lm79qfld5f9mf-glibc-2.40$/m);
  assert.match(text, /^Deriver: 14cx20k6z4hq508kqi2lm79qfld5f9mf-net-tools-1.60.drv$/m);
  assert.match(text, /^Compression: none$/m);
  const parsed = parseNarInfo(text);
  assert.equal(parsed.url, 'nar/x.nar');
  assert.equal(parsed.compression, 'none');
  assert.deepEqual(parsed.narSha256, info.narSha256);
  assert.equal(parsed.narSize, 120);
  assert.deepEqual(parsed.deriver, info.deriver);
  assert.deepEqual(parsed.signatures, info.signatures);
  assert.deepEqual(parsed.ca, info.ca);
  assert.equal(parsed.references.length, 2);
  assert.equal(formatContentAddress({ type: 'FLAT_SHA1', digest: Buffer.alloc(20) }), `fixed:sha1:${'0'.repeat(32)}`);
  assert.equal(formatContentAddress({ type: 'TEXT_SHA256', digest: Buffer.alloc(32) }), `text:sha256:${'0'.repeat(52)}`);
  assert.equal(parsed.castoreDirectory, undefined); // a file root: nothing to fetch object by object
  const directoryRoot: PathInfo = { ...info, node: { kind: 'directory', node: { name: Buffer.from('x'), digest: Buffer.alloc(32, 9), size: 1 } } };
  assert.deepEqual(parseNarInfo(formatNarInfo(directoryRoot, PATH, 'nar/x.nar')).castoreDirectory, Buffer.alloc(32, 9));
  // A narinfo without Compression means bzip2 to Nix; we parse it the same way.
  assert.equal(parseNarInfo(text.replace('Compression: none\n', '')).compression, 'bzip2');
});

test('narinfo: malformed ones are refused with the field named', () => {
  const good = formatNarInfo(samplePathInfo(), PATH, 'nar/x.nar');
  const cases: [string, RegExp][] = [
    [good.replace(/^NarHash: .*$/m, 'NarHash: sha256:nothex'), /NarHash/],
    [good.replace(/^NarSize: .*$/m, 'NarSize: -1'), /NarSize/],
    [good.replace(/^NarSize: .*\n/m, ''), /no NarSize/],
    [good.replace(/^StorePath: .*$/m, 'StorePath: /etc/passwd'), /StorePath/],
    [good.replace(/^References: .*$/m, 'References: ../../etc'), /References/],
    [good.replace(/^Deriver: .*$/m, 'Deriver: 14cx20k6z4hq508kqi2lm79qfld5f9mf-x'), /Deriver/],
    [good.replace(/^Sig: .*$/m, 'Sig: nokey'), /Sig/],
    [good + 'garbage line\n', /not "Key: value"/],
    [good + 'NarSize: 5\n', /NarSize twice/],
    [good + `CastoreDirectory: ${'0'.repeat(63)}\n`, /CastoreDirectory: .* is not a hex BLAKE3 digest/],
  ];
  for (const [text, message] of cases) assert.throws(() => parseNarInfo(text), message);
});

test('signatures: Nix\'s key file format, deterministic ed25519 over the fingerprint', () => {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  const seed = Buffer.from(privateKey.export({ format: 'jwk' }).d as string, 'base64url');
  const pub = Buffer.from(publicKey.export({ format: 'jwk' }).x as string, 'base64url');
  const key = parseSecretKey(`test-1:${Buffer.concat([seed, pub]).toString('base64')}\n`);
  assert.equal(key.publicKeyText, `test-1:${pub.toString('base64')}`);
  const info = samplePathInfo();
  const fingerprint = narInfoFingerprint(PATH, info.narSha256, info.narSize, info.references);
  assert.equal(
    fingerprint,
    `1;/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60;sha256:${nixbase32.encode(info.narSha256)};120;` +
      '/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60,/nix/store/14cx20k6z4hq508kqi2lm79qfld5f9mf-glibc-2.40',
  );
  const signature = signFingerprint(key, fingerprint);
  assert.equal(signature.name, 'test-1');
  assert.ok(verifyFingerprint(key.publicKeyText, fingerprint, signature));
  assert.ok(!verifyFingerprint(key.publicKeyText, fingerprint.replace('120', '121'), signature));
  assert.deepEqual(signFingerprint(key, fingerprint), signature);
  // A key whose public half does not belong to its seed, and things that are not keys.
  assert.throws(() => parseSecretKey(`k:${Buffer.concat([seed, Buffer.alloc(32)]).toString('base64')}`), /corrupt/);
  assert.throws(() => parseSecretKey(`k:${pub.toString('base64')}`), /not a Nix ed25519 secret key/);
  assert.throws(() => parseSecretKey('no colon'), /not a Nix/);
});

test('NAR byte ranges: every range equals the same slice of the whole NAR, and skips unread files', async () => {
  const work = tempDir('nar-range');
  try {
    const tree = join(work, 'tree');
    mkdirSync(join(tree, 'sub/deeper'), { recursive: true });
    writeFileSync(join(tree, 'big'), randomBytes(3 * 1024 * 1024 + 13));
    writeFileSync(join(tree, 'small'), 'hello\n');
    writeFileSync(join(tree, 'empty'), '');
    writeFileSync(join(tree, 'sub/deeper/middle'), randomBytes(70_001));
    symlinkSync('../small', join(tree, 'sub/link'));
    const whole = nix('nix-store', ['--dump', tree]);
    const services = { blobs: new MemoryBlobService(), directories: new MemoryDirectoryService() };
    const { root } = await ingestNar([whole], services);
    assert.ok((await collect(renderNar(root, services))).equals(whole));
    const size = whole.length;
    const edges = [0, 1, 7, 8, 100, 200, 1024 * 1024, 3 * 1024 * 1024, size - 80_000, size - 100, size - 1];
    const ranges: [number, number][] = [[0, size], [0, 1], [size - 1, size]];
    for (const a of edges) for (const b of edges) if (a < b) ranges.push([a, b]);
    const random = seededRandom('NAR ranges');
    for (let i = 0; i < 40; i++) {
      const a = random.int(0, size);
      ranges.push([a, random.int(a + 1, size + 1)]);
    }
    for (const [start, end] of ranges) {
      const part = await collect(renderNar(root, services, { range: { start, end } }));
      assert.ok(part.equals(whole.subarray(start, end)), `range ${start}-${end} of ${size} differs`);
    }
    // A range before the big file's contents never opens it: its blob can be missing.
    const bigDigest = (await services.directories.get(root.kind === 'directory' ? root.node.digest : Buffer.alloc(0)))!.files.find((f) => f.name.toString() === 'big')!.digest;
    const withoutBig = { blobs: new MemoryBlobService(), directories: services.directories };
    for (const file of [join(tree, 'small'), join(tree, 'sub/deeper/middle')]) {
      const writer = withoutBig.blobs.openWriter();
      await writer.write(await import('node:fs').then((fs) => fs.readFileSync(file)));
      await writer.close();
    }
    assert.ok(!(await withoutBig.blobs.has(bigDigest)));
    assert.ok((await collect(renderNar(root, withoutBig, { range: { start: 0, end: 150 } }))).equals(whole.subarray(0, 150)));
    await assert.rejects(collect(renderNar(root, withoutBig)), /blob .* is missing/);
  } finally {
    removeDir(work);
  }
});

test('reference scanning finds hash parts however the stream is cut', () => {
  const refs = ['14cx20k6z4hq508kqi2lm79qfld5f9mf', '00bgd045z0d4icpbc2yyz4gx48ak44la', 'zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz'];
  const text = Buffer.from(
    `\x00\x01/nix/store/${refs[0]}-glibc/lib\x00 some words that are not hashes: abcdfghijklmnpqrsvwxyz0123456789 ` +
      `prefix${refs[1]}suffixabc ${'e'.repeat(100)} ${refs[2]}`,
  );
  for (let cut1 = 0; cut1 < text.length; cut1 += 3) {
    for (const cut2 of [cut1, Math.min(text.length, cut1 + 1), Math.min(text.length, cut1 + 40)]) {
      const scanner = new ReferenceScanner();
      scanner.update(text.subarray(0, cut1));
      scanner.update(text.subarray(cut1, cut2));
      scanner.update(text.subarray(cut2));
      scanner.finish();
      for (const ref of refs) assert.equal(scanner.contains(ref), true, `${ref} with cuts at ${cut1}, ${cut2}`);
      assert.equal(scanner.contains('0123456789abcdfghijklmnpqrsvwxyz'.slice(0, 31) + '1'), false);
      assert.equal(scanner.contains('11111111111111111111111111111111'), false);
    }
  }
  // A run of base32 longer than the carry limit, split across chunks, still contains what is inside it.
  const long = Buffer.from('a'.repeat(100_000) + refs[0] + 'b'.repeat(100_000));
  const scanner = new ReferenceScanner();
  for (let i = 0; i < long.length; i += 4096) scanner.update(long.subarray(i, i + 4096));
  scanner.finish();
  assert.equal(scanner.contains(refs[0]), true);
  // Too much to keep: the answer is unknown rather than wrong.
  const small = new ReferenceScanner(64);
  small.update(Buffer.from(`${refs[0]} ${refs[1]} ${refs[2]}`));
  small.finish();
  assert.equal(small.contains(refs[0]), undefined);
});

test('Range headers: single ranges honoured, odd ones ignored, impossible ones refused', () => {
  assert.deepEqual(parseRange(undefined, 100), { kind: 'whole' });
  assert.deepEqual(parseRange('bytes=0-0', 100), { kind: 'partial', range: { start: 0, end: 1 } });
  assert.deepEqual(parseRange('bytes=10-', 100), { kind: 'partial', range: { start: 10, end: 100 } });
  assert.deepEqual(parseRange('bytes=-30', 100), { kind: 'partial', range: { start: 70, end: 100 } });
  assert.deepEqual(parseRange('bytes=-300', 100), { kind: 'partial', range: { start: 0, end: 100 } });
  assert.deepEqual(parseRange('bytes=90-1000', 100), { kind: 'partial', range: { start: 90, end: 100 } });
  assert.deepEqual(parseRange('bytes=100-', 100), { kind: 'unsatisfiable' });
  assert.deepEqual(parseRange('bytes=-0', 100), { kind: 'unsatisfiable' });
  assert.deepEqual(parseRange('bytes=5-2', 100), { kind: 'whole' });
  assert.deepEqual(parseRange('bytes=0-1,5-6', 100), { kind: 'whole' });
  assert.deepEqual(parseRange('items=0-1', 100), { kind: 'whole' });
});

test('routes: only the exact shapes nar-bridge serves', () => {
  const hash = '00bgd045z0d4icpbc2yyz4gx48ak44la';
  const narHash = '14cx20k6z4hq508kqi2lm79qfld5f9mf7kiafpqsjs3zlmycza0k';
  assert.deepEqual(parseRoute('/nix-cache-info'), { kind: 'cache-info' });
  assert.equal(parseRoute(`/${hash}.narinfo`)?.kind, 'narinfo');
  assert.equal(parseRoute(`/${hash}.narinfo?x=1`)?.kind, 'narinfo');
  assert.equal(parseRoute(`/nar/${hash}/${narHash}.nar`)?.kind, 'nar');
  assert.deepEqual(parseRoute(`/nar/${narHash}.nar.xz`), { kind: 'upload', fileSha256: nixbase32.decode(narHash), compression: 'xz' });
  assert.equal((parseRoute(`/nar/${narHash}.nar.zst`) as { compression: string }).compression, 'zstd');
  assert.equal((parseRoute(`/nar/${narHash}.nar`) as { compression: string }).compression, 'none');
  assert.deepEqual(parseRoute(`/nar/${narHash}.nar.bz2`), { kind: 'unsupported-compression', suffix: '.bz2' });
  for (const missing of ['/', '/etc/passwd', `/${hash}e.narinfo`, `/${hash.slice(1)}.narinfo`, `/nar/${hash}.nar`, `/${hash}.ls`, '/nar/']) {
    assert.equal(parseRoute(missing), undefined, missing);
  }
  for (const bad of ['/../etc/passwd', `/nar/%2e%2e/${hash}.narinfo`, `//${hash}.narinfo`, `/nar/${'z'.repeat(52)}.nar`]) {
    assert.throws(() => parseRoute(bad), BadRequestError, bad);
  }
});

// The in-process zstd decoder (src/native/zstd.c through store/nar/decompress.ts) against the
// zstd program: bodies fed in pieces of every size decode to what was compressed, across the
// 512 KiB slabs it decodes into; a held chunk keeps its bytes while later ones are decoded; a
// corrupt or truncated body is refused; and a decoder's memory is given back when the stream ends,
// whether it ended well or not (a NAR's window is invisible to V8's collector).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { test } from 'node:test';
import { lentSlabOf } from '../src/castore/lent-slabs.js';
import { zstdAddon } from '../src/native/zstd.js';
import { DecompressionError, decompress } from '../src/store/nar/decompress.js';
import { seededBytes } from './helpers.js';

const SEED = 4242;

function compressed(data: Buffer): Buffer {
  const run = spawnSync('zstd', ['-q', '-c', '-3'], { input: data, maxBuffer: 1 << 28 });
  assert.equal(run.status, 0, `zstd failed: ${run.stderr}`);
  return run.stdout;
}

/** `data` in pieces of pseudo-random sizes from 1 byte to 200 KiB (seed printed in the test name). */
function* pieces(data: Buffer, seed: number): Generator<Buffer> {
  let x = seed;
  for (let at = 0; at < data.length; ) {
    x = (x * 1103515245 + 12345) >>> 0;
    const size = x % 7 === 0 ? 1 + (x % 16) : 1 + (x % (200 * 1024));
    yield data.subarray(at, at + size);
    at += size;
  }
}

async function* asAsync<T>(items: Iterable<T>): AsyncGenerator<T> {
  yield* items;
}

test(`zstd in process: bodies in pieces decode byte for byte across slab boundaries (seed ${SEED})`, { skip: !zstdAddon() && 'the addon was built without libzstd' }, async () => {
  // Compressible and incompressible halves, 3 MiB in all: several 512 KiB slabs.
  const original = Buffer.concat([Buffer.alloc(1536 * 1024, 'nixcas '), seededBytes(1536 * 1024, SEED)]);
  const body = compressed(original);
  for (const seed of [SEED, SEED + 1, SEED + 2]) {
    const held: Buffer[] = [];
    let seen = 0;
    for await (const chunk of decompress(asAsync(pieces(body, seed)), 'zstd', (c) => (seen += c.length))) {
      const slab = lentSlabOf(chunk);
      assert.ok(slab, 'decoded chunks are views into lent slabs');
      slab.hold(); // kept past the next chunk, as a blob writer keeps one: never released here
      held.push(chunk);
    }
    assert.equal(seen, body.length);
    assert.ok(held.length > 6, `only ${held.length} chunks`);
    assert.ok(Buffer.concat(held).equals(original), `seed ${seed}: the decoded bytes differ`);
  }
});

test('zstd in process: a corrupt or truncated body is refused, and the decoder is released either way', { skip: !zstdAddon() && 'the addon was built without libzstd' }, async () => {
  const body = compressed(seededBytes(300_000, SEED));
  const corrupt = Buffer.from(body);
  corrupt[corrupt.length >> 1] ^= 0xff;
  const drain = async (bytes: Buffer) => {
    for await (const chunk of decompress(asAsync(pieces(bytes, SEED)), 'zstd', () => {})) void chunk;
  };
  await assert.rejects(drain(corrupt), (err: unknown) => err instanceof DecompressionError && /not valid zstd/.test((err as Error).message));
  await assert.rejects(drain(body.subarray(0, body.length - 100)), (err: unknown) => err instanceof DecompressionError && /ends inside a frame/.test((err as Error).message));

  // A released decoder refuses further use: what decompress() does with one when it is done.
  const addon = zstdAddon()!;
  const decoder = addon.decoder();
  addon.release(decoder);
  assert.throws(() => addon.decodeInto(decoder, body, 0, Buffer.alloc(1024), 0), /released/);
});

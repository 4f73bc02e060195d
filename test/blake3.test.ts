// src/native/blake3.c, the BLAKE3 the C readers check records with, against
// b3sum (the reference implementation's command) and @napi-rs/blake-hash.
// Lengths cover every tree shape up to 64 chunks and the vector widths'
// edges; contents come from a fixed-seed generator.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';
import { blake3 } from '../src/castore/digest.js';
import { native } from '../src/native/index.js';

const CHUNK = 1024;

/** The reference test vectors' input: byte i is i mod 251. */
function pattern(length: number): Buffer {
  const bytes = Buffer.alloc(length);
  for (let i = 0; i < length; i++) bytes[i] = i % 251;
  return bytes;
}

/** `digest` with one bit changed. */
function flipped(digest: Uint8Array): Buffer {
  const copy = Buffer.from(digest);
  copy[0] ^= 1;
  return copy;
}

/** A small linear congruential generator: the same bytes on every run. */
function seeded(seed: number): () => number {
  let state = seed >>> 0;
  return () => (state = (Math.imul(state, 1103515245) + 12345) >>> 0);
}

test('blake3.c agrees with b3sum on the reference inputs', () => {
  const lengths = [0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 2049, 3072, 3073, 4096, 4097, 5120, 6144, 7168, 8192, 8193,
    9217, 16384, 16385, 17408, 31744, 65535, 65536, 65537, 102400, 1048576 + 1];
  for (const length of lengths) {
    const input = pattern(length);
    const expected = Buffer.from(execFileSync('b3sum', ['--no-names', '--raw'], { input }));
    assert.equal(native().blake3Matches(input, expected), true, `length ${length}`);
    const wrong = Buffer.from(expected);
    wrong[31] ^= 0x80;
    assert.equal(native().blake3Matches(input, wrong), false, `length ${length}, one bit off`);
  }
});

test('blake3.c agrees with @napi-rs/blake-hash on every length to 66 chunks and on seeded larger inputs', () => {
  const seed = 0x5eed_b3;
  const next = seeded(seed);
  const lengths: number[] = [];
  for (let length = 0; length <= 66 * CHUNK; length += length < 3 * CHUNK ? 1 : 61) lengths.push(length);
  for (let i = 0; i < 40; i++) lengths.push(next() % (2 * 1024 * 1024));
  for (const length of lengths) {
    const input = Buffer.alloc(length);
    for (let i = 0; i < length; i++) input[i] = next() >>> 24;
    assert.equal(native().blake3Matches(input, blake3(input)), true, `length ${length} (seed ${seed})`);
  }
  assert.equal(native().blake3Matches(Buffer.from('abc'), Buffer.alloc(31)), false, 'a digest of the wrong length never matches');
});

test('blake3.c hashing many inputs side by side (the C renderer checks) agrees with @napi-rs/blake-hash, and names the first wrong one', () => {
  const seed = 0x5eed_b4;
  const next = seeded(seed);
  // Every length up to 3 chunks and past the one-pass limit, in groups of every size, so that
  // whole chunks, short last chunks and parents of different inputs share the lanes.
  const lengths: number[] = [];
  for (let length = 0; length <= 3 * CHUNK; length += 1) lengths.push(length);
  for (let i = 0; i < 300; i++) lengths.push(next() % (70 * CHUNK));
  lengths.push(64 * CHUNK, 64 * CHUNK + 1, 200_000);
  const inputs = lengths.map((length) => {
    const input = Buffer.alloc(length);
    for (let i = 0; i < length; i++) input[i] = next() >>> 24;
    return input;
  });
  const digests = inputs.map((input) => blake3(input));
  for (let first = 0, size = 1; first < inputs.length; first += size, size = (size % 40) + 1) {
    const group = inputs.slice(first, first + size);
    assert.equal(native().blake3ManyMatch(group, digests.slice(first, first + size)), -1, `inputs ${first}..${first + size - 1} (seed ${seed})`);
  }
  for (const wrong of [0, 15, 16, 17, 33]) {
    const group = inputs.slice(1000, 1040);
    const expected = digests.slice(1000, 1040).map((d, i) => (i === wrong || i === 38 ? flipped(d) : d));
    assert.equal(native().blake3ManyMatch(group, expected), wrong, `the first of two wrong digests, at ${wrong}`);
  }
});

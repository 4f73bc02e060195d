// What a long-running reader of the store keeps mapped of LMDB's file: small
// blobs are read where they lie in LMDB's memory map, so without a bound every
// one a server ever read stays resident in it. The kernel's own accounting
// (/proc/self/smaps) is what is checked.
import assert from 'node:assert/strict';
import { readFileSync, realpathSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { LocalStore } from '../src/castore/backends/local.js';
import { MAPPED_METADATA_BUDGET } from '../src/castore/backends/mapped-budget.js';
import type { B3Digest } from '../src/castore/digest.js';
import { removeDir, seededBytes, tempDir } from './helpers.js';

/** Resident bytes of this process's mappings of `file`. */
function residentOf(file: string): number {
  let inFile = false;
  let resident = 0;
  for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) inFile = line.endsWith(` ${file}`);
    else if (inFile && line.startsWith('Rss:')) resident += Number(/(\d+)/.exec(line)![1]) * 1024;
  }
  return resident;
}

test('reading every small blob of a store leaves at most a few budgets of its LMDB file mapped, and every read is right', async () => {
  const dir = tempDir('mapped-budget');
  const blobs = LocalStore.blobService(dir, { create: true });
  try {
    const count = 4000; // 4 KiB values take two LMDB pages each: a file of ~32 MiB
    const digests: B3Digest[] = [];
    for (let i = 0; i < count; i++) digests.push(await blobs.put!(seededBytes(4096, i + 1)));
    const file = realpathSync(join(dir, 'metadata', 'data.mdb'));
    assert.ok(statSync(file).size > 6 * MAPPED_METADATA_BUDGET, `data.mdb is ${statSync(file).size} bytes`);
    let peak = 0;
    for (let round = 0; round < 2; round++) {
      for (let i = 0; i < count; i++) {
        let got: Buffer | undefined;
        assert.ok(blobs.readInline!(digests[i], (contents) => (got = Buffer.from(contents))));
        assert.ok(got!.equals(seededBytes(4096, i + 1)), `blob ${i}, round ${round}`);
        if (i % 256 === 0) peak = Math.max(peak, residentOf(file));
      }
    }
    // The budget counts bytes read; the kernel maps up to 16 pages around each fault.
    assert.ok(peak <= 4 * MAPPED_METADATA_BUDGET, `${peak} bytes of data.mdb resident, budget ${MAPPED_METADATA_BUDGET}`);
  } finally {
    await blobs.close();
    removeDir(dir);
  }
});

test('a range is released only while it is a mapping of the file named', async () => {
  const { optionalNative } = await import('../src/native/index.js');
  const native = optionalNative()!;
  const dir = tempDir('mapped-range');
  const blobs = LocalStore.blobService(dir, { create: true });
  try {
    await blobs.put!(seededBytes(4096, 7));
    const file = realpathSync(join(dir, 'metadata', 'data.mdb'));
    const ranges = native.mappingsOf(file) as number[];
    assert.equal(ranges.length, 2, `one shared mapping of ${file}: ${ranges}`);
    const [start, end] = ranges;
    assert.equal(native.releaseMapping(file, start, end), end - start);
    const ESTALE = -(await import('node:os')).constants.errno.ESTALE;
    assert.equal(native.releaseMapping(file, start, end - 4096), ESTALE, 'a range that is not the whole mapping');
    assert.equal(native.releaseMapping(`${file}x`, start, end), ESTALE, 'another file');
    assert.equal(native.releaseMapping('/usr/bin/node', start, end), ESTALE);
  } finally {
    await blobs.close();
    removeDir(dir);
  }
});

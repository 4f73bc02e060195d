// The local store's PathInfo record (store/backends/local.ts): golden bytes. The record is
// msgpack of { v: 1, info, t }, keyed by the path's 20-byte digest; a change in its encoding
// (lmdb-js's msgpackr, or the PathInfo's shape) must show up here before it reaches a store.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { join } from 'node:path';
import { LocalStore } from '../src/castore/backends/local.js';
import { LocalPathInfoService } from '../src/store/backends/local.js';
import type { PathInfo } from '../src/store/pathinfo.js';
import { parseStorePath } from '../src/store/storepath.js';
import { removeDir, tempDir } from './helpers.js';

const PATH = parseStorePath('/nix/store/00000000000000000000000000000000-golden');
const INFO = {
  node: { kind: 'file', node: { name: Buffer.from('00000000000000000000000000000000-golden'), digest: Buffer.alloc(32, 1), size: 5, executable: false } },
  references: [],
  narSize: 120,
  narSha256: Buffer.alloc(32, 2),
  signatures: [{ name: 'k-1', data: Buffer.alloc(64, 3) }],
} as unknown as PathInfo;

/** The record of INFO without its registration time (`t`, which follows as its last field). */
const GOLDEN_PREFIX =
  'de0003a17601a4696e666fde0005a46e6f6465de0002a46b696e64a466696c65a46e6f6465de0004a46e616d65c427' +
  '30303030303030303030303030303030303030303030303030303030303030302d676f6c64656e' +
  'a6646967657374c420' + '01'.repeat(32) +
  'a473697a6505aa65786563757461626c65c2aa7265666572656e63657390a76e617253697a6578a96e6172536861323536c420' + '02'.repeat(32) +
  'aa7369676e61747572657391de0002a46e616d65a36b2d31a464617461c440' + '03'.repeat(64);
/** `t`: 1700000000 as msgpack (a uint32). */
const GOLDEN_TIME = 'a174ce6553f100';

test('a PathInfo record is written as the golden bytes, and golden bytes read back', async () => {
  const dir = tempDir('pathinfo-record');
  try {
    const store = join(dir, 'store');
    const before = Math.floor(Date.now() / 1000);
    const infos = new LocalPathInfoService(store);
    await infos.put(INFO);
    await infos.close();
    const { db, release } = LocalStore.metadataDb<Buffer>(store, 'pathinfos', { encoding: 'binary' });
    try {
      const written = db.getBinary(PATH.digest)!.toString('hex');
      assert.equal(written.slice(0, GOLDEN_PREFIX.length), GOLDEN_PREFIX);
      const time = written.slice(GOLDEN_PREFIX.length);
      assert.match(time, /^a174ce[0-9a-f]{8}$/);
      const t = parseInt(time.slice(6), 16);
      assert.ok(t >= before && t <= before + 60, `registration time ${t}`);
      await db.put(PATH.digest, Buffer.from(GOLDEN_PREFIX + GOLDEN_TIME, 'hex'));
    } finally {
      await release();
    }
    const again = new LocalPathInfoService(store);
    try {
      const read = [];
      for await (const entry of again.listWithTimes()) read.push(entry);
      assert.equal(read.length, 1);
      assert.equal(read[0]!.registeredAt, 1700000000);
      assert.deepEqual(read[0]!.info, INFO);
    } finally {
      await again.close();
    }
  } finally {
    removeDir(dir);
  }
});

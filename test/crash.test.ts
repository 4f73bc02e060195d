// Crash safety: processes writing into one local store at the same time are
// SIGKILLed at random points. Afterwards the store opens, holds no partial
// blob, every stored directory's closure is complete, and every root a
// writer reported as committed is there.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { LocalStore } from '../src/castore/backends/local.js';
import { ROOT, removeDir, seededRandom, tempDir, verifyLocalStore } from './helpers.js';

const WRITER = join(ROOT, 'test/fixtures/store-writer.ts');
const ROUNDS = 6;
const WRITERS_PER_ROUND = 2;

/** Runs a writer (its random choices from `seed`) and SIGKILLs it `killAfterMs` after it started writing. */
function runAndKill(store: string, seed: number, killAfterMs: number): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', WRITER, store, String(seed)], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => {
      out += d;
      if (out.startsWith('ready\n') && !child.killed) {
        setTimeout(() => child.kill('SIGKILL'), killAfterMs).unref();
        out = out.replace('ready\n', '');
      }
    });
    child.stderr.on('data', (d) => (err += d));
    child.on('close', (code, signal) => { // after stdout has ended: every report line read
      if (signal !== 'SIGKILL') return reject(new Error(`writer ended with ${code ?? signal}: ${err}`));
      // A line cut off by the kill is not a report of a commit.
      resolve(out.split('\n').filter((l) => /^committed [0-9a-f]{64}$/.test(l)).map((l) => l.slice(10)));
    });
  });
}

test('SIGKILLed writers leave a consistent store', { timeout: 180_000 }, async () => {
  const store = tempDir('crash');
  try {
    const committed: string[] = [];
    /** In which round and by which writer of it each root was reported committed (for a failure's message). */
    const reportedIn = new Map<string, string>();
    const random = seededRandom('SIGKILLed writers');
    for (let round = 0; round < ROUNDS; round++) {
      // Each writer killed somewhere between 50 ms and 1.5 s into its writing.
      const results = await Promise.all(Array.from({ length: WRITERS_PER_ROUND }, () => runAndKill(store, random.int(0, 2 ** 32), random.int(50, 1500))));
      results.forEach((roots, writer) => roots.forEach((root, i) => reportedIn.set(root, `round ${round + 1}, writer ${writer + 1}, its commit ${i + 1} of ${roots.length}`)));
      committed.push(...results.flat());
    }
    const state = await verifyLocalStore(store);
    assert.deepEqual(state.problems, []);
    assert.ok(state.blobs > 0 && state.directories > 0, `the writers wrote nothing (${JSON.stringify(state)})`);
    assert.ok(committed.length > 0, 'no writer committed a batch before being killed; the test proves nothing');

    const directories = LocalStore.directoryService(store);
    try {
      for (const root of committed) {
        let seen = 0;
        try {
          for await (const _ of directories.getRecursive(Buffer.from(root, 'hex'))) seen++;
        } catch (err) {
          const present = (await directories.get(Buffer.from(root, 'hex'))) !== undefined;
          throw new Error(
            `root ${root}, reported committed in ${reportedIn.get(root)} (${committed.length} reported in all), ` +
              `is ${present ? 'there but its closure is not' : 'not there'}: ${(err as Error).message}`,
            { cause: err },
          );
        }
        assert.ok(seen > 0);
      }
    } finally {
      await directories.close();
    }
    // Opening the store removed the temp files the killed writers left behind.
    assert.deepEqual(readdirSync(join(store, 'tmp')), []);
  } finally {
    removeDir(store);
  }
});

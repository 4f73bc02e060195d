// The request benchmark's workloads, at a small scale, against both back ends
// it compares: `nixcas virtiofs` and QEMU's C virtiofsd. Each reply is checked
// by the workload (bytes against the file, attributes against what each back
// end must say, listings entry by entry), so this is the proof that the fast
// paths (READ straight into the guest's pages through an indirect table,
// LOOKUP, GETATTR and READDIRPLUS without a promise, small blobs copied once
// out of LMDB, interrupts and kicks suppressed) answer what virtiofsd answers.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ensureVmPackages, MissingPackagesError } from '../vmtest/harness.js';
import { runVirtiofsRequests } from '../bench/virtiofs-requests.js';
import { CLI, removeDir, tempDir } from './helpers.js';

function skipReason(): string | undefined {
  if (process.getuid?.() !== 0) return "QEMU's virtiofsd needs root (as in CI)";
  try {
    ensureVmPackages();
  } catch (e) {
    if (e instanceof MissingPackagesError) return e.message;
    throw e;
  }
  return undefined;
}

test('every request workload gets right answers from nixcas and from virtiofsd, at depth 1 and 64', { skip: skipReason() }, async () => {
  const work = tempDir('nixcas-requests-test-');
  try {
    const { results, bufferedReads } = await runVirtiofsRequests(work, 1, CLI, 0.02, ['nixcas', 'virtiofsd', 'nixcas-metrics']);
    assert.equal(results.size, 12, 'six workloads at two depths');
    // Every READ is of bytes in the page cache or in LMDB: all go straight into the guest's pages,
    // the first 64 of a file new to the back end (depth 64) too.
    assert.deepEqual(bufferedReads, [0], 'READs read into a buffer of the back end (nixcas_fuse_buffered_reads_total)');
    for (const [key, measured] of results) {
      for (const side of ['nixcas', 'virtiofsd', 'nixcas-metrics'] as const) {
        assert.equal(measured.samples[side].length, 1, `${key}: ${side} ran`);
        assert.ok(measured.samples[side][0].requests > 0, `${key}: ${side} answered`);
      }
    }
  } finally {
    removeDir(work);
  }
});

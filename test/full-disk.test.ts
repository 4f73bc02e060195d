// A store whose file system fills up (issue #22, "full disk"): on a small
// tmpfs and on a small loop-mounted ext4, `nixcas import` fails with one line
// naming the store (`nixcas copy` likewise, per path), the daemon answers
// RESOURCE_EXHAUSTED and the nar-bridge 507 while both keep serving reads,
// writes work again once there is room, and every path registered before
// still renders its NAR. A substitution whose large files do not fit fails
// the same way and leaves no temp file.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { getBlob, putBlob } from '../src/castore/blobservice.js';
import { blake3 } from '../src/castore/digest.js';
import { StorageFullError } from '../src/castore/errors.js';
import { openBlobService } from '../src/services/addresses.js';
import * as nixbase32 from '../src/store/nixbase32.js';
import { nix, nixcas, nixcasBytes, removeDir, seededBytes, startDaemon, startNixcas, tempDir } from './helpers.js';

const skip = process.getuid?.() !== 0 ? 'mounting a small file system needs root (as in CI)' : undefined;
const MB = 1024 * 1024;

function run(command: string, args: string[]): void {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  assert.equal(result.status, 0, `${command} ${args.join(' ')}: ${result.stderr}`);
}

for (const kind of ['tmpfs', 'ext4'] as const) {
  test(`a full ${kind}: import fails in one line, the daemon and the bridge refuse the write and keep serving, and recover`, { skip }, async () => {
    const work = tempDir(`full-${kind}`);
    const mountpoint = join(work, 'fs');
    mkdirSync(mountpoint);
    if (kind === 'tmpfs') {
      run('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', mountpoint]);
    } else {
      const image = join(work, 'ext4.img');
      run('truncate', ['-s', '32M', image]);
      run('mkfs.ext4', ['-q', '-F', image]);
      run('mount', ['-o', 'loop', image, mountpoint]);
    }
    try {
      // Room to give back later: a file of ours on the same file system.
      const filler = join(mountpoint, 'filler');
      writeFileSync(filler, Buffer.alloc(6 * MB, 1));
      const store = join(mountpoint, 'store');

      const keep = join(work, 'keep');
      mkdirSync(keep);
      writeFileSync(join(keep, 'small'), 'registered before the disk filled\n');
      writeFileSync(join(keep, 'large'), seededBytes(300_000, 7));
      const kept = nixcas(['import', '--store', store, keep]);
      assert.equal(kept.status, 0, kept.stderr);
      const keptPath = kept.stdout.trim();

      // A tree larger than the space left.
      const big = join(work, 'big');
      mkdirSync(big);
      for (let i = 0; i < 3000; i++) writeFileSync(join(big, `f${i}`), seededBytes(10_000, 1000 + i));
      const failed = nixcas(['import', '--store', store, big]);
      assert.equal(failed.status, 1, 'the import fails');
      const message = failed.stderr.trim();
      assert.equal(message.split('\n').length, 1, `in one line: ${failed.stderr}`);
      assert.ok(message.includes(store), `naming the store: ${message}`);
      assert.match(message, /(full|No space left on device|ENOSPC)/, `and the cause: ${message}`);

      // The same tree from /nix/store through `nixcas copy`: each failed path in one line, then the summary.
      const added = nix('nix-store', ['--add', big]).toString().trim();
      try {
        const closure = nix('nix', ['--extra-experimental-features', 'nix-command', 'path-info', '--json', '--recursive', added]);
        const copied = nixcas(['copy', '--store', store, '-'], { input: closure });
        assert.equal(copied.status, 1, `the copy fails: ${copied.stderr}`);
        assert.doesNotMatch(copied.stderr, /\n\s+at /, 'without a stack trace');
        assert.match(copied.stderr, new RegExp(`nixcas copy: ${added}: .*${store}.*is its file system full`), copied.stderr);
        assert.match(copied.stderr, /0 copied .* 1 failed/);
      } finally {
        spawnSync('nix-store', ['--delete', added], { stdio: 'ignore' });
      }

      // Substituted from a binary cache Nix wrote: large files (written by the native ingest) that do not fit.
      const large = join(work, 'large');
      mkdirSync(large);
      for (let i = 0; i < 3; i++) writeFileSync(join(large, `l${i}`), seededBytes(9 * MB, 2000 + i));
      const largePath = nix('nix-store', ['--add', large]).toString().trim();
      try {
        const cache = join(work, 'cache');
        nix('nix', ['--extra-experimental-features', 'nix-command', '--option', 'substituters', '', 'copy', '--to', `file://${cache}?compression=zstd`, largePath]);
        const substituted = nixcas(['copy', '--store', store, '--from', `file://${cache}`, '--no-require-sigs', largePath]);
        assert.equal(substituted.status, 1, `the substitution fails: ${substituted.stderr}`);
        assert.doesNotMatch(substituted.stderr, /\n\s+at /, 'without a stack trace');
        assert.match(substituted.stderr, /No space left on device|is its file system full/, substituted.stderr);
        assert.deepEqual(readdirSync(join(store, 'tmp')), [], 'no temp file left in the store');
        assert.notEqual(nixcas(['path-info', '--store', store, largePath]).status, 0, 'nothing registered');
      } finally {
        spawnSync('nix-store', ['--delete', largePath], { stdio: 'ignore' });
      }

      const socket = join(work, 'd.sock');
      const daemon = await startDaemon(['--store', store, '--listen', socket]);
      const blobs = await openBlobService(`grpc+unix://${socket}`);
      const bridge = await startNixcas(['nar-bridge', '--store', store, '--listen', '127.0.0.1:0', '--allow-upload'], 'listening on');
      try {
        let refused: unknown;
        for (let i = 0; i < 5000 && !refused; i++) await putBlob(blobs, seededBytes(10_000, 100_000 + i)).catch((err: unknown) => (refused = err));
        assert.ok(refused instanceof StorageFullError, `a Put on the full store: RESOURCE_EXHAUSTED (${String(refused)})`);
        const small = Buffer.from('registered before the disk filled\n');
        assert.ok((await getBlob(blobs, blake3(small)))!.equals(small), 'the daemon still serves reads');

        const port = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(bridge.output())![1];
        const nar = nix('nix-store', ['--dump', big]);
        const upload = await fetch(`http://127.0.0.1:${port}/nar/${nixbase32.encode(createHash('sha256').update(nar).digest())}.nar`, { method: 'PUT', body: new Uint8Array(nar) });
        assert.equal(upload.status, 507, `the bridge refuses the upload: ${await upload.text()}`);
        const hash = keptPath.slice('/nix/store/'.length, '/nix/store/'.length + 32);
        assert.equal((await fetch(`http://127.0.0.1:${port}/${hash}.narinfo`)).status, 200, 'and still serves narinfos');

        rmSync(filler);
        const later = seededBytes(10_000, 999_999);
        await putBlob(blobs, later);
        assert.ok((await getBlob(blobs, blake3(later)))!.equals(later), 'once there is room, Put works again');
      } finally {
        await blobs.close();
        await daemon.stop();
        await bridge.stop();
      }
      assert.ok(nixcasBytes(['nar', '--store', store, keptPath]).equals(nix('nix-store', ['--dump', keep])), 'the path registered before renders its NAR');
      const verified = nixcas(['verify', '--store', store, '--check-contents']);
      assert.equal(verified.status, 0, `and the store verifies: ${verified.stderr}`);
    } finally {
      spawnSync('umount', [mountpoint]);
      removeDir(work);
    }
  });
}

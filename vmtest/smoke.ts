// npm run vmtest:smoke [-- --install] [-- --verbose]
//
// End-to-end check of the VM harness against QEMU's reference virtiofsd: share a small tree, boot a
// guest, mount it read-only over virtio-fs, and compare what the guest sees with the host.
// --install lets the harness apt-get missing packages (as root); --verbose streams the console.

import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { atExit, type Backend, bootGuest, type BootResult, buildInitramfs, BUSYBOX, ensureVmPackages, MissingPackagesError, startVirtiofsd, VmError } from './harness.js';

const TAG = 'nixstore';
const FILES = ['hello.txt', 'bin/hello.sh', 'bin/busybox', 'dir/nested/deep.txt'];

const GUEST_SCRIPT = `set -e
capture mount mount -t virtiofs -o ro ${TAG} /mnt
capture mounts grep ' /mnt ' /proc/mounts
capture ls ls -laR /mnt
capture find sh -c 'cd /mnt && find . | sort'
for f in ${FILES.join(' ')}; do
  result "sha256:$f" "$(sha256sum /mnt/$f | cut -d ' ' -f 1)"
  result "stat:$f" "$(stat -c '%a %s' /mnt/$f)"
done
result readlink "$(readlink /mnt/link-to-hello)"
result via-link "$(cat /mnt/link-to-hello)"
capture script /mnt/bin/hello.sh one two
capture busybox /mnt/bin/busybox echo hello from the shared busybox
capture write sh -c 'echo x > /mnt/new-file' || true
capture umount umount /mnt
`;

async function main(): Promise<number> {
  const args = process.argv.slice(2);
  if (args.includes('--verbose')) process.env.VMTEST_VERBOSE = '1';
  ensureVmPackages({ install: args.includes('--install') ? true : undefined });

  // process.exit() runs the harness's exit hooks, which kill QEMU and virtiofsd and remove temporary files.
  for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => process.exit(130));

  const work = mkdtempSync(join(tmpdir(), 'nixcas-smoke-'));
  const removeWork = () => rmSync(work, { recursive: true, force: true });
  const forgetWork = atExit(removeWork);
  let backend: Backend | undefined;
  try {
    const share = join(work, 'share');
    makeShare(share);

    let t = performance.now();
    backend = await startVirtiofsd({ source: share, socketPath: join(work, 'virtiofsd.sock'), cache: 'always' });
    const backendMs = performance.now() - t;

    t = performance.now();
    const initramfs = buildInitramfs({ guestScript: GUEST_SCRIPT });
    const initramfsMs = performance.now() - t;

    const result = await bootGuest({ initramfs, backend, virtiofsTag: TAG, memoryMiB: 512, timeoutMs: 120_000 });

    const failures = check(result, share);
    const ms = (n: number) => `${(n / 1000).toFixed(2)} s`;
    const tm = result.timings;
    console.log(`virtiofsd ready in ${ms(backendMs)}; initramfs ${initramfs.cached ? 'from cache' : 'built'} in ${ms(initramfsMs)}`);
    console.log(`boot (QEMU start to /init) ${ms(tm.kernelMs)}, modules ${ms(tm.modulesMs)}, guest commands ${ms(tm.scriptMs)}, power-off ${ms(tm.shutdownMs)}; total ${ms(tm.totalMs)}`);
    if (failures.length > 0) {
      console.log(`\n--- console ---\n${result.output}\n--- virtiofsd ---\n${backend.output()}`);
      console.log(`\nvmtest smoke: FAILED (${failures.length} checks)`);
      return 1;
    }
    console.log('vmtest smoke: ok');
    return 0;
  } finally {
    await backend?.stop();
    forgetWork();
    removeWork();
  }
}

// A text file, a script, a static binary, a symlink and a nested directory.
function makeShare(share: string): void {
  mkdirSync(join(share, 'bin'), { recursive: true });
  mkdirSync(join(share, 'dir', 'nested'), { recursive: true });
  writeFileSync(join(share, 'hello.txt'), 'hello from the host\n');
  writeFileSync(join(share, 'bin', 'hello.sh'), '#!/bin/sh\necho "script ran with: $*"\n');
  chmodSync(join(share, 'bin', 'hello.sh'), 0o755);
  copyFileSync(BUSYBOX, join(share, 'bin', 'busybox'));
  chmodSync(join(share, 'bin', 'busybox'), 0o755);
  writeFileSync(join(share, 'dir', 'nested', 'deep.txt'), 'x'.repeat(100_000));
  symlinkSync('hello.txt', join(share, 'link-to-hello'));
}

/** Compares the guest's results with the host's view of the share; prints each check, returns the failed ones. */
function check(r: BootResult, share: string): string[] {
  const failures: string[] = [];
  const expect = (name: string, actual: string | undefined, expected: string | ((v: string) => boolean)) => {
    const ok = typeof expected === 'string' ? actual === expected : actual !== undefined && expected(actual);
    console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${ok ? '' : `: got ${JSON.stringify(actual)}${typeof expected === 'string' ? `, expected ${JSON.stringify(expected)}` : ''}`}`);
    if (!ok) failures.push(name);
  };
  const res = r.results;
  expect('guest script exit status', String(r.exitStatus), '0');
  expect('mount -t virtiofs', res['mount.rc'], '0');
  expect('mounted read-only as virtiofs', res['mounts.out'], (v) => v.startsWith(`${TAG} /mnt virtiofs ro,`));
  expect('find lists the tree', res['find.out'], hostListing(share).join('\n'));
  for (const f of FILES) {
    const path = join(share, f);
    expect(`sha256 ${f}`, res[`sha256:${f}`], createHash('sha256').update(readFileSync(path)).digest('hex'));
    const st = lstatSync(path);
    expect(`mode and size ${f}`, res[`stat:${f}`], `${(st.mode & 0o7777).toString(8)} ${st.size}`);
  }
  expect('readlink', res.readlink, 'hello.txt');
  expect('read through the symlink', res['via-link'], 'hello from the host');
  expect('script runs from the mount', res['script.out'], 'script ran with: one two');
  expect('static binary runs from the mount', res['busybox.out'], 'hello from the shared busybox');
  expect('writing is refused', res['write.rc'], (v) => v !== '0');
  expect('umount', res['umount.rc'], '0');
  return failures;
}

// What `cd share && find . | sort` prints.
function hostListing(share: string): string[] {
  const out = ['.'];
  const walk = (dir: string, rel: string) => {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      out.push(`${rel}/${name}`);
      if (lstatSync(path).isDirectory()) walk(path, `${rel}/${name}`);
    }
  };
  walk(share, '.');
  return out.sort();
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    // The harness's own errors carry everything useful (console, QEMU and backend output) in the message.
    const known = error instanceof MissingPackagesError || error instanceof VmError;
    console.error(error instanceof Error ? (known ? `${error.name}: ${error.message}` : (error.stack ?? error.message)) : error);
    process.exit(1);
  },
);

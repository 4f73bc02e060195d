// `nixcas virtiofs` against its real peers: QEMU's vhost-user-fs-pci front end and a Linux guest's
// virtiofs driver, booted under TCG by the vmtest harness. The guest mounts the store at
// /nix/store and reports what it sees; every entry is compared with the trees that were imported.
//
// One daemon serves a VM, then two at once (they see a path imported after the first one left);
// another daemon, without --list-root and with two request queues, serves a fourth. The guest
// script is the same for every boot (one cached initramfs): what to look at comes on the kernel
// command line.
//
// NIXCAS_VMTEST_BACKEND=virtiofsd runs the same checks against QEMU's reference virtiofsd sharing
// a plain copy of the store paths, to check the test itself.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmodSync, copyFileSync, existsSync, lstatSync, lutimesSync, mkdirSync, readdirSync, readFileSync, readlinkSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import {
  type Backend, bootGuest, type BootResult, buildInitramfs, BUSYBOX, ensureVmPackages, type Initramfs, MissingPackagesError, QEMU,
  readdirProbeFile, startNixcasVirtiofs, startVirtiofsd,
} from '../vmtest/harness.js';
import { CLI, freePort, nixcas, removeDir, tempDir } from './helpers.js';

const TAG = 'nixstore';
const REFERENCE = process.env.NIXCAS_VMTEST_BACKEND === 'virtiofsd';
const NON_UTF8 = Buffer.from('caf\xe9-\xff\xfe.txt', 'latin1'); // Latin-1 "é" and two bytes that are never UTF-8
const BIG_BYTES = 4 * 1024 * 1024 + 4321;
const BOOT_TIMEOUT_MS = 60_000; // a boot takes 4-6 s on 2 busy cores

const S_IFMT = 0o170000;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;

/**
 * The guest script. Kernel arguments say what to do: nixcas.paths=A,B (store path basenames whose
 * every entry is reported) and nixcas.tree=T (the tree whose programs are run). Entries travel as
 * one hex-encoded manifest, so names that are not UTF-8 arrive byte for byte.
 */
const GUEST_SCRIPT = `set -e
TAB=$(printf '\\t')
arg() {
  for _a in $(cat /proc/cmdline); do
    case $_a in "$1="*) echo "\${_a#*=}" ;; esac
  done
}
paths=$(arg nixcas.paths | tr , ' ')
tree=$(arg nixcas.tree)

mkdir -p /nix/store
capture mount mount -t virtiofs -o ro ${TAG} /nix/store
capture mounts grep ' /nix/store ' /proc/mounts
result root.stat "$(stat -c '%a %u %g' /nix/store)"
capture ls ls -1 /nix/store || true
# busybox ls ignores readdir errors; the probe's exit status is the errno (EPERM is 1).
capture readdir /vmtest/readdir /nix/store || true
capture missing stat /nix/store/00000000000000000000000000000000-not-there || true

# Per entry: "E path rawmode(hex) size uid gid mtime"; "<sha256>  path" per file; "L path target" per symlink.
{
  for p in $paths; do
    find "/nix/store/$p" -exec stat -c "E\${TAB}%n\${TAB}%f\${TAB}%s\${TAB}%u\${TAB}%g\${TAB}%Y" {} +
    find "/nix/store/$p" -type f -exec sha256sum {} +
    find "/nix/store/$p" -type l | while IFS= read -r l; do printf 'L\\t%s\\t%s\\n' "$l" "$(readlink "$l")"; done
  done
} > /tmp/manifest 2> /tmp/manifest.err || result manifest.failed "$?"
while IFS= read -r line; do result manifest.err "$line"; done < /tmp/manifest.err
{ od -An -v -tx1 /tmp/manifest | tr -d ' \\n' | fold -w 1000; echo; } | while read -r hex; do
  if [ -n "$hex" ]; then result manifest "$hex"; fi
done

if [ -n "$tree" ]; then
  t=/nix/store/$tree
  capture busybox $t/bin/busybox echo a static busybox runs from the store
  capture applet $t/bin/sh -c 'echo busybox as "\${0##*/}" through a relative symlink'
  capture script $t/bin/hello one two
  capture crosslink cat $t/dep-link
  capture nested cat $t/nested/a/b/c/deep.txt
  capture write touch $t/new-file || true
fi
capture umount umount /nix/store
`;

interface Entry {
  mode: number;
  /** Omitted for directories (their size is the backend's choice). */
  size?: number;
  uid: number;
  gid: number;
  mtime: number;
  sha256?: string;
  target?: string;
}

/** Guest paths as latin1 strings (one char per byte), so non-UTF-8 names compare exactly. */
type Manifest = Map<string, Entry>;

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** A tree with every kind of entry a store path holds. `dep` is a store path the tree links to. */
function makeTree(root: string, dep: string): void {
  mkdirSync(join(root, 'bin'), { recursive: true });
  copyFileSync(BUSYBOX, join(root, 'bin/busybox'));
  chmodSync(join(root, 'bin/busybox'), 0o755);
  symlinkSync('busybox', join(root, 'bin/sh'));
  writeFileSync(join(root, 'bin/hello'), '#!/bin/sh\necho "hello from the store: $*"\n', { mode: 0o755 });
  mkdirSync(join(root, 'share/doc'), { recursive: true });
  writeFileSync(join(root, 'share/doc/readme.txt'), 'a tree served over virtio-fs\n');
  writeFileSync(join(root, 'share/empty-file'), '');
  mkdirSync(join(root, 'share/empty-dir'));
  mkdirSync(join(root, 'nested/a/b/c'), { recursive: true });
  writeFileSync(join(root, 'nested/a/b/c/deep.txt'), 'deep down\n');
  writeFileSync(join(root, 'big.bin'), randomBytes(BIG_BYTES));
  mkdirSync(join(root, 'links'));
  symlinkSync('../share/doc/readme.txt', join(root, 'links/relative'));
  symlinkSync('/etc/hostname', join(root, 'links/absolute'));
  symlinkSync('does/not/exist', join(root, 'links/dangling'));
  symlinkSync(`/nix/store/${dep}`, join(root, 'dep-link'));
  writeFileSync(Buffer.concat([Buffer.from(`${root}/`), NON_UTF8]), 'a name that is not UTF-8\n');
}

/** What the guest must see below /nix/store/BASE for the imported source tree at SOURCE. */
function expectedManifest(base: string, source: string, symlinkMode: number): Manifest {
  const out: Manifest = new Map();
  const walk = (host: Buffer, guest: string) => {
    const st = lstatSync(host);
    const common = { uid: 0, gid: 0, mtime: 1 };
    if (st.isSymbolicLink()) {
      const target = readlinkSync(host, { encoding: 'buffer' });
      out.set(guest, { ...common, mode: S_IFLNK | symlinkMode, size: target.length, target: target.toString('latin1') });
    } else if (st.isDirectory()) {
      out.set(guest, { ...common, mode: S_IFDIR | 0o555 });
      for (const name of readdirSync(host, { encoding: 'buffer' })) {
        walk(Buffer.concat([host, Buffer.from('/'), name]), `${guest}/${name.toString('latin1')}`);
      }
    } else {
      const data = readFileSync(host);
      out.set(guest, { ...common, mode: S_IFREG | (st.mode & 0o100 ? 0o555 : 0o444), size: data.length, sha256: sha256(data) });
    }
  };
  walk(Buffer.from(source), `/nix/store/${base}`);
  return out;
}

/** Decodes the guest's hex manifest. */
function guestManifest(r: BootResult): Manifest {
  const bytes = Buffer.from((r.results.manifest ?? '').replace(/\n/g, ''), 'hex');
  const out: Manifest = new Map();
  const hashes = new Map<string, string>();
  const targets = new Map<string, string>();
  for (const line of bytes.toString('latin1').split('\n')) {
    if (line === '') continue;
    const fields = line.split('\t');
    if (fields[0] === 'E' && fields.length === 7) {
      const [, path, rawMode, size, uid, gid, mtime] = fields;
      const mode = parseInt(rawMode, 16);
      out.set(path, { mode, ...((mode & S_IFMT) === S_IFDIR ? {} : { size: Number(size) }), uid: Number(uid), gid: Number(gid), mtime: Number(mtime) });
    } else if (fields[0] === 'L' && fields.length === 3) {
      targets.set(fields[1], fields[2]);
    } else if (/^[0-9a-f]{64}  /.test(line)) {
      hashes.set(line.slice(66), line.slice(0, 64));
    } else {
      assert.fail(`unexpected manifest line ${JSON.stringify(line)}`);
    }
  }
  for (const [path, hash] of hashes) if (out.has(path)) out.get(path)!.sha256 = hash;
  for (const [path, target] of targets) if (out.has(path)) out.get(path)!.target = target;
  return out;
}

/** Compares entry by entry, so a failure names the paths that differ rather than dumping both maps. */
function assertManifest(actual: Manifest, expected: Manifest, r: BootResult): void {
  const show = (path: string) => JSON.stringify(Buffer.from(path, 'latin1').toString());
  const format = (e: Entry) => JSON.stringify({ mode: e.mode.toString(8), size: e.size, uid: e.uid, gid: e.gid, mtime: e.mtime, sha256: e.sha256, target: e.target });
  const err = r.results['manifest.err'];
  assert.ok(err === undefined && r.results['manifest.failed'] === undefined, `the guest's find/stat/sha256sum/readlink failed:\n${err}`);
  const problems: string[] = [];
  for (const [path, entry] of expected) {
    const seen = actual.get(path);
    if (!seen) problems.push(`missing in the guest: ${show(path)}`);
    else if (format(seen) !== format(entry)) problems.push(`${show(path)}:\n  guest    ${format(seen)}\n  expected ${format(entry)}`);
  }
  for (const path of actual.keys()) if (!expected.has(path)) problems.push(`unexpected in the guest: ${show(path)}`);
  if (problems.length > 0) assert.fail(`the guest's view differs from the imported trees:\n${problems.join('\n')}`);
}

function lines(value: string | undefined): string[] {
  return value === undefined ? [] : value.split('\n');
}

function importPath(store: string, path: string): string {
  const run = nixcas(['import', '--store', store, path]);
  assert.equal(run.status, 0, run.stderr);
  const storePath = run.stdout.trim();
  assert.match(storePath, /^\/nix\/store\/[0-9a-z]{32}-/);
  return storePath.slice('/nix/store/'.length);
}

/** Why the suite cannot run here, or undefined. Missing packages are installed when the harness may (root with $CI). */
function skipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'the microVM test runs as root, as in CI (it may apt-get QEMU and the kernel; the reference run starts virtiofsd)';
  try {
    ensureVmPackages();
  } catch (e) {
    if (e instanceof MissingPackagesError) return e.message;
    throw e;
  }
  const probe = spawnSync(QEMU, ['-version'], { encoding: 'utf8' });
  if (probe.status !== 0) return `${QEMU} cannot run here: ${probe.error?.message ?? probe.stderr.trim()}`;
  return undefined;
}

const skip = skipReason();

describe(`${REFERENCE ? 'virtiofsd (reference run)' : 'nixcas virtiofs'}: microVM guests mount the store over virtio-fs`, { skip }, () => {
  let work = '';
  let store = '';
  let initramfs: Initramfs;
  let dep = '';
  let tree = '';
  let link = '';
  let treeSource = '';
  const sources = new Map<string, string>(); // store path basename → imported source
  let listing: Backend | undefined; // serves the boots of the first two tests
  let unlisted: Backend | undefined;
  let reference = ''; // REFERENCE: the plain directory virtiofsd shares

  /** REFERENCE only: copy an imported source into the shared directory with the store's modes and mtime. */
  function materialize(base: string): void {
    const dest = join(reference, base);
    // cp, not cpSync: Node's copy goes through string names and would mangle the non-UTF-8 one.
    const cp = spawnSync('cp', ['-a', sources.get(base)!, dest], { encoding: 'utf8' });
    assert.equal(cp.status, 0, cp.stderr);
    const fix = (path: Buffer) => {
      const st = lstatSync(path);
      if (st.isDirectory()) for (const name of readdirSync(path, { encoding: 'buffer' })) fix(Buffer.concat([path, Buffer.from('/'), name]));
      if (!st.isSymbolicLink()) chmodSync(path, st.isDirectory() || st.mode & 0o100 ? 0o555 : 0o444);
      lutimesSync(path, 1, 1);
    };
    fix(Buffer.from(dest));
  }

  function add(path: string): string {
    const base = importPath(store, path);
    sources.set(base, path);
    if (REFERENCE) materialize(base);
    return base;
  }

  async function serve(listRoot: boolean, name: string, numRequestQueues?: number): Promise<Backend> {
    const socketPath = join(work, `${name}.sock`);
    if (REFERENCE) return startVirtiofsd({ source: reference, socketPath, cache: 'always' });
    assert.ok(existsSync(CLI), `${CLI} is missing: run npm run build`);
    const port = await freePort();
    const backend = await startNixcasVirtiofs({ socketPath, store, listRoot, numRequestQueues, extraArgs: ['--metrics-listen', `127.0.0.1:${port}`] });
    metricsPorts.set(backend, port);
    return backend;
  }
  const metricsPorts = new Map<Backend, number>();

  /** What a nixcas back end has counted (Prometheus text), by metric name without labels. */
  async function metric(backend: Backend, name: string): Promise<number> {
    const text = await (await fetch(`http://127.0.0.1:${metricsPorts.get(backend)}/metrics`)).text();
    return Number(new RegExp(`^${name} (\\d+)`, 'm').exec(text)?.[1]);
  }

  /** virtiofsd serves one VM and exits; nixcas must still be there. */
  async function running(backend: Backend, listRoot: boolean, name: string): Promise<Backend> {
    const alive = backend.process.exitCode === null && backend.process.signalCode === null;
    if (REFERENCE && !alive) return serve(listRoot, name);
    assert.ok(alive, `nixcas virtiofs exited (${backend.process.exitCode ?? backend.process.signalCode}) after the first VM disconnected:\n${backend.output()}`);
    return backend;
  }

  async function boot(t: TestContext, backend: Backend, paths: string[], numRequestQueues?: number): Promise<BootResult> {
    const kernelArgs = [`nixcas.paths=${paths.join(',')}`, `nixcas.tree=${tree}`];
    const r = await bootGuest({ initramfs, backend, virtiofsTag: TAG, numRequestQueues, memoryMiB: 512, timeoutMs: BOOT_TIMEOUT_MS, kernelArgs });
    const tm = r.timings;
    const s = (ms: number) => `${(ms / 1000).toFixed(2)} s`;
    t.diagnostic(`VM: kernel boot ${s(tm.kernelMs)}, modules ${s(tm.modulesMs)}, guest script ${s(tm.scriptMs)}, total ${s(tm.totalMs)}`);
    return r;
  }

  function expected(bases: string[]): Manifest {
    const out: Manifest = new Map();
    for (const base of bases) for (const [k, v] of expectedManifest(base, sources.get(base)!, REFERENCE ? 0o777 : 0o444)) out.set(k, v);
    return out;
  }

  /** Checks shared by every boot that mounted the store and ran the tree's programs. */
  function assertCommon(r: BootResult, backend: Backend): void {
    const res = r.results;
    const why = `--- backend ---\n${backend.output()}\n--- console ---\n${r.output}`;
    assert.equal(res['mount.rc'], '0', `mount -t virtiofs failed: ${res['mount.out']}\n${why}`);
    assert.match(res['mounts.out'] ?? '', new RegExp(`^${TAG} /nix/store virtiofs ro[, ]`), why);
    assert.equal(res['root.stat'], '555 0 0', why);
    assert.notEqual(res['missing.rc'], '0', 'a path that is not in the store was found');
    assert.match(res['missing.out'] ?? '', /No such file or directory/);
    assert.equal(res['busybox.rc'], '0', `the static busybox did not run from the store: ${res['busybox.out']}\n${why}`);
    assert.equal(res['busybox.out'], 'a static busybox runs from the store');
    assert.equal(res['applet.out'], 'busybox as sh through a relative symlink');
    assert.equal(res['script.out'], 'hello from the store: one two');
    assert.equal(res['crosslink.out'], readFileSync(sources.get(dep)!, 'utf8').trimEnd(), 'reading through an absolute symlink into another store path');
    assert.equal(res['nested.out'], 'deep down');
    assert.notEqual(res['write.rc'], '0', 'touch on the read-only mount succeeded');
    assert.match(res['write.out'] ?? '', /Read-only file system/);
    assert.equal(res['umount.rc'], '0', `umount failed: ${res['umount.out']}\n${why}`);
    assert.equal(r.exitStatus, 0, `guest script failed\n${why}`);
    assert.doesNotMatch(r.output, /WARNING:|BUG:|Oops|Call Trace|virtio.?fs\b.*\b(error|fail)/i, `the guest kernel complained\n${why}`);
    if (!REFERENCE) {
      const complaints = backend.output().split('\n').filter((line) => !line.includes('listening on') && /\b(error|warn(ing)?|fail(ed|ure)?|rejected|uncaught|EIO)\b/i.test(line));
      assert.deepEqual(complaints, [], `nixcas virtiofs complained:\n${backend.output()}`);
    }
  }

  before(async () => {
    work = tempDir('virtiofs-vm');
    store = join(work, 'store');
    reference = join(work, 'shared');
    if (REFERENCE) mkdirSync(reference, { mode: 0o555 });
    const src = join(work, 'src');
    mkdirSync(src);
    writeFileSync(join(src, 'dep.txt'), 'a store path that is a single file\n');
    dep = add(join(src, 'dep.txt'));
    treeSource = join(src, 'tree');
    makeTree(treeSource, dep);
    tree = add(treeSource);
    symlinkSync(`/nix/store/${tree}/share/doc/readme.txt`, join(src, 'readme-link'));
    link = add(join(src, 'readme-link')); // a store path that is a symlink
    initramfs = buildInitramfs({ guestScript: GUEST_SCRIPT, extraFiles: [readdirProbeFile()] });
    listing = await serve(true, 'listing');
  });

  after(async () => {
    try {
      for (const backend of [listing, unlisted]) {
        if (!backend) continue;
        const alreadyExited = backend.process.exitCode !== null || backend.process.signalCode !== null;
        await backend.stop();
        if (!REFERENCE && !alreadyExited) {
          assert.equal(backend.process.exitCode, 0, `nixcas virtiofs did not exit 0 on SIGTERM (${backend.process.exitCode ?? backend.process.signalCode}):\n${backend.output()}`);
          assert.ok(!existsSync(backend.socketPath), 'the socket file is left behind');
        }
      }
    } finally {
      removeDir(work);
    }
  });

  test('a VM lists /nix/store and sees every entry as imported: hashes, modes, symlinks, a non-UTF-8 name; programs run; umount', async (t) => {
    const r = await boot(t, listing!, [dep, tree, link]);
    assertCommon(r, listing!);
    assert.equal(r.results['ls.rc'], '0', `ls /nix/store failed: ${r.results['ls.out']}`);
    assert.equal(r.results['readdir.rc'], '0', 'reading /nix/store with getdents64 failed');
    assert.deepEqual(lines(r.results['ls.out']).sort(), [dep, tree, link].sort());

    const seen = guestManifest(r);
    assertManifest(seen, expected([dep, tree, link]), r);
    // Spelled out, though the manifest covers them: the odd name byte for byte, the big file, the links.
    const odd = `/nix/store/${tree}/${NON_UTF8.toString('latin1')}`;
    assert.ok(seen.has(odd), `the non-UTF-8 name is not listed as ${NON_UTF8.toString('hex')}`);
    assert.equal(seen.get(`/nix/store/${tree}/big.bin`)?.sha256, sha256(readFileSync(join(treeSource, 'big.bin'))));
    assert.equal(seen.get(`/nix/store/${tree}/bin/busybox`)?.mode, S_IFREG | 0o555);
    assert.equal(seen.get(`/nix/store/${tree}/links/dangling`)?.target, 'does/not/exist');
    assert.equal(seen.get(`/nix/store/${link}`)?.target, `/nix/store/${tree}/share/doc/readme.txt`);
  });

  test("the first VM's repeated GETATTRs and its READs after a file's first were answered natively", { skip: REFERENCE && 'virtiofsd has no such path' }, async () => {
    // Counted over the VM of the test before (tests in a describe run in order): the bytes
    // sha256sum saw there, big.bin's among them, were checked against the imported tree.
    assert.ok((await metric(listing!, 'nixcas_fuse_native_answers_total')) > 0, 'no request of the Linux guest was answered natively');
  });

  test('two more VMs at once on the same running backend see a path imported after the first VM left', async (t) => {
    const src = join(work, 'later');
    mkdirSync(join(src, 'bin'), { recursive: true });
    writeFileSync(join(src, 'bin/later'), '#!/bin/sh\necho later\n', { mode: 0o755 });
    writeFileSync(join(src, 'notes'), 'imported while the daemon was serving\n');
    const later = add(src);
    listing = await running(listing!, true, 'listing-2');
    // virtiofsd serves one front end, so the reference run boots them one after the other.
    const backend = listing;
    const boots = REFERENCE
      ? [await boot(t, backend, [later, tree]), await boot(t, (listing = await serve(true, 'listing-3')), [later, tree])]
      : await Promise.all([boot(t, backend, [later, tree]), boot(t, backend, [later, tree])]);
    for (const r of boots) {
      assertCommon(r, REFERENCE ? listing : backend);
      assert.deepEqual(lines(r.results['ls.out']).sort(), [dep, tree, link, later].sort());
      assertManifest(guestManifest(r), expected([later, tree]), r);
    }
  });

  test('without --list-root, with 2 request queues: listing /nix/store fails, looking paths up works', { skip: REFERENCE && 'virtiofsd cannot refuse listing its root' }, async (t) => {
    unlisted = await serve(false, 'unlisted', 2);
    const r = await boot(t, unlisted, [dep, tree], 2);
    assertCommon(r, unlisted);
    assert.equal(r.results['ls.out'], undefined, 'ls /nix/store listed names without --list-root');
    assert.equal(r.results['readdir.rc'], '1', 'getdents64 on /nix/store did not fail with EPERM (the exit status is the errno)');
    assertManifest(guestManifest(r), expected([dep, tree]), r);
  });
});

// The guest's root filesystem: an uncompressed initramfs with static busybox, the virtio-fs modules,
// an /init that loads them and runs the test's guest script, and the script itself.
//
// Uncompressed on purpose: a few MB unpack faster than the guest (under TCG) could decompress them.

import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, renameSync, statSync, unlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CpioWriter } from './cpio.js';
import { bootImage, DEFAULT_MODULES, findKernel, type Kernel, type ModuleFile, readModule, resolveModules } from './kernel.js';
import { BUSYBOX } from './packages.js';

/** Bump when the layout or the scripts below change in a way the cache key would not notice. */
const FORMAT = 'vmtest-initramfs-1';

/** Old cached images (initramfs and vmlinux) are deleted when a new one is written and they have not been used for this long. */
const CACHE_MAX_AGE_MS = 7 * 24 * 3600 * 1000;

export interface ExtraFile {
  /** Absolute path inside the guest, e.g. "/opt/tool". */
  path: string;
  /** The bytes, or else hostPath: a host file to copy in. */
  content?: Buffer | string;
  hostPath?: string;
  /** Defaults to 0o755 for hostPath files, 0o644 for content. */
  mode?: number;
}

export interface InitramfsOptions {
  /** Shell (busybox ash) run as root after the modules are loaded; see GUEST_LIB for the helpers it can call. */
  guestScript: string;
  extraFiles?: ExtraFile[];
  /** Module names to load (dependencies are added). Defaults to DEFAULT_MODULES. */
  modules?: string[];
  /** Defaults to $NIXCAS_VMTEST_CACHE or node_modules/.cache/nixcas-vmtest in the repository. */
  cacheDir?: string;
}

export interface Initramfs {
  path: string;
  /** The kernel whose modules are inside; boot this one. */
  kernel: Kernel;
  /** The file to give QEMU's -kernel: an extracted vmlinux (PVH boot), else the bzImage. */
  kernelImage: string;
  /** True when the image came from the cache. */
  cached: boolean;
}

/**
 * Helpers defined for the guest script. fd 9 is the results channel: the second serial port,
 * which QEMU writes to a host file. Kernel messages only go to the console (ttyS0), so results
 * never interleave with them.
 */
const GUEST_LIB = `# vmtest helpers, sourced before the guest script.

# result KEY VALUE...: report a result to the host (KEY must not contain spaces).
# A key reported more than once is joined with newlines on the host.
result() {
  _key=$1; shift
  printf 'RESULT %s %s\\n' "$_key" "$*" >&9
}

# uptime_cs: the guest's uptime in centiseconds (the resolution of /proc/uptime).
uptime_cs() {
  read -r _up _idle < /proc/uptime
  # "12.05" -> 12*100 + (105-100); the leading 1 keeps "05" from being read as octal.
  echo $(( \${_up%.*} * 100 + 1\${_up#*.} - 100 ))
}

# capture KEY CMD...: run CMD, echo it and its output to the console, and report KEY.rc (exit status),
# KEY.ms (wall time, 10 ms resolution) and KEY.out (stdout and stderr, one result per line).
# Returns CMD's status, so "set -e" scripts stop at a failing command.
capture() {
  _ckey=$1; shift
  echo "+ $*"
  _t0=$(uptime_cs)
  _rc=0
  _out=$("$@" 2>&1) || _rc=$?
  _t1=$(uptime_cs)
  result "$_ckey.rc" "$_rc"
  result "$_ckey.ms" "$(( (_t1 - _t0) * 10 ))"
  if [ -n "$_out" ]; then
    printf '%s\\n' "$_out"
    printf '%s\\n' "$_out" | while IFS= read -r _line; do result "$_ckey.out" "$_line"; done
  fi
  return $_rc
}
`;

/** PID 1. Markers carry a per-boot nonce from the kernel command line, so no file content can fake them. */
function initScript(modules: ModuleFile[]): string {
  return `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# The kernel does not mount devtmpfs for an initramfs; /dev/console is in the archive so PID 1 has stdio before this.
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /mnt /root

nonce=
for arg in $(cat /proc/cmdline); do
  case $arg in vmtest.nonce=*) nonce=\${arg#vmtest.nonce=} ;; esac
done

marker() {
  read -r up idle < /proc/uptime
  echo "VMTEST-$nonce $* uptime=$up"
}

# The results port is opened and closed here: the last close waits until the UART has sent
# everything, so nothing is lost to the power-off that follows.
finish() {
  echo "VMTEST-$nonce $*" > /dev/ttyS1
  marker "$@"
  sync
  poweroff -f
  # Not reached; if it were, PID 1 exiting panics the kernel and panic=-1 plus -no-reboot stop QEMU.
  exit 1
}

marker INIT
for m in ${modules.map((m) => m.name).join(' ')}; do
  insmod /lib/modules/$m.ko || finish SETUP-FAILED insmod $m
done
marker BEGIN
# A subshell, so "exit" in the guest script ends the script and not PID 1. stdin is /dev/null so
# nothing waits for console input.
( . /vmtest/lib.sh; . /vmtest/guest.sh ) < /dev/null 9> /dev/ttyS1
finish EXIT $?
`;
}

/** Builds (or finds in the cache) the initramfs for this guest script. */
export function buildInitramfs(options: InitramfsOptions): Initramfs {
  const kernel = findKernel();
  if (!kernel) throw new Error('no kernel with modules found in /boot and /lib/modules (apt-get install linux-image-amd64)');
  const modules = resolveModules(kernel, options.modules ?? DEFAULT_MODULES);
  const init = initScript(modules);
  const extraFiles = options.extraFiles ?? [];

  const cacheDir = options.cacheDir ?? defaultCacheDir();
  const key = cacheKey(kernel, modules, init, options.guestScript, extraFiles);
  const path = join(cacheDir, `initramfs-${key}.cpio`);
  const kernelImage = bootImage(kernel, cacheDir);
  if (touch(path)) return { path, kernel, kernelImage, cached: true };

  const archive = new CpioWriter()
    .dir('bin')
    .dir('proc')
    .dir('sys')
    .dir('dev')
    .dir('tmp', 0o1777)
    .charDevice('dev/console', 5, 1)
    .file('bin/busybox', readFileSync(BUSYBOX), 0o755)
    .file('init', init, 0o755)
    .file('vmtest/lib.sh', GUEST_LIB)
    .file('vmtest/guest.sh', options.guestScript);
  for (const m of modules) archive.file(`lib/modules/${m.name}.ko`, readModule(m.path));
  for (const f of extraFiles) {
    archive.file(f.path, f.content ?? readFileSync(requireHostPath(f)), f.mode ?? (f.content === undefined ? 0o755 : 0o644));
  }
  writeAtomically(path, archive.finish());
  pruneCache(cacheDir);
  return { path, kernel, kernelImage, cached: false };
}

export function defaultCacheDir(): string {
  const repo = join(dirname(fileURLToPath(import.meta.url)), '..');
  return process.env.NIXCAS_VMTEST_CACHE ?? join(repo, 'node_modules', '.cache', 'nixcas-vmtest');
}

// Host files (busybox, modules, extraFiles' hostPath) enter the key by path, size and mtime, so a
// cache hit reads none of them; inline content enters by its hash.
function cacheKey(kernel: Kernel, modules: ModuleFile[], init: string, guestScript: string, extraFiles: ExtraFile[]): string {
  const stamp = (path: string) => {
    const s = statSync(path);
    return [path, s.size, s.mtimeMs, s.ino];
  };
  const sha = (data: Buffer | string) => createHash('sha256').update(data).digest('hex');
  const parts = {
    format: FORMAT,
    kernel: kernel.version,
    busybox: stamp(BUSYBOX),
    modules: modules.map((m) => stamp(m.path)),
    init: sha(init),
    lib: sha(GUEST_LIB),
    guestScript: sha(guestScript),
    extraFiles: extraFiles.map((f) => [f.path, f.mode ?? null, f.content !== undefined ? sha(f.content) : stamp(requireHostPath(f))]),
  };
  return sha(JSON.stringify(parts)).slice(0, 32);
}

function requireHostPath(f: ExtraFile): string {
  if (f.hostPath === undefined) throw new Error(`extra file ${f.path} needs content or hostPath`);
  return f.hostPath;
}

// A cache hit refreshes the mtime, which pruneCache reads as "last used".
function touch(path: string): boolean {
  try {
    const now = new Date();
    utimesSync(path, now, now);
    return true;
  } catch {
    return false;
  }
}

// Concurrent test processes may build the same image; a rename makes each write all-or-nothing.
function writeAtomically(path: string, data: Buffer): void {
  mkdirSync(dirname(path), { recursive: true });
  const tmp = `${path}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  writeFileSync(tmp, data);
  renameSync(tmp, path);
}

function pruneCache(cacheDir: string): void {
  const cutoff = Date.now() - CACHE_MAX_AGE_MS;
  for (const name of readdirSync(cacheDir)) {
    if (!name.startsWith('initramfs-') && !name.startsWith('vmlinux-')) continue;
    const path = join(cacheDir, name);
    try {
      if (statSync(path).mtimeMs < cutoff) unlinkSync(path);
    } catch {
      // Another process pruned it first.
    }
  }
}

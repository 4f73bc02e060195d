// The guest kernel (Debian's linux-image-amd64) and the modules virtio-fs needs.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';

/**
 * The modules the guest loads. Their dependencies come from modules.dep, so with Debian 6.1 the
 * load order is virtio_ring, virtio, virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci,
 * fuse, virtiofs. Anything built into the kernel (modules.builtin) is skipped.
 */
export const DEFAULT_MODULES = ['virtio_pci', 'virtiofs'];

export interface Kernel {
  version: string;
  vmlinuz: string;
  modulesDir: string;
}

/**
 * The kernel NIXCAS_VMTEST_KERNEL (an image) and NIXCAS_VMTEST_MODULES (its /lib/modules/V
 * directory) name (nix/: a NixOS user's kernel); otherwise the newest that has both
 * /boot/vmlinuz-V and /lib/modules/V/modules.dep.
 */
export function findKernel(): Kernel | undefined {
  const image = process.env.NIXCAS_VMTEST_KERNEL;
  const modules = process.env.NIXCAS_VMTEST_MODULES;
  if (image || modules) {
    if (!image || !modules) throw new Error('NIXCAS_VMTEST_KERNEL and NIXCAS_VMTEST_MODULES go together: the kernel image and its modules directory');
    if (!existsSync(join(modules, 'modules.dep'))) throw new Error(`NIXCAS_VMTEST_MODULES=${modules} has no modules.dep`);
    return { version: basename(modules), vmlinuz: image, modulesDir: modules };
  }
  let versions: string[];
  try {
    versions = readdirSync('/lib/modules');
  } catch {
    return undefined;
  }
  const usable = versions
    .filter((v) => existsSync(`/boot/vmlinuz-${v}`) && existsSync(`/lib/modules/${v}/modules.dep`))
    .sort((a, b) => b.localeCompare(a, 'en', { numeric: true }));
  const version = usable[0];
  return version === undefined ? undefined : { version, vmlinuz: `/boot/vmlinuz-${version}`, modulesDir: `/lib/modules/${version}` };
}

export interface ModuleFile {
  name: string;
  /** Absolute path, possibly compressed (.ko.xz, .ko.zst, .ko.gz). */
  path: string;
}

/** The module files to insmod, dependencies first, built-in ones left out. */
export function resolveModules(kernel: Kernel, wanted: string[] = DEFAULT_MODULES): ModuleFile[] {
  const deps = readModulesDep(kernel);
  const builtin = readBuiltin(kernel);
  const order: ModuleFile[] = [];
  const seen = new Set<string>();
  const visit = (name: string): void => {
    if (seen.has(name) || builtin.has(name)) return;
    seen.add(name);
    const entry = deps.get(name);
    if (!entry) throw new Error(`kernel ${kernel.version} has no module ${name} (neither in modules.dep nor modules.builtin)`);
    // modules.dep lists dependencies so that modprobe loads them last-to-first.
    for (const dep of [...entry.deps].reverse()) visit(moduleName(dep));
    order.push({ name, path: join(kernel.modulesDir, entry.path) });
  };
  for (const name of wanted) visit(normalizeName(name));
  return order;
}

interface Decompressor {
  command: string;
  pkg: string;
}

const DECOMPRESSORS: Record<string, Decompressor> = {
  '.xz': { command: 'xz', pkg: 'xz-utils' },
  '.zst': { command: 'zstd', pkg: 'zstd' },
  '.gz': { command: 'gzip', pkg: 'gzip' },
};

/** The tool needed to unpack the default modules, or undefined when they are stored uncompressed. */
export function moduleDecompressor(): Decompressor | undefined {
  const kernel = findKernel();
  if (!kernel) return undefined;
  for (const m of resolveModules(kernel)) {
    const d = decompressorFor(m.path);
    if (d) return d;
  }
  return undefined;
}

/** The plain .ko bytes. busybox insmod cannot load compressed modules, so they are unpacked here on the host. */
export function readModule(path: string): Buffer {
  const d = decompressorFor(path);
  if (!d) return readFileSync(path);
  const r = spawnSync(d.command, ['-d', '-c', path], { maxBuffer: 256 << 20 });
  if (r.status !== 0) throw new Error(`${d.command} -d -c ${path} failed: ${r.error?.message ?? r.stderr.toString()}`);
  return r.stdout;
}

/**
 * The kernel as an uncompressed ELF vmlinux, which QEMU boots through its PVH entry point. This skips
 * the bzImage's in-guest xz decompression, which under TCG is most of the boot (about 7 s -> 2.7 s).
 * Falls back to the bzImage when the kernel is not xz-compressed or lacks CONFIG_PVH.
 */
export function bootImage(kernel: Kernel, cacheDir: string): string {
  const s = statSync(kernel.vmlinuz);
  const path = join(cacheDir, `vmlinux-${kernel.version}-${s.size}-${Math.round(s.mtimeMs)}`);
  try {
    const now = new Date();
    utimesSync(path, now, now); // marks it as used, for the cache pruning in initramfs.ts
    return path;
  } catch {
    // Not extracted yet.
  }
  const elf = extractVmlinux(kernel);
  if (!elf) return kernel.vmlinuz;
  mkdirSync(cacheDir, { recursive: true });
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, elf);
  renameSync(tmp, path); // atomic: parallel test processes may extract at the same time
  return path;
}

function extractVmlinux(kernel: Kernel): Buffer | undefined {
  const config = `/boot/config-${kernel.version}`;
  if (existsSync(config) && !/^CONFIG_PVH=y$/m.test(readFileSync(config, 'utf8'))) return undefined;
  const bzImage = readFileSync(kernel.vmlinuz);
  // The payload is an xz stream somewhere after the real-mode setup code; its magic is FD 37 7A 58 5A 00.
  const start = bzImage.indexOf(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]));
  if (start < 0) return undefined;
  // --single-stream: stop at the end of the payload and ignore what follows it.
  const r = spawnSync('xz', ['-d', '-c', '--single-stream'], { input: bzImage.subarray(start), maxBuffer: 512 << 20 });
  const elf = r.stdout;
  if (r.status !== 0 || !elf || elf.length < 4 || elf.readUInt32BE(0) !== 0x7f454c46) return undefined;
  return elf;
}

function decompressorFor(path: string): Decompressor | undefined {
  const ext = path.slice(path.lastIndexOf('.'));
  return DECOMPRESSORS[ext];
}

function readModulesDep(kernel: Kernel): Map<string, { path: string; deps: string[] }> {
  const map = new Map<string, { path: string; deps: string[] }>();
  for (const line of readFileSync(join(kernel.modulesDir, 'modules.dep'), 'utf8').split('\n')) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const path = line.slice(0, colon);
    const deps = line.slice(colon + 1).trim().split(/\s+/).filter(Boolean);
    map.set(moduleName(path), { path, deps });
  }
  return map;
}

function readBuiltin(kernel: Kernel): Set<string> {
  const file = join(kernel.modulesDir, 'modules.builtin');
  if (!existsSync(file)) return new Set();
  return new Set(readFileSync(file, 'utf8').split('\n').filter(Boolean).map(moduleName));
}

// "kernel/drivers/virtio/virtio_pci.ko.xz" -> "virtio_pci"
function moduleName(path: string): string {
  return normalizeName(basename(path).replace(/\.ko(\.\w+)?$/, ''));
}

// The kernel treats "-" and "_" in module names as the same character.
function normalizeName(name: string): string {
  return name.replace(/-/g, '_');
}

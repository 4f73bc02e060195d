// Which Debian packages the VM tests need, which of them are missing, and (when allowed) installing them.
//
// Checks look at the files the harness actually uses, not at dpkg's database, so they also hold on a
// host where e.g. the kernel came from a versioned linux-image-6.1.0-NN-amd64 package.

import { spawnSync } from 'node:child_process';
import { accessSync, closeSync, constants, openSync, readSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { findKernel, moduleDecompressor } from './kernel.js';

/** QEMU, on PATH unless NIXCAS_VMTEST_QEMU names it (nix/: a NixOS user's pkgs.qemu). */
export const QEMU = process.env.NIXCAS_VMTEST_QEMU || 'qemu-system-x86_64';
export const VIRTIOFSD = '/usr/lib/qemu/virtiofsd';
/** A statically linked busybox for the initramfs (NIXCAS_VMTEST_BUSYBOX overrides Debian's). */
export const BUSYBOX = process.env.NIXCAS_VMTEST_BUSYBOX || '/bin/busybox';

interface Requirement {
  what: string;
  pkg: string;
  present(): boolean;
}

function requirements(): Requirement[] {
  const base: Requirement[] = [
    { what: `${QEMU} on PATH`, pkg: 'qemu-system-x86', present: () => onPath(QEMU) !== undefined },
    // In Debian 12 virtiofsd lives in qemu-system-common, which qemu-system-x86 depends on.
    { what: VIRTIOFSD, pkg: 'qemu-system-x86', present: () => isExecutable(VIRTIOFSD) },
    { what: 'a kernel in /boot with modules in /lib/modules', pkg: 'linux-image-amd64', present: () => findKernel() !== undefined },
    // The Debian "busybox" package installs a dynamically linked /bin/busybox, useless in an initramfs without libc.
    { what: `a statically linked ${BUSYBOX}`, pkg: 'busybox-static', present: () => isStaticElf(BUSYBOX) },
    // Unpacks the xz-compressed kernel on the host so the guest boots without decompressing it (see bootImage).
    { what: 'xz (to unpack the kernel)', pkg: 'xz-utils', present: () => onPath('xz') !== undefined },
  ];
  // Compressed modules are unpacked on the host (busybox insmod cannot), which needs the matching tool.
  const decompressor = moduleDecompressor();
  if (decompressor && decompressor.command !== 'xz') {
    base.push({ what: `${decompressor.command} (the kernel modules are compressed)`, pkg: decompressor.pkg, present: () => onPath(decompressor.command) !== undefined });
  }
  return base;
}

/** The packages to install, each with the reasons; empty when everything is there. */
export function missingVmPackages(): Map<string, string[]> {
  const missing = new Map<string, string[]>();
  for (const r of requirements()) {
    if (r.present()) continue;
    missing.set(r.pkg, [...(missing.get(r.pkg) ?? []), r.what]);
  }
  return missing;
}

export interface EnsureOptions {
  /**
   * Install missing packages with apt-get. Defaults to true when running as root with $CI or
   * $NIXCAS_VMTEST_INSTALL=1 set, false otherwise (a developer machine is not changed unasked).
   */
  install?: boolean;
}

export class MissingPackagesError extends Error {
  constructor(readonly packages: string[], detail: string) {
    super(detail);
    this.name = 'MissingPackagesError';
  }
}

/** Throws MissingPackagesError naming the exact packages when something is missing and cannot be installed. */
export function ensureVmPackages(options: EnsureOptions = {}): void {
  let missing = missingVmPackages();
  if (missing.size === 0) return;
  const isRoot = process.getuid?.() === 0;
  const install = options.install ?? (isRoot && (truthy(process.env.CI) || process.env.NIXCAS_VMTEST_INSTALL === '1'));
  // Twice at most: only once the kernel is installed can we see whether its modules need zstd.
  for (let round = 0; round < 2 && install && isRoot && missing.size > 0; round++) {
    aptInstall([...missing.keys()]);
    missing = missingVmPackages();
  }
  if (missing.size === 0) return;
  const packages = [...missing.keys()];
  const reasons = [...missing].map(([pkg, what]) => `  ${pkg}: for ${what.join(', ')}`).join('\n');
  const hint = isRoot
    ? 'rerun with NIXCAS_VMTEST_INSTALL=1 (or CI=1) to let the harness install them'
    : 'install them as root';
  throw new MissingPackagesError(
    packages,
    `VM tests need Debian packages that are missing: ${packages.join(' ')}\n${reasons}\n` +
      `Install: apt-get update && apt-get install -y --no-install-recommends ${packages.join(' ')}\n(${hint})`,
  );
}

function aptInstall(packages: string[]): void {
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  console.error(`vmtest: installing ${packages.join(' ')} with apt-get`);
  // stdout to our stderr: apt's progress must not mix into a caller's machine-readable stdout.
  const stdio: ['ignore', number, number] = ['ignore', 2, 2];
  for (const args of [['update', '-qq'], ['install', '-y', '-qq', '--no-install-recommends', ...packages]]) {
    const r = spawnSync('apt-get', args, { env, stdio });
    if (r.status !== 0) throw new Error(`apt-get ${args.join(' ')} failed (${r.error?.message ?? `exit ${r.status}`})`);
  }
}

export function onPath(command: string): string | undefined {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(delimiter)) {
    const candidate = join(dir, command);
    if (isExecutable(candidate)) return candidate;
  }
  return undefined;
}

function isExecutable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

// A static ELF has no PT_INTERP program header (no dynamic loader). Reads only the ELF64 headers.
function isStaticElf(path: string): boolean {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch {
    return false;
  }
  try {
    const header = Buffer.alloc(64);
    if (readSync(fd, header, 0, 64, 0) < 64 || header.readUInt32BE(0) !== 0x7f454c46 || header[4] !== 2) return false;
    const phoff = Number(header.readBigUInt64LE(0x20));
    const phentsize = header.readUInt16LE(0x36);
    const phnum = header.readUInt16LE(0x38);
    const table = Buffer.alloc(phentsize * phnum);
    readSync(fd, table, 0, table.length, phoff);
    const PT_INTERP = 3;
    for (let i = 0; i < phnum; i++) if (table.readUInt32LE(i * phentsize) === PT_INTERP) return false;
    return true;
  } finally {
    closeSync(fd);
  }
}

function truthy(value: string | undefined): boolean {
  return value !== undefined && value !== '' && value !== '0' && value.toLowerCase() !== 'false';
}

// The VM test harness: boot a Linux guest under QEMU (TCG) with a busybox initramfs, optionally
// attached to a vhost-user-fs backend, run a shell script in it and collect structured results.
//
//   ensureVmPackages();                                   // or it says which apt packages are missing
//   const backend = await startVirtiofsd({ source, socketPath });
//   const initramfs = buildInitramfs({ guestScript: 'mount -t virtiofs nixstore /mnt && capture ls ls /mnt' });
//   const r = await bootGuest({ initramfs, backend, timeoutMs: 60_000 });
//   r.exitStatus, r.results['ls.out'], r.timings
//
// See vmtest/README.md.

export {
  type Backend, type BackendOptions, NIXCAS_CLI, type NixcasVirtiofsOptions, startBackend, startNixcasVirtiofs, startVirtiofsd, type VirtiofsdOptions,
} from './backend.js';
export { buildInitramfs, defaultCacheDir, type ExtraFile, type Initramfs, type InitramfsOptions } from './initramfs.js';
export { DEFAULT_MODULES, findKernel, type Kernel } from './kernel.js';
export { BUSYBOX, ensureVmPackages, type EnsureOptions, missingVmPackages, MissingPackagesError, QEMU, VIRTIOFSD } from './packages.js';
export { atExit, stopAll } from './processes.js';
export { readdirProbe, readdirProbeFile } from './readdir-probe.js';
export { type BootOptions, type BootResult, type BootTimings, bootGuest, VmError } from './qemu.js';

#!/usr/bin/env bash
# The Debian packages the test suites drive as real peers. As root, missing ones are installed
# (apt-get update, then install); otherwise they are named with the line that installs them.
# Run by .ci/run before `npm ci` (libzstd-dev builds an optional addon) and by `npm test` (pretest).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
# Python grpcio (with grpc-tools to compile protos/), b3sum to compute digests independently, Nix 2.8
# (nix-bin) for store paths, NARs and closures, fuse3 for fusermount3 (mounting as an ordinary user),
# xz, zstd and bzip2, which nar-bridge and substitution decode with, nginx serving Nix-written caches,
# libzstd-dev for the in-process zstd decoder, and strace, whose fault injection kills `nixcas gc` at
# chosen system calls (test/gc.test.ts), and prometheus, which scrapes --metrics-listen (test/metrics.test.ts).
# The FUSE tests mount through the kernel: they need /dev/fuse.
packages=(python3-grpcio python3-grpc-tools b3sum nix-bin fuse3 zstd xz-utils bzip2 nginx-light libzstd-dev strace prometheus)
# The microVM tests boot Debian's kernel under QEMU (TCG, no KVM needed) from a busybox initramfs: QEMU
# (with virtiofsd), the kernel and its modules, a statically linked busybox, and xz to unpack the kernel.
# vmtest/packages.ts checks the same list. Without recommends: qemu-system-x86 would pull in a GTK front end.
vm_packages=(qemu-system-x86 linux-image-amd64 busybox-static xz-utils)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
vm_missing=()
for p in "${vm_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || vm_missing+=("$p"); done
[ $((${#missing[@]} + ${#vm_missing[@]})) -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "the tests need these Debian packages: ${missing[*]} ${vm_missing[*]}" >&2
  echo "install them as root:" >&2
  [ ${#missing[@]} -eq 0 ] || echo "  apt-get install ${missing[*]}" >&2
  [ ${#vm_missing[@]} -eq 0 ] || echo "  apt-get install --no-install-recommends ${vm_missing[*]}" >&2
  exit 1
fi
echo "installing the Debian packages the tests need: ${missing[*]} ${vm_missing[*]}" >&2
apt-get update -qq
[ ${#missing[@]} -eq 0 ] || apt-get install -y -qq "${missing[@]}"
[ ${#vm_missing[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${vm_missing[@]}"

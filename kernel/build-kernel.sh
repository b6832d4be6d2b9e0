#!/usr/bin/env bash
# Builds a small Kennel guest kernel from Debian's linux-source package with
# everything in kernel/config built in (no modules, no initramfs needed).
# For operators who want faster boots than Debian's cloud kernel; not run in CI.
#
#   sudo apt-get install linux-source build-essential bc bison flex libelf-dev libssl-dev
#   kernel/build-kernel.sh [OUTDIR]
#
# Produces OUTDIR/bzImage (QEMU, Cloud Hypervisor) and OUTDIR/vmlinux (ELF
# with the PVH note, Cloud Hypervisor's fastest path).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(realpath -m "${1:-$here/out}")"
tarball=$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n 1)
[ -n "$tarball" ] || { echo "install linux-source first (apt-get install linux-source)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf "$tarball"
src=$(ls -d "$work"/linux-source-*)
cd "$src"
make -s tinyconfig
scripts/kconfig/merge_config.sh -m .config "$here/config" >/dev/null
make -s olddefconfig
make -s -j"$(nproc)" bzImage vmlinux
mkdir -p "$out"
cp arch/x86/boot/bzImage vmlinux "$out/"
echo "built $out/bzImage and $out/vmlinux ($(make -s kernelrelease))"

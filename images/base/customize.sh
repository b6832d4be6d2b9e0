#!/bin/sh
# mmdebstrap customize hook for Kennel images. $1 is the root of the image.
# Environment (set by Kennel): KENNEL_RECIPE (this folder), KENNEL_STACK,
# KENNEL_STACK_ENV (a file of KEY='value' lines), KENNEL_FIRST_BOOT (a file,
# possibly empty).
set -eu
root="$1"

# Kennel's guest files, owned by root whoever checked the recipe out.
cp -R --no-preserve=ownership "$KENNEL_RECIPE/overlay/." "$root/"

# The dev user: uid/gid 1000 (renumbered at boot to match the owner of the
# host source directory), passwordless sudo, no password at all ('*' is
# "no password" rather than "locked", which sshd with UsePAM no refuses).
chroot "$root" useradd --create-home --uid 1000 --user-group --shell /bin/bash --groups sudo dev
chroot "$root" usermod -p '*' dev
printf 'dev ALL=(ALL) NOPASSWD:ALL\n' > "$root/etc/sudoers.d/dev"
chmod 0440 "$root/etc/sudoers.d/dev"
install -d -o 1000 -g 1000 -m 0755 "$root/workspace"
install -d -o 1000 -g 1000 -m 0700 "$root/home/dev/.ssh"

# Per-VM identity is created at boot, never baked into the image.
rm -f "$root"/etc/ssh/ssh_host_*
printf 'kennel\n' > "$root/etc/hostname"
: > "$root/etc/machine-id"

# The stack.
install -d "$root/etc/kennel"
printf '%s\n' "$KENNEL_STACK" > "$root/etc/kennel/stack"
cp "$KENNEL_STACK_ENV" "$root/etc/kennel/stack.env"
if [ -s "$KENNEL_FIRST_BOOT" ]; then
  install -m 0755 "$KENNEL_FIRST_BOOT" "$root/etc/kennel/first-boot.sh"
fi

printf 'LANG=C.UTF-8\n' > "$root/etc/default/locale"
printf '/dev/vda / ext4 rw,noatime 0 1\n' > "$root/etc/fstab"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin

#!/bin/sh
# mmdebstrap customize hook for Kennel images. $1 is the root of the image.
# Environment (set by Kennel): KENNEL_RECIPE (this folder), KENNEL_STACK,
# KENNEL_STACK_ENV (a file of KEY='value' lines), KENNEL_FIRST_BOOT (a file,
# possibly empty), KENNEL_MODULES (the guest kernel's module tree, a folder
# holding lib/modules/<release>), KENNEL_IMAGE_STEPS (a file of shell lines
# the stack runs in the image as root, possibly empty).
set -eu
root="$1"

# Kennel's guest files, owned by root whoever checked the recipe out.
cp -R --no-preserve=ownership "$KENNEL_RECIPE/overlay/." "$root/"
# The metadata service's environment for PAM sessions (su, sudo -i) too.
grep -v '^#' "$root/etc/kennel/metadata.env" >> "$root/etc/environment"

# The dev user: uid/gid 1000 (renumbered at boot to match the owner of the
# host source directory), passwordless sudo, the journal (adm,
# systemd-journal) and Docker without sudo, no password at all ('*' is
# "no password" rather than "locked", which sshd with UsePAM no refuses).
chroot "$root" useradd --create-home --uid 1000 --user-group --shell /bin/bash --groups sudo,docker,adm,systemd-journal dev
chroot "$root" usermod -p '*' dev
printf 'dev ALL=(ALL) NOPASSWD:ALL\n' > "$root/etc/sudoers.d/dev"
chmod 0440 "$root/etc/sudoers.d/dev"
install -d -o 1000 -g 1000 -m 0755 "$root/workspace"
install -d -o 1000 -g 1000 -m 0700 "$root/home/dev/.ssh"
install -d -o 1000 -g 1000 -m 0755 "$root/var/log/kennel"
install -d -m 0755 "$root/var/lib/kennel"

# Per-VM identity is created at boot, never baked into the image.
rm -f "$root"/etc/ssh/ssh_host_*
printf 'kennel\n' > "$root/etc/hostname"
: > "$root/etc/machine-id"

# The guest kernel's modules (Docker's overlay, bridge, veth, netfilter
# are modules of the cloud kernel), with their index.
if [ -n "${KENNEL_MODULES:-}" ] && [ -d "$KENNEL_MODULES/lib/modules" ]; then
  cp -a "$KENNEL_MODULES/lib/modules/." "$root/usr/lib/modules/"
  for r in "$KENNEL_MODULES"/lib/modules/*; do chroot "$root" depmod -a "$(basename "$r")"; done
fi

# systemd: Kennel's units on, what makes no sense in a VM off (apt's
# daily timers, gettys other than the serial console, the first-boot
# wizard), Docker on its socket only. sshd's config is checked here,
# once, instead of at every boot.
chroot "$root" systemctl enable kennel-init.service kennel-ready.service \
  kennel-start.service kennel-devcontainer.service kennel-first-boot.service \
  kennel-grow-root.service kennel-metadata.socket
chroot "$root" systemctl disable docker.service containerd.service 2>/dev/null || true
chroot "$root" systemctl enable docker.socket
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer \
  getty@tty1.service systemd-firstboot.service e2scrub_all.timer e2scrub_reap.service
# What a microVM has no use for, each a process start that costs time
# under emulation (bench/provision.sh; docs/guest.md lists them): static
# device nodes (devtmpfs and udev make them), system users (made at build),
# modules nothing here uses, kernel debug file systems, binfmt, a remount
# of the root the initramfs mounted read-write.
chroot "$root" systemctl mask kmod-static-nodes.service systemd-sysusers.service \
  systemd-tmpfiles-setup-dev-early.service systemd-tmpfiles-setup-dev.service \
  modprobe@configfs.service modprobe@drm.service modprobe@efi_pstore.service \
  modprobe@fuse.service modprobe@loop.service modprobe@dm_mod.service \
  sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
  sys-fs-fuse-connections.mount dev-hugepages.mount systemd-remount-fs.service \
  proc-sys-fs-binfmt_misc.automount systemd-binfmt.service
# Kennel's readiness first: what a login does not need waits until sshd
# listens (ordering only; each still runs at every boot). Under emulation
# a VM has one slow CPU, and these would otherwise share it with the path
# to sshd (measured: docs/guest.md, "Boot time").
for u in systemd-journald.service systemd-journal-flush.service \
  systemd-udevd.service systemd-udev-trigger.service \
  systemd-udev-load-credentials.service systemd-sysctl.service \
  systemd-modules-load.service systemd-random-seed.service \
  systemd-tmpfiles-setup.service run-lock.mount dev-mqueue.mount; do
  install -d "$root/etc/systemd/system/$u.d"
  printf '[Unit]\nAfter=kennel-ready.service\n' > "$root/etc/systemd/system/$u.d/kennel-later.conf"
done
# sshd's own host key step: kennel-init installs the VM's key.
chroot "$root" systemctl mask sshd-keygen.service
# Generators for hardware and setups a Kennel VM does not have (GPT
# auto-mounts, encrypted or verity disks, hibernation, TPM, SysV scripts,
# SSH over vsock).
install -d "$root/etc/systemd/system-generators"
for g in systemd-gpt-auto-generator systemd-cryptsetup-generator \
  systemd-veritysetup-generator systemd-integritysetup-generator \
  systemd-hibernate-resume-generator systemd-bless-boot-generator \
  systemd-tpm2-generator systemd-sysv-generator systemd-rc-local-generator \
  systemd-system-update-generator systemd-ssh-generator \
  systemd-factory-reset-generator systemd-import-generator \
  systemd-debug-generator systemd-run-generator; do
  ln -sf /dev/null "$root/etc/systemd/system-generators/$g"
done
ssh-keygen -q -t ed25519 -N '' -f "$root/etc/ssh/kennel-check-key"
chroot "$root" /usr/sbin/sshd -t -h /etc/ssh/kennel-check-key
rm -f "$root/etc/ssh/kennel-check-key" "$root/etc/ssh/kennel-check-key.pub"

# The stack.
install -d "$root/etc/kennel"
printf '%s\n' "$KENNEL_STACK" > "$root/etc/kennel/stack"
cp "$KENNEL_STACK_ENV" "$root/etc/kennel/stack.env"
if [ -s "$KENNEL_FIRST_BOOT" ]; then
  install -m 0755 "$KENNEL_FIRST_BOOT" "$root/etc/kennel/first-boot.sh"
fi

# The stack's own image steps (e.g. language servers from the npm
# registry), with the network the build has.
# The build host's CA bundle is trusted for these steps only (a host may
# reach registries through a proxy of its own); it is not kept.
if [ -s "${KENNEL_IMAGE_STEPS:-}" ]; then
  cp "$KENNEL_IMAGE_STEPS" "$root/tmp/kennel-image-steps.sh"
  cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/kennel-build-ca.crt"
  chroot "$root" env HOME=/root NODE_EXTRA_CA_CERTS=/tmp/kennel-build-ca.crt \
    SSL_CERT_FILE=/tmp/kennel-build-ca.crt PIP_CERT=/tmp/kennel-build-ca.crt \
    npm_config_cafile=/tmp/kennel-build-ca.crt \
    /bin/sh -e /tmp/kennel-image-steps.sh
  rm -rf "$root/tmp/kennel-image-steps.sh" "$root/tmp/kennel-build-ca.crt" "$root/root/.npm"
fi

printf 'LANG=C.UTF-8\n' > "$root/etc/default/locale"
# No fsck pass: the root is mounted by the initramfs, and a pass would
# make boot wait for udev to announce /dev/vda.
printf '/dev/vda / ext4 rw,noatime 0 0\n' > "$root/etc/fstab"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
# The build's dpkg shortcut (no fsync per file) is not the VM's.
if [ -f "$root/etc/dpkg/dpkg.cfg.d/99mmdebstrap" ]; then
  sed -i '/^force-unsafe-io$/d' "$root/etc/dpkg/dpkg.cfg.d/99mmdebstrap"
fi
# /etc and /var are current with /usr: no ldconfig, hwdb or catalog
# rebuild on the first boot.
touch "$root/etc/.updated" "$root/var/.updated"

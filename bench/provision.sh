#!/usr/bin/env bash
# Provisioning benchmark: prints a table of
#   - Kennel's `new project` → first `ssh … true`, split into image, disk,
#     spawn, boot and sshd (from vms/<name>/timings.json);
#   - a hand-run QEMU boot of the same image, kernel and devices to the same
#     ssh check, and the ratio (Kennel's orchestration overhead);
#   - creating a qcow2 child of a 4 GiB image;
#   - host memory per VM outside guest RAM (VMM, virtiofsd, Kennel's share).
# Needs root, QEMU, virtiofsd, OpenSSH (scripts/install-deps.sh run).
# Usage: bench/provision.sh [RUNS]   (default 3)
set -euo pipefail
runs="${1:-3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
cache="${KENNEL_TEST_CACHE:-$HOME/.cache/kennel/test-data}"
(cd "$repo" && cargo build --quiet)
K="$CARGO_TARGET_DIR/debug/kennel"

work=$(mktemp -d /tmp/kb.XXXXXX)
serve_pid=""
cleanup() {
  for i in $(seq 1 "$runs"); do (cd "$work" && "$K" exec "rm b$i --yes" >/dev/null 2>&1) || true; done
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
  [ -f "$work/hand/qemu.pid" ] && kill "$(cat "$work/hand/qemu.pid")" 2>/dev/null || true
  pkill -f "socket-path=$work/hand" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/kennel-data" "$cache/images"
ln -s "$cache/images" "$work/kennel-data/images"
cd "$work"
export KENNEL_VM__BACKEND=qemu KENNEL_VM__NETWORK=user RUST_LOG=warn KENNEL_IMAGES__APT_CACHE="$cache/apt"
"$K" image build >/dev/null 2>&1
"$K" serve 2>/dev/null &
serve_pid=$!
# Wait for the daemon's socket (an in-process exec would race it for the lock).
until python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" "$work/kennel-data/control.sock" 2>/dev/null; do sleep 0.1; done

now() { date +%s.%N; }
ms() { echo "($2 - $1) * 1000 / 1" | bc; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# Resident KiB of the guest-RAM mapping (memory-backend-memfd "mem") in a QEMU.
guest_kib() { awk '/memfd:mem/ {m=1; next} /^[0-9a-f]+-/ {m=0} m && /^Rss:/ {s+=$2} END {print s+0}' "/proc/$1/smaps"; }
sshq() { ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -i "$1" -p "$2" "dev@$3" true; }

declare -a rows
mem_vmm=0; mem_vfs=0; mem_kennel=0
for i in $(seq 1 "$runs"); do
  t0=$(now)
  "$K" exec "new project b$i --stack base --cpus 1 --memory 512M --disk 4G" >/dev/null 2>&1
  t1=$(now)
  addr=$("$K" exec "--json status b$i" | sed -n 's/.*"ssh_addr":"\([^"]*\)".*/\1/p')
  sshq "kennel-data/keys/projects/b$i/id_ed25519" "${addr##*:}" "${addr%:*}"
  t2=$(now)
  tj="kennel-data/vms/b$i/timings.json"
  get() { sed -n "s/.*\"$1\": \([0-9]*\).*/\1/p" "$tj"; }
  rows+=("$(printf '%-10s %8s %8s %8s %8s %8s %8s %10s %10s' "kennel#$i" "$(get image_ms)" "$(get disk_ms)" "$(get spawn_ms)" "$(get boot_ms)" "$(get sshd_ms)" "-" "$(ms "$t0" "$t1")" "$(ms "$t0" "$t2")")")
  if [ "$i" = 1 ]; then
    qpid=$(cat kennel-data/vms/b1/vmm.pid)
    mem_vmm=$(( $(rss_kib "$qpid") - $(guest_kib "$qpid") ))
    for p in $(pgrep -f "socket-path=$work/kennel-data/vms/b1/fs.sock"); do mem_vfs=$((mem_vfs + $(rss_kib "$p"))); done
    mem_kennel=$(rss_kib "$serve_pid")
  fi
  total_create[$i]=$(ms "$t0" "$t2")
  "$K" exec "rm b$i --yes" >/dev/null 2>&1
done

# The same boot by hand: same image, kernel, devices and ssh check.
kern=$(ls -d kennel-data/images/kernel-* | tail -n 1)
img=$(ls -td kennel-data/images/base-* | head -n 1)
mkdir -p hand/cfg hand/ws
ssh-keygen -q -t ed25519 -N '' -f hand/key
cp hand/key.pub hand/cfg/authorized_keys
printf 'KENNEL_HOSTNAME=hand\nKENNEL_IP=10.0.2.15/24\nKENNEL_GATEWAY=10.0.2.2\nKENNEL_DNS=10.0.2.3\nKENNEL_DEV_UID=1000\nKENNEL_DEV_GID=1000\n' > hand/cfg/env
mkfs.ext4 -q -L KENNELCFG -d hand/cfg hand/cfg.img 8M
vfsd=/usr/lib/qemu/virtiofsd; command -v virtiofsd >/dev/null && vfsd=$(command -v virtiofsd)
vfsargs=(--socket-path="$work/hand/fs.sock" -o source="$work/hand/ws" -o cache=none)
[ "$vfsd" = /usr/lib/qemu/virtiofsd ] || vfsargs=(--socket-path="$work/hand/fs.sock" --shared-dir="$work/hand/ws" --cache=never)
hand_total=()
for i in $(seq 1 "$runs"); do
  rm -f hand/disk.qcow2 hand/console.log hand/fs.sock
  t0=$(now)
  qemu-img create -q -f qcow2 -F raw -b "$work/$img/rootfs.ext4" hand/disk.qcow2 4G
  "$vfsd" "${vfsargs[@]}" >/dev/null 2>&1 &
  while [ ! -S hand/fs.sock ]; do sleep 0.01; done
  qemu-system-x86_64 -machine q35 -accel tcg,tb-size=64 -cpu max -smp 1 -m 512M \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -kernel "$kern/vmlinuz" -initrd "$kern/initramfs.cpio" -append "console=ttyS0 root=/dev/vda rw panic=-1 quiet" \
    -drive file=hand/disk.qcow2,if=none,id=root,format=qcow2 -device virtio-blk-pci,drive=root \
    -drive file=hand/cfg.img,if=none,id=cfg,format=raw,readonly=on -device virtio-blk-pci,drive=cfg \
    -chardev socket,id=vfs,path="$work/hand/fs.sock" -device vhost-user-fs-pci,chardev=vfs,tag=workspace \
    -netdev user,id=n0,hostfwd=tcp:127.0.0.1:17022-:22 -device virtio-net-pci,netdev=n0 -device virtio-rng-pci \
    -serial file:hand/console.log -display none -nodefaults -no-reboot -pidfile hand/qemu.pid -daemonize
  until grep -q "Server listening" hand/console.log 2>/dev/null; do sleep 0.02; done
  t1=$(now)
  until sshq hand/key 17022 127.0.0.1 2>/dev/null; do sleep 0.1; done
  t2=$(now)
  hand_total+=("$(ms "$t0" "$t2")")
  rows+=("$(printf '%-10s %8s %8s %8s %8s %8s %8s %10s %10s' "hand#$i" "-" "-" "-" "-" "-" "$(ms "$t0" "$t1")" "-" "$(ms "$t0" "$t2")")")
  kill "$(cat hand/qemu.pid)"; sleep 0.3; rm -f hand/qemu.pid
done

# qcow2 child of a 4 GiB image: O(1) whatever the size.
truncate -s 4G big.raw
disk_ms=()
for i in 1 2 3 4 5; do
  t0=$(now); qemu-img create -q -f qcow2 -F raw -b "$work/big.raw" "child$i.qcow2" 4G; t1=$(now)
  disk_ms+=("$(ms "$t0" "$t1")")
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
k_med=$(median "${total_create[@]}"); h_med=$(median "${hand_total[@]}")
echo
echo "Provisioning on $(nproc) cores, QEMU/TCG, base image, 1 vCPU, 512 MiB (times in ms)"
printf '%-10s %8s %8s %8s %8s %8s %8s %10s %10s\n' "run" "image" "disk" "spawn" "boot" "sshd" "listen" "reply" "ssh-ok"
printf '%s\n' "${rows[@]}"
echo
printf '%-44s %8s ms\n' "median create→ssh ok, Kennel" "$k_med"
printf '%-44s %8s ms\n' "median boot→ssh ok, by hand" "$h_med"
printf '%-44s %8s\n' "ratio (Kennel / by hand)" "$(echo "scale=2; $k_med / $h_med" | bc)"
printf '%-44s %8s ms\n' "qcow2 child of a 4 GiB image (median of 5)" "$(median "${disk_ms[@]}")"
printf '%-44s %8s MiB\n' "QEMU outside guest RAM (RSS − guest memfd)" "$((mem_vmm / 1024))"
printf '%-44s %8s MiB\n' "virtiofsd (all its processes)" "$((mem_vfs / 1024))"
printf '%-44s %8s MiB\n' "kennel serve (whole daemon, 1 VM)" "$((mem_kennel / 1024))"

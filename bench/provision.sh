#!/usr/bin/env bash
# Provisioning benchmark: prints a table of
#   - Kennel's `new project` → first `ssh … true`, split into image, disk,
#     spawn, boot and sshd (from vms/<name>/timings.json);
#   - a hand-run QEMU boot of the same image, kernel and devices to the same
#     ssh check, and the ratio (Kennel's orchestration overhead);
#   - creating a qcow2 child of a 4 GiB image;
#   - host memory per VM outside guest RAM (VMM, virtiofsd, Kennel's share);
#   - the guest recipe against the previous one (OLD_REV, default the last
#     commit before guests moved to Debian 13 with systemd): create→ssh,
#     wake (stop, start→ssh), image size and build time, the guest's idle
#     memory, run in turn in the same loop.
# Needs root, QEMU, virtiofsd, OpenSSH (scripts/install-deps.sh run).
# Usage: bench/provision.sh [RUNS]   (default 3; OLD_REV=none skips the comparison)
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

# The same boot by hand: same image, kernel, command line, devices and ssh check.
cmdline=$(sed -n 's/^    "\(console=ttyS0[^"]*\)";$/\1/p' "$repo/provisioner/src/lifecycle/mod.rs")
[ -n "$cmdline" ] || { echo "cannot read GUEST_CMDLINE from provisioner/src/lifecycle/mod.rs" >&2; exit 1; }
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
  qemu-system-x86_64 -machine q35 -accel tcg,tb-size=64 -cpu qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt -smp 1 -m 512M \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -kernel "$kern/vmlinuz" -initrd "$kern/initramfs.cpio" -append "$cmdline" \
    -drive file=hand/disk.qcow2,if=none,id=root,format=qcow2 -device virtio-blk-pci,drive=root \
    -drive file=hand/cfg.img,if=none,id=cfg,format=raw,readonly=on -device virtio-blk-pci,drive=cfg \
    -chardev socket,id=vfs,path="$work/hand/fs.sock" -device vhost-user-fs-pci,chardev=vfs,tag=workspace \
    -netdev user,id=n0,hostfwd=tcp:127.0.0.1:17022-:22 -device virtio-net-pci,netdev=n0 -device virtio-rng-pci \
    -serial file:hand/console.log -display none -nodefaults -no-reboot -pidfile hand/qemu.pid -daemonize
  until grep -q -e "kennel-init: ready" -e "Server listening" hand/console.log 2>/dev/null; do sleep 0.02; done
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

# --- The guest recipe against the previous one -----------------------------
old_rev="${OLD_REV:-481b43f}"
[ "$old_rev" = none ] && exit 0
kill "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null || true; serve_pid=""
mkdir -p "$work/old"
git -C "$repo" archive "$old_rev" images/base stacks | tar -x -C "$work/old"
# The old recipe was built from the host's own archive (bookworm).
old_sources=/etc/apt/sources.list.d/debian.sources
[ -f "$old_sources" ] || old_sources=/etc/apt/sources.list
recipe_env() { # $1 = old|new: the environment of that recipe's daemon
  if [ "$1" = old ]; then
    echo "KENNEL_IMAGES__RECIPE_DIR=$work/old/images/base KENNEL_IMAGES__STACKS_DIR=$work/old/stacks KENNEL_IMAGES__APT_SOURCES=$old_sources"
  fi
}
for r in old new; do
  mkdir -p "$work/$r-data"
  ln -s "$cache/images" "$work/$r-data/images"
  (cd "$work" && env $(recipe_env "$r") "$K" --data-dir "$work/$r-data" image build --stack base 2>&1 | tail -n 1)
done
declare -A c_create c_wake c_idle
rrows=()
for i in $(seq 1 "$runs"); do
  for r in old new; do
    d="$work/$r-data"
    (cd "$work" && exec env $(recipe_env "$r") "$K" --data-dir "$d" serve 2>/dev/null) &
    serve_pid=$!
    until python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" "$d/control.sock" 2>/dev/null; do sleep 0.1; done
    kx() { "$K" --data-dir "$d" exec "$@"; }
    t0=$(now)
    kx "new project g$i --stack base --cpus 1 --memory 512M --disk 4G" >/dev/null 2>&1
    addr=$(kx "--json status g$i" | sed -n 's/.*"ssh_addr":"\([^"]*\)".*/\1/p')
    key="$d/keys/projects/g$i/id_ed25519"
    sshq "$key" "${addr##*:}" "${addr%:*}"
    t1=$(now)
    # Idle guest memory: resident guest RAM after 20 s with nobody on it.
    sleep 20
    idle=$(( $(guest_kib "$(cat "$d/vms/g$i/vmm.pid")") / 1024 ))
    kx "stop g$i" >/dev/null 2>&1
    t2=$(now)
    kx "start g$i" >/dev/null 2>&1
    addr=$(kx "--json status g$i" | sed -n 's/.*"ssh_addr":"\([^"]*\)".*/\1/p')
    sshq "$key" "${addr##*:}" "${addr%:*}"
    t3=$(now)
    kx "rm g$i --yes" >/dev/null 2>&1
    kill "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null || true; serve_pid=""
    c_create[$r]+="$(ms "$t0" "$t1") "; c_wake[$r]+="$(ms "$t2" "$t3") "; c_idle[$r]+="$idle "
    rrows+=("$(printf '%-8s %-4s %12s %10s %14s' "run $i" "$r" "$(ms "$t0" "$t1")" "$(ms "$t2" "$t3")" "$idle")")
  done
done
image_of() { # newest base image built by recipe $1's daemon: "size_MiB build_s"
  local id
  id=$(cd "$work" && env $(recipe_env "$1") "$K" --data-dir "$work/$1-data" image build --stack base 2>&1 | sed -n 's/.*up to date: \(base-[0-9a-f]*\).*/\1/p')
  python3 -c "import json,sys,os; d=json.load(open(sys.argv[1])); print(os.stat(sys.argv[2]).st_blocks*512>>20, d['size_bytes']>>20, d['build_seconds'])" \
    "$cache/images/$id/image.json" "$cache/images/$id/rootfs.ext4"
}
read -r old_used old_size old_build <<<"$(image_of old)"
read -r new_used new_size new_build <<<"$(image_of new)"
echo
echo "Guest recipe: $old_rev (bookworm, tini) against this checkout (Debian 13, systemd), base image, 1 vCPU, 512 MiB"
printf '%-8s %-4s %12s %10s %14s\n' "run" "" "create→ssh ms" "wake ms" "idle guest MiB"
printf '%s\n' "${rrows[@]}"
echo
ratio() { echo "scale=2; $2 / $1" | bc; }
mo=$(median ${c_create[old]}); mn=$(median ${c_create[new]})
wo=$(median ${c_wake[old]}); wn=$(median ${c_wake[new]})
io=$(median ${c_idle[old]}); in=$(median ${c_idle[new]})
printf '%-34s %10s %10s %8s\n' "median" "old" "new" "new/old"
printf '%-34s %10s %10s %8s\n' "create→ssh ok (ms)" "$mo" "$mn" "$(ratio "$mo" "$mn")"
printf '%-34s %10s %10s %8s\n' "wake: start→ssh ok (ms)" "$wo" "$wn" "$(ratio "$wo" "$wn")"
printf '%-34s %10s %10s %8s\n' "idle guest RAM resident (MiB)" "$io" "$in" "$(ratio "$io" "$in")"
printf '%-34s %10s %10s %8s\n' "base image, blocks used (MiB)" "$old_used" "$new_used" "$(ratio "$old_used" "$new_used")"
printf '%-34s %10s %10s %8s\n' "base image, file size (MiB)" "$old_size" "$new_size" "$(ratio "$old_size" "$new_size")"
printf '%-34s %10s %10s %8s\n' "base image build (s, warm apt)" "$old_build" "$new_build" "$(ratio "$old_build" "$new_build")"

#!/usr/bin/env bash
# Checkpoint benchmark: prints a table of, for a running guest (QEMU):
#   - the disk part of `checkpoint` (frozen layer + live switch) and how
#     long the VM was paused, after 1, 4 and 16 GiB were written in it
#     (the goal: flat, under 200 ms);
#   - the source part for 10,000 files / 1 GiB, on ext4 (a copy) and on a
#     loop-mounted XFS with reflinks (the goal: under 1 s);
#   - `rollback` (the VM stopped, restored, booted to ready);
#   - the space a checkpoint holds after 100 MiB of changes.
# Times are Kennel's own, from its replies ("disk N ms", "paused for N ms",
# "source ... (N ms)"); rollback is timed around the command.
# Needs root, QEMU, virtiofsd, OpenSSH (scripts/install-deps.sh run); the
# XFS row needs xfsprogs (mkfs.xfs) and loop devices, else it says so.
# Usage: [BENCH_KENNEL_BIN=path] bench/checkpoint.sh [GIB...]   (default: 1 4 16)
set -euo pipefail
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1 4 16)
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
cache="${KENNEL_TEST_CACHE:-$HOME/.cache/kennel/test-data}"
# BENCH_KENNEL_BIN: a kennel binary built already (e.g. the tests' own).
K="${BENCH_KENNEL_BIN:-}"
if [ -z "$K" ]; then
  (cd "$repo" && cargo build --quiet)
  K="$CARGO_TARGET_DIR/debug/kennel"
fi

work=$(mktemp -d /tmp/kc.XXXXXX)
pids=()
mounted=""
cleanup() {
  for d in "$work/ext4" "$work/xfs"; do
    [ -d "$d/kennel-data/vms" ] || continue
    for v in "$d"/kennel-data/vms/*; do
      [ -e "$v" ] && (cd "$d" && "$K" exec "rm $(basename "$v") --yes" >/dev/null 2>&1) || true
    done
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.2; done; done
  [ -n "$mounted" ] && { umount "$mounted" 2>/dev/null || umount -l "$mounted"; } || true
  rm -rf "$work"
}
trap cleanup EXIT
export KENNEL_VM__BACKEND=qemu KENNEL_VM__NETWORK=user RUST_LOG=warn KENNEL_IMAGES__APT_CACHE="$cache/apt"

# A data directory at $1 with the shared images, and its daemon.
serve_in() {
  mkdir -p "$1/kennel-data" "$cache/images"
  ln -sfn "$cache/images" "$1/kennel-data/images"
  (cd "$1" && "$K" image build >"$1/image-build.log" 2>&1) || { cat "$1/image-build.log"; exit 1; }
  (cd "$1" && exec "$K" serve 2>/dev/null) &
  pids+=($!)
  until python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" "$1/kennel-data/control.sock" 2>/dev/null; do sleep 0.1; done
}
kx() { (cd "$1" && "$K" exec "$2"); }
# The number before "ms" after $2 in the text $1.
ms_after() { sed -n "s/.*$2[^0-9]*\([0-9][0-9]*\) ms.*/\1/p" <<<"$1" | head -n 1; }
guest() {
  local d=$1 name=$2; shift 2
  local addr
  addr=$(kx "$d" "--json status $name" | sed -n 's/.*"ssh_addr":"\([^"]*\)".*/\1/p')
  ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes \
    -i "$d/kennel-data/keys/projects/$name/id_ed25519" -p "${addr##*:}" "dev@${addr%:*}" "$@"
}
# 10,000 files, 1 GiB, owned by a host user, in a project's source.
fill_source() {
  python3 - "$1" <<'EOF'
import os, sys
root = sys.argv[1]
chunk = os.urandom(1 << 20)
for d in range(100):
    p = os.path.join(root, "data", f"d{d:03}")
    os.makedirs(p, exist_ok=True)
    for f in range(100):
        with open(os.path.join(p, f"f{f:03}.bin"), "wb") as fh:
            off = (d * 100 + f) % 900
            fh.write(chunk[off * 1024:off * 1024 + 107374])
EOF
  chown -R 4242:4242 "$1"
}

declare -a rows
row() {
  rows+=("$(printf '%-44s %10s %10s %12s' "$1" "$2" "$3" "$4")")
  echo "ROW ${rows[-1]}"
}

# ---- ext4: the disk part after N GiB, rollback, space after 100 MiB.
mkdir -p "$work/ext4"
serve_in "$work/ext4"
E="$work/ext4"
kx "$E" "new project big --stack base --cpus 1 --memory 1G --disk 40G" >/dev/null
written=0
for g in "${sizes[@]}"; do
  while [ "$written" -lt "$g" ]; do
    guest "$E" big "dd if=/dev/zero of=/home/dev/fill$written bs=1M count=1024 conv=fsync status=none"
    written=$((written + 1))
  done
  out=$(kx "$E" "checkpoint big g$g")
  layer=$(du -B1 --apparent-size "$E/kennel-data/vms/big/checkpoints/g$g.qcow2" | cut -f1)
  row "checkpoint, ${g} GiB written (disk part)" "$(ms_after "$out" "disk")" "$(ms_after "$out" "paused for")" "$((layer >> 20)) MiB"
done
guest "$E" big "dd if=/dev/urandom of=/home/dev/change bs=1M count=100 conv=fsync status=none"
out=$(kx "$E" "checkpoint big after-100m")
own=$(sed -n 's/.*disk [0-9]* ms (\([^)]*\) of its own).*/\1/p' <<<"$out")
row "space held after 100 MiB of changes" "-" "-" "$own"
t0=$(date +%s%N)
kx "$E" "rollback big g${sizes[0]} --yes" >/dev/null
t1=$(date +%s%N)
row "rollback (stop, restore, boot to ready)" "$(( (t1 - t0) / 1000000 ))" "-" "-"
kx "$E" "rm big --yes" >/dev/null

# ---- the source part: 10,000 files / 1 GiB, ext4 then XFS with reflinks.
src_row() {
  local d=$1 fs=$2
  mkdir -p "$d/kennel-data/projects/src"
  fill_source "$d/kennel-data/projects/src"
  kx "$d" "new project src --adopt --stack base --cpus 1 --memory 512M --disk 4G" >/dev/null
  out=$(kx "$d" "checkpoint src s1")
  how=$(sed -n 's/.*files \(by reflink\|copied\).*/\1/p' <<<"$out")
  row "source 10k files / 1 GiB on $fs ($how)" "$(ms_after "$out" "files [a-z ]*(")" "$(ms_after "$out" "paused for")" "$(du -sh "$d/kennel-data/vms/src/checkpoints/s1" | cut -f1)"
  kx "$d" "rm src --yes" >/dev/null
}
src_row "$E" ext4
if command -v mkfs.xfs >/dev/null; then
  truncate -s 6G "$work/xfs.img"
  mkfs.xfs -q -m reflink=1 "$work/xfs.img"
  mkdir -p "$work/xfs"
  mount -o loop "$work/xfs.img" "$work/xfs"
  mounted="$work/xfs"
  # One daemon at a time: both would listen on the default ports.
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  serve_in "$work/xfs"
  src_row "$work/xfs" xfs
else
  row "source on XFS: mkfs.xfs missing (apt install xfsprogs)" "-" "-" "-"
fi

printf '\n%-44s %10s %10s %12s\n' "what" "ms" "paused ms" "bytes"
printf '%s\n' "${rows[@]}"

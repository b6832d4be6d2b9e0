#!/usr/bin/env bash
# `new project` benchmark: time from the command to the reply with the SSH
# string, split into validation, clone, image, disk, boot and ready, for a
# small repository and one with 20,000 files (both cloned over file://).
# Needs root, QEMU, virtiofsd, OpenSSH, git (scripts/install-deps.sh run).
# Usage: bench/new-project.sh [RUNS]   (default 2)
set -euo pipefail
runs="${1:-2}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
cache="${KENNEL_TEST_CACHE:-$HOME/.cache/kennel/test-data}"
fixtures="$HOME/.cache/kennel/bench-fixtures"
(cd "$repo" && cargo build --quiet)
K="$CARGO_TARGET_DIR/debug/kennel"

# Fixtures, made once: a small Rust crate and a 20k-file tree.
mkrepo() {
  local dir=$1 files=$2
  [ -d "$dir/.git" ] && return
  mkdir -p "$dir/src"
  printf '[package]\nname = "b"\nversion = "0.1.0"\nedition = "2021"\n' > "$dir/Cargo.toml"
  echo 'fn main() {}' > "$dir/src/main.rs"
  for ((d = 0; d < files / 100; d++)); do
    mkdir -p "$dir/data/d$d"
    for ((f = 0; f < 100; f++)); do echo "file $d/$f" > "$dir/data/d$d/f$f.txt"; done
  done
  git -C "$dir" init -q
  git -C "$dir" -c user.name=b -c user.email=b@example.org add -A
  git -C "$dir" -c user.name=b -c user.email=b@example.org commit -q -m fixture
}
mkrepo "$fixtures/small" 0
mkrepo "$fixtures/large" 20000

work=$(mktemp -d /tmp/kn.XXXXXX)
cleanup() {
  for v in "$work"/kennel-data/vms/*; do [ -d "$v" ] && (cd "$work" && "$K" exec "rm $(basename "$v") --yes" >/dev/null 2>&1); done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/kennel-data" "$cache/images"
ln -s "$cache/images" "$work/kennel-data/images"
cd "$work"
export KENNEL_VM__BACKEND=qemu KENNEL_VM__NETWORK=user RUST_LOG=warn KENNEL_IMAGES__APT_CACHE="$cache/apt"
"$K" image build --stack rust >/dev/null 2>&1

now() { date +%s.%N; }
ms() { echo "($2 - $1) * 1000 / 1" | bc; }
rows=()
for kind in small large; do
  files=$(git -C "$fixtures/$kind" ls-files | wc -l)
  for i in $(seq 1 "$runs"); do
    name="$kind$i"
    t0=$(now)
    "$K" exec "new project $name --git file://$fixtures/$kind --cpus 1 --memory 512M --disk 4G" >/dev/null 2>&1
    t1=$(now)
    tj="kennel-data/vms/$name/timings.json"
    get() { sed -n "s/.*\"$1\": \([0-9]*\).*/\1/p" "$tj"; }
    total=$(ms "$t0" "$t1")
    src=$(get source_ms); img=$(get image_ms); dsk=$(get disk_ms); spn=$(get spawn_ms); boot=$(get boot_ms); ready=$(get sshd_ms)
    valid=$((total - src - img - dsk - spn - boot - ready))
    rows+=("$(printf '%-8s %7s %10s %7s %7s %7s %8s %7s %8s' "$name" "$files" "$valid" "$src" "$img" "$dsk" "$((spn + boot))" "$ready" "$total")")
    "$K" exec "rm $name --yes" >/dev/null 2>&1
    rm -rf "kennel-data/projects/$name"
  done
done
echo
echo "new project --git file://… → reply, on $(nproc) cores, QEMU/TCG, rust image (ms)"
printf '%-8s %7s %10s %7s %7s %7s %8s %7s %8s\n' "run" "files" "validation" "clone" "image" "disk" "boot" "ready" "total"
printf '%s\n' "${rows[@]}"
echo "(validation: everything outside the provisioner's phases — the CLI, store, policy, queue)"

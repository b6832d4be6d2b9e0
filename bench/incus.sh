#!/usr/bin/env bash
# Incus backend benchmark, beside Kennel's own QEMU backend in one run:
#   - `new project` → first `ssh … true` (create→SSH-ready), and a wake
#     (stop, then `start` → `ssh … true`), each backend in turn, RUNS times;
#   - Incus API round trips per Kennel operation (create, start, stop,
#     status, rm), counted from the daemon's own request log.
# The Incus daemon is the script's own (a private INCUS_DIR and bridge).
# Needs root, incus-base, QEMU, virtiofsd, OpenSSH (scripts/install-deps.sh test).
# Usage: bench/incus.sh [RUNS]   (default 2)
set -euo pipefail
runs="${1:-2}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
cache="${KENNEL_TEST_CACHE:-$HOME/.cache/kennel/test-data}"
(cd "$repo" && cargo build --quiet)
K="$CARGO_TARGET_DIR/debug/kennel"

work=$(mktemp -d /var/tmp/kincus.XXXXXX)
# LXC wants every directory above a container's root reachable by it.
chmod 755 "$work"
bridge="kb$$"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  INCUS_DIR="$work/incus" incus stop --all --force >/dev/null 2>&1 || true
  INCUS_DIR="$work/incus" incus admin shutdown --timeout 10 >/dev/null 2>&1 || true
  pkill -KILL -f "$work" 2>/dev/null || true
  ip link del "$bridge" 2>/dev/null || true
  grep "$work" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  [ -n "${KEEP:-}" ] && { echo "kept $work" >&2; return; }
  rm -rf "$work"
}
trap cleanup EXIT

# The Incus daemon, logging every API request.
mkdir -p "$work/incus"
INCUS_DIR="$work/incus" /usr/libexec/incus/incusd --group root --debug >"$work/incusd.log" 2>&1 &
pids+=($!)
INCUS_DIR="$work/incus" incus admin waitready --timeout 60
INCUS_DIR="$work/incus" incus admin init --preseed <<EOF
networks:
- name: $bridge
  type: bridge
  config: {ipv4.address: 10.231.$(($$ % 200)).1/24, ipv4.nat: "false", ipv6.address: none}
storage_pools:
- {name: default, driver: dir}
EOF
requests() { grep -c 'Handling API request' "$work/incusd.log" || true; }

# One Kennel daemon per backend, each in its own directory.
start_kennel() { # NAME BACKEND SSH_PORT HTTPS_PORT
  mkdir -p "$work/$1/kennel-data"
  ln -s "$cache/images" "$work/$1/kennel-data/images"
  (cd "$work/$1" && exec env KENNEL_VM__BACKEND="$2" KENNEL_VM__NETWORK=user RUST_LOG=warn \
    KENNEL_IMAGES__APT_CACHE="$cache/apt" KENNEL_SSH__LISTEN="127.0.0.1:$3" \
    KENNEL_HTTPS__LISTEN="127.0.0.1:$4" KENNEL_INCUS__ADDRESS="$work/incus/unix.socket" \
    KENNEL_INCUS__NETWORK="$bridge" KENNEL_INCUS__PORTS="46000-46100" \
    KENNEL_VM__BOOT_TIMEOUT_SECS=300 "$K" serve 2>"$work/$1.log") &
  pids+=($!)
  until python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" "$work/$1/kennel-data/control.sock" 2>/dev/null; do
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then echo "kennel serve ($1) did not start:" >&2; tail -3 "$work/$1.log" >&2; exit 1; fi
    sleep 0.1
  done
}
mkdir -p "$cache/images"
start_kennel qemu qemu 46201 46202
start_kennel incus incus 46203 46204

kx() { # BACKEND LINE: the answer on stdout; on failure, all of it on stderr
  local out
  if ! out=$(cd "$work/$1" && "$K" exec "$2" 2>&1); then
    printf '%s: `%s` failed:\n%s\n' "$1" "$2" "$out" >&2
    return 1
  fi
  printf '%s\n' "$out" | grep -v '^… '
}
now() { date +%s.%N; }
ms() { echo "($2 - $1) * 1000 / 1" | bc; }
sshq() { # BACKEND PROJECT
  local addr
  addr=$(kx "$1" "--json status $2" | sed -n 's/.*"ssh_addr":"\([^"]*\)".*/\1/p')
  ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes \
    -o ConnectTimeout=120 -i "$work/$1/kennel-data/keys/projects/$2/id_ed25519" -p "${addr##*:}" "dev@${addr%:*}" true
}

# Images first (built once, then cached; imported into Incus once).
for b in qemu incus; do kx "$b" "new project warm --stack base --cpus 1 --memory 512M --disk 4G" >/dev/null; kx "$b" "rm warm --yes" >/dev/null; done

declare -A create wake
declare -A calls
for i in $(seq 1 "$runs"); do
  for b in qemu incus; do
    r0=$(requests); t0=$(now)
    kx "$b" "new project p$i --stack base --cpus 1 --memory 512M --disk 4G" >/dev/null
    sshq "$b" "p$i"
    t1=$(now); r1=$(requests)
    create[$b]+="$(ms "$t0" "$t1") "
    [ "$b" = incus ] && calls[create]=$((r1 - r0))
    r0=$(requests); kx "$b" "stop p$i" >/dev/null; r1=$(requests)
    [ "$b" = incus ] && calls[stop]=$((r1 - r0))
    r0=$(requests); t0=$(now)
    kx "$b" "start p$i" >/dev/null
    sshq "$b" "p$i"
    t1=$(now); r1=$(requests)
    wake[$b]+="$(ms "$t0" "$t1") "
    [ "$b" = incus ] && calls[start]=$((r1 - r0))
    r0=$(requests); kx "$b" "status p$i" >/dev/null; r1=$(requests)
    [ "$b" = incus ] && calls[status]=$((r1 - r0))
    r0=$(requests); kx "$b" "rm p$i --yes" >/dev/null; r1=$(requests)
    [ "$b" = incus ] && calls[rm]=$((r1 - r0))
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '\n%-34s %14s %14s %8s\n' "ms (median of $runs)" "qemu (tcg)" "incus (lxc)" "ratio"
for m in create wake; do
  declare -n arr=$m
  q=$(echo "${arr[qemu]}" | median); c=$(echo "${arr[incus]}" | median)
  label=$([ "$m" = create ] && echo "new project → ssh true" || echo "wake: start → ssh true")
  printf '%-34s %14s %14s %8s\n' "$label" "$q" "$c" "$(echo "scale=2; $c / $q" | bc)"
done
printf '\n%-34s %14s\n' "Incus API requests per operation" "requests"
for op in create start stop status rm; do printf '%-34s %14s\n' "$op" "${calls[$op]:-?}"; done
printf '(all runs, each: %s %s)\n' "${create[incus]}" "${wake[incus]}"

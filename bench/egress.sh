#!/usr/bin/env bash
# Egress policy benchmark: a real guest (QEMU, user-mode networking)
# fetching from a "world" network namespace, its project open and closed
# (with the name allowed) in turn, in one run:
#   - throughput: one 64 MiB download (curl), MiB/s;
#   - connection rate: 400 requests, each on a new connection
#     (curl, `Connection: close`), connections/s.
# Kennel runs in a namespace of its own; nothing leaves this machine.
# Needs root, QEMU, virtiofsd, OpenSSH, dnsmasq, python3, nftables
# (scripts/install-deps.sh test) and the test image cache (any VM test
# builds it).
# Usage: bench/egress.sh [ROUNDS]   (default 3)
set -euo pipefail
rounds="${1:-3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
cache="${KENNEL_TEST_CACHE:-$HOME/.cache/kennel/test-data}"
(cd "$repo" && cargo build --quiet)
K="$CARGO_TARGET_DIR/debug/kennel"
for p in dnsmasq python3 nft qemu-system-x86_64 ssh; do
  command -v "$p" >/dev/null || { echo "$p is missing: run scripts/install-deps.sh test" >&2; exit 1; }
done

work=$(mktemp -d /var/tmp/kegress.XXXXXX)
kns="kbe-k$$"
wns="kbe-w$$"
pids=()
cleanup() {
  (cd "$work" && ip netns exec "$kns" "$K" exec "rm eg --yes" >/dev/null 2>&1) || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  pkill -KILL -f "$work" 2>/dev/null || true
  ip netns del "$kns" 2>/dev/null || true
  ip netns del "$wns" 2>/dev/null || true
  rm -rf "/etc/netns/$kns"
  [ -n "${KEEP:-}" ] && { echo "kept $work" >&2; return; }
  rm -rf "$work"
}
trap cleanup EXIT

# The world: DNS and a web server at 198.18.0.2, joined to Kennel's
# namespace by a veth pair.
ip netns add "$kns"
ip netns add "$wns"
ip -n "$kns" link set lo up
ip -n "$wns" link set lo up
ip link add "bek$$" type veth peer name "bew$$"
ip link set "bek$$" netns "$kns"
ip link set "bew$$" netns "$wns"
ip -n "$kns" addr add 198.18.0.1/24 dev "bek$$"
ip -n "$kns" link set "bek$$" up
ip -n "$kns" route add default via 198.18.0.2
ip -n "$wns" addr add 198.18.0.2/24 dev "bew$$"
ip -n "$wns" link set "bew$$" up
mkdir -p "/etc/netns/$kns" "$work/www"
echo "nameserver 198.18.0.2" >"/etc/netns/$kns/resolv.conf"
echo hello >"$work/www/hello"
head -c $((64 << 20)) /dev/zero >"$work/www/big"
ip netns exec "$wns" dnsmasq --keep-in-foreground --no-resolv --no-hosts \
  --listen-address=198.18.0.2 --bind-interfaces --port=53 --user=root \
  --pid-file="$work/dnsmasq.pid" --address=/api.world.test/198.18.0.2 --local-ttl=300 \
  >/dev/null 2>&1 &
pids+=($!)
(cd "$work/www" && exec ip netns exec "$wns" python3 -m http.server 80 --bind 198.18.0.2 >/dev/null 2>&1) &
pids+=($!)

# Kennel, in its own namespace.
mkdir -p "$work/kennel-data" "$cache/images"
ln -s "$cache/images" "$work/kennel-data/images"
(cd "$work" && exec ip netns exec "$kns" env KENNEL_VM__BACKEND=qemu KENNEL_VM__NETWORK=user \
  RUST_LOG=warn KENNEL_IMAGES__APT_CACHE="$cache/apt" KENNEL_SSH__LISTEN=127.0.0.1:46301 \
  KENNEL_HTTPS__LISTEN=127.0.0.1:46302 KENNEL_VM__BOOT_TIMEOUT_SECS=300 \
  "$K" serve 2>"$work/serve.log") &
pids+=($!)
until [ -S "$work/kennel-data/control.sock" ] && ip netns exec "$kns" "$K" --version >/dev/null 2>&1 &&
  (cd "$work" && ip netns exec "$kns" "$K" exec whoami >/dev/null 2>&1); do
  kill -0 "${pids[-1]}" 2>/dev/null || { echo "kennel serve did not start:" >&2; tail -3 "$work/serve.log" >&2; exit 1; }
  sleep 0.2
done
kx() { (cd "$work" && ip netns exec "$kns" "$K" exec "$1" 2>&1) | grep -v '^… ' >/dev/null; }
kx "new project eg --stack base --cpus 1 --memory 1G --disk 2G"
key="$work/kennel-data/keys/projects/eg/id_ed25519"
guest() {
  ip netns exec "$kns" ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o LogLevel=ERROR -o BatchMode=yes -o IdentitiesOnly=yes -i "$key" -p 10022 dev@127.77.0.2 "$1"
}
until guest 'curl -sf -m 10 -o /dev/null http://api.world.test/hello'; do sleep 1; done

# One measurement: "MiB/s conn/s".
measure() {
  guest 'set -e
    curl -sf -m 10 -o /dev/null http://api.world.test/hello
    bps=$(curl -sf -o /dev/null -w "%{speed_download}" http://api.world.test/big)
    s=$(date +%s.%N)
    curl -sf -o /dev/null -H "Connection: close" "http://api.world.test/hello?[1-400]"
    e=$(date +%s.%N)
    echo "$bps $s $e"' |
    awk '{ printf "%.1f %.1f\n", $1 / 1048576, 400 / ($3 - $2) }'
}

declare -a open_mib open_cps closed_mib closed_cps
run_open() {
  kx "egress eg open"
  read -r m c < <(measure)
  open_mib+=("$m"); open_cps+=("$c")
}
run_closed() {
  kx "egress eg closed"
  kx "egress eg allow api.world.test"
  read -r m c < <(measure)
  closed_mib+=("$m"); closed_cps+=("$c")
}
# A round to warm the guest's and the host's caches, not counted; then
# the two modes in turn, the first of each round alternating.
measure >/dev/null
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) = 1 ]; then run_open; run_closed; else run_closed; run_open; fi
  echo "round $r: open ${open_mib[-1]} MiB/s ${open_cps[-1]} conn/s, closed ${closed_mib[-1]} MiB/s ${closed_cps[-1]} conn/s" >&2
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
om=$(median "${open_mib[@]}"); oc=$(median "${open_cps[@]}")
cm=$(median "${closed_mib[@]}"); cc=$(median "${closed_cps[@]}")
echo
echo "Egress, guest (QEMU TCG, user-mode networking) → world namespace; medians of $rounds rounds"
printf '| %-26s | %12s | %14s | %6s |\n' "" "open" "closed+allowed" "ratio"
printf '|%s|%s|%s|%s|\n' "----------------------------" "--------------" "----------------" "--------"
printf '| %-26s | %12s | %14s | %6s |\n' "64 MiB download, MiB/s" "$om" "$cm" "$(echo "scale=2; $cm / $om" | bc)"
printf '| %-26s | %12s | %14s | %6s |\n' "new connections/s (400)" "$oc" "$cc" "$(echo "scale=2; $cc / $oc" | bc)"
echo "each round: open: ${open_mib[*]} MiB/s, ${open_cps[*]} conn/s; closed: ${closed_mib[*]} MiB/s, ${closed_cps[*]} conn/s"

#!/usr/bin/env bash
# SSH paths benchmark: throughput (an upload to `cat >/dev/null`), round-trip
# latency (`ssh … true`, median of 5) and the relay's CPU seconds per GiB,
# for five paths to the same VM:
#   direct   straight to the VM's sshd (its forwarded port)
#   openssh  through a second, stock sshd on the host (`ssh -J`): the
#            relay decrypts the client's session, the VM's is end to end
#   openssh_b the same sshd bridging as Kennel does: the client's session
#            ends there, and a forced command (`ssh` to the VM's sshd)
#            carries it on in a session of its own (decrypt, encrypt again)
#   kennel   through Kennel's SSH gateway (`ssh PROJECT@HOST`)
#   kennel_j ProxyJump through the gateway (`ssh -J HOST dev@PROJECT`)
# Needs root, QEMU, virtiofsd, OpenSSH client and server.
# Usage: bench/ssh.sh [MiB]   (default 256); BENCH_PROFILE=debug|release
# The uploads run in BENCH_REPEATS rounds (default 3), each path once a
# round: medians, and the spread of the relay's CPU. BENCH_PATHS="openssh
# kennel" runs only those paths (default: all five); BENCH_WAKE=0 leaves
# out the wake latency.
# BENCH_STAT=1 also counts the relay's context switches and system calls
# per GiB (perf stat; its syscall tracepoint slows every system call, so
# the CPU column of such a run favours the path making fewer: compare CPU
# in a run without it).
set -euo pipefail
mib="${1:-256}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
cache="${KENNEL_TEST_CACHE:-$HOME/.cache/kennel/test-data}"
# A release build, as people run Kennel (BENCH_PROFILE=debug for the
# test build: its unoptimised relay costs about twice the CPU).
# BENCH_KENNEL=PATH runs that build instead (a copy of an older one:
# before/after).
profile="${BENCH_PROFILE:-release}"
if [ -n "${BENCH_KENNEL:-}" ]; then
  K="$BENCH_KENNEL"
else
  if [ "$profile" = release ]; then
    (cd "$repo" && cargo build --quiet --release -p kennel)
  else
    (cd "$repo" && cargo build --quiet -p kennel)
  fi
  K="$CARGO_TARGET_DIR/$profile/kennel"
fi
SSHD=$(command -v sshd || echo /usr/sbin/sshd)
[ -x "$SSHD" ] || { echo "install openssh-server (sshd) for the OpenSSH relay path" >&2; exit 1; }

work=$(mktemp -d /tmp/ks.XXXXXX)
pids=()
cleanup() {
  (cd "$work" && "$K" exec "rm bench --yes" >/dev/null 2>&1) || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
mkdir -p kennel-data "$cache/images"
ln -s "$cache/images" kennel-data/images
gport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export KENNEL_VM__BACKEND=qemu KENNEL_VM__NETWORK=user RUST_LOG=warn KENNEL_SSH__LISTEN=127.0.0.1:$gport KENNEL_IMAGES__APT_CACHE="$cache/apt"
ssh-keygen -q -t ed25519 -N '' -f me
"$K" exec "key add \"$(cat me.pub)\"" >/dev/null
"$K" serve 2>/dev/null &
serve=$!
pids+=("$serve")
until python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" kennel-data/control.sock 2>/dev/null; do sleep 0.1; done
"$K" exec "new project bench --stack base --cpus 1 --memory 512M --disk 2G" >/dev/null 2>&1
addr=$("$K" exec "--json status bench" | sed -n 's/.*"ssh_addr":"\([^"]*\)".*/\1/p')
vip=${addr%:*}; vport=${addr##*:}
pkey=kennel-data/keys/projects/bench/id_ed25519

O=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes)

# A stock sshd on the host as the OpenSSH relay.
ssh-keygen -q -t ed25519 -N '' -f relay_host
cp me.pub relay_keys
# A second key whose sessions the relay bridges into the VM itself (the
# forced command), as Kennel's `ssh PROJECT@HOST` does.
ssh-keygen -q -t ed25519 -N '' -f me_b
printf 'command="exec ssh -T %s -i %s -p %s dev@%s \\"$SSH_ORIGINAL_COMMAND\\"" %s\n' \
  "${O[*]}" "$work/$pkey" "$vport" "$vip" "$(cat me_b.pub)" >> relay_keys
cat > relay.conf <<EOF
Port $rport
ListenAddress 127.0.0.1
HostKey $work/relay_host
AuthorizedKeysFile $work/relay_keys
PidFile $work/relay.pid
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
# What Kennel's gateway offers clients (AES-GCM only), so that the client's
# leg costs the same cipher on every path; the VM's leg is OpenSSH's
# default (chacha20-poly1305) for the bridging \`ssh\` as for Kennel under TCG.
Ciphers aes256-gcm@openssh.com,aes128-gcm@openssh.com
EOF
mkdir -p /run/sshd
"$SSHD" -D -e -f relay.conf 2>/dev/null &
pids+=("$!")
sleep 0.5

direct() { ssh "${O[@]}" -i "$pkey" -p "$vport" "dev@$vip" "$@"; }
openssh() { ssh "${O[@]}" -i "$pkey" -o "ProxyCommand=ssh ${O[*]} -i $work/me -p $rport -W %h:%p root@127.0.0.1" -p "$vport" "dev@$vip" "$@"; }
openssh_b() { ssh "${O[@]}" -i me_b -p "$rport" root@127.0.0.1 "$@"; }
kennel() { ssh "${O[@]}" -i me -p "$gport" bench@127.0.0.1 "$@"; }
# ProxyJump through the gateway: end-to-end to the VM's sshd with the
# user's own key, the gateway relaying bytes (as the OpenSSH relay does).
kennel_j() { ssh "${O[@]}" -i me -o "ProxyCommand=ssh ${O[*]} -i $work/me -p $gport -W bench:22 me@127.0.0.1" dev@bench "$@"; }

head -c $((mib << 20)) /dev/urandom > payload
# utime + stime + the reaped children's cutime + cstime, in ticks.
cpu_of() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
spread() { printf '%s\n' "$@" | sort -n | awk 'NR == 1 {lo = $1} END {print lo "-" $1}'; }

rows=()
declare -A relay_cpu lats rates cpus switches calls
stat="${BENCH_STAT:-0}"
# perf (Debian linux-perf), for BENCH_STAT and BENCH_PERF.
need_perf() {
  command -v perf >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends linux-perf >/dev/null
}
[ "$stat" = 1 ] && need_perf
# The stat file's count of event $1, per GiB uploaded.
per_gib() { awk -F, -v e="$1" -v m="$mib" '$3 == e {printf "%.0f", $1 * 1024 / m}' "$2"; }
repeats="${BENCH_REPEATS:-3}"
read -ra paths <<<"${BENCH_PATHS:-direct openssh openssh_b kennel kennel_j}"
relay_of() {
  case $1 in
    kennel|kennel_j) echo "$serve" ;;
    openssh|openssh_b) cat relay.pid ;;
  esac
}
for path in "${paths[@]}"; do
  for i in 1 2 3 4 5; do t0=$(now); $path true; t1=$(now); lats[$path]+=" $(echo "($t1 - $t0) * 1000 / 1" | bc)"; done
done
# The uploads in rounds, each path once a round: a change in the
# machine's load during the run falls on every path alike, not on the
# one measured then (this host is shared; the ratios are what count).
for r in $(seq "$repeats"); do
  for path in "${paths[@]}"; do
    relay_pid=$(relay_of "$path")
    c0=0; [ -n "$relay_pid" ] && c0=$(cpu_of "$relay_pid")
    counter=
    if [ "$stat" = 1 ] && [ -n "$relay_pid" ]; then
      # Counts the relay and the children it forks from now on (the
      # OpenSSH relay's per-connection sshd), until its `sleep` is ended.
      perf stat -x, -e context-switches,raw_syscalls:sys_enter -p "$relay_pid" \
        -o "$work/stat.$path" -- sleep 100000 >/dev/null 2>&1 &
      counter=$!
      sleep 0.3
    fi
    t0=$(now)
    $path 'cat > /dev/null' < payload
    t1=$(now)
    if [ -n "$counter" ]; then
      sleep 0.5
      pkill -P "$counter" sleep || true
      wait "$counter" 2>/dev/null || true
      switches[$path]+=" $(per_gib context-switches "$work/stat.$path")"
      calls[$path]+=" $(per_gib raw_syscalls:sys_enter "$work/stat.$path")"
    fi
    secs=$(echo "$t1 - $t0" | bc)
    rates[$path]+=" $(echo "scale=1; $mib / $secs" | bc)"
    if [ -n "$relay_pid" ]; then
      # The OpenSSH relay's per-connection sshd has exited and been reaped
      # by now: its time is in the listener's cutime/cstime.
      sleep 0.5
      c1=$(cpu_of "$relay_pid")
      cpus[$path]+=" $(echo "scale=2; ($c1 - $c0) / $hz * 1024 / $mib" | bc)"
    fi
  done
done
for path in "${paths[@]}"; do
  cpu="-"; spread="-"
  if [ -n "${cpus[$path]:-}" ]; then
    # shellcheck disable=SC2086 # lists of numbers, split on purpose
    cpu=$(median ${cpus[$path]}); spread=$(spread ${cpus[$path]})
    relay_cpu[$path]=$cpu
  fi
  counts=
  if [ -n "${switches[$path]:-}" ]; then
    # shellcheck disable=SC2086
    counts=$(printf ' %14s %14s' "$(median ${switches[$path]})" "$(median ${calls[$path]})")
  fi
  # shellcheck disable=SC2086
  rows+=("$(printf '%-8s %10s %12s %14s %12s' "$path" "$(median ${rates[$path]})" "$(median ${lats[$path]})" "$cpu" "$spread")$counts")
done
echo
echo "SSH paths to one VM ($mib MiB upload to cat >/dev/null, $repeats rounds of every path; QEMU/TCG guest; $(nproc) cores)"
header=$(printf '%-8s %10s %12s %14s %12s' "path" "MiB/s" "ssh true ms" "relay CPU s/GiB" "(min-max)")
[ "$stat" = 1 ] && header+=$(printf ' %14s %14s' "switches/GiB" "syscalls/GiB")
printf '%s\n' "$header"
printf '%s\n' "${rows[@]}"
# compare PATH PEER WHAT: PATH's median relay CPU over PEER's, when both ran.
compare() {
  if [ -n "${relay_cpu[$1]:-}" ] && [ -n "${relay_cpu[$2]:-}" ]; then
    echo "$1 relay CPU per GiB: $(echo "scale=2; ${relay_cpu[$1]} / ${relay_cpu[$2]}" | bc)x $3 (medians)"
  fi
}
compare kennel openssh "OpenSSH's relay"
compare kennel_j openssh "OpenSSH's relay"
# Like for like: both bridge (decrypt the client's session, encrypt the VM's).
compare kennel openssh_b "OpenSSH bridging the same way"
echo "(relay CPU: the kennel serve process, or the stock sshd with its reaped per-connection children)"

if [ -n "${BENCH_PERF:-}" ]; then
  # Where the bridged path's CPU goes: the daemon profiled over one more
  # upload (perf, Debian linux-perf).
  need_perf
  perf record -q -g -o "$work/perf.data" -p "$serve" >/dev/null 2>&1 &
  rec=$!
  sleep 0.5
  kennel 'cat > /dev/null' < payload
  kill -INT "$rec"; wait "$rec" 2>/dev/null || true
  cp "$work/perf.data" "${TMPDIR:-/tmp}/kennel-ssh-perf.data"
  echo; echo "where the bridged path's CPU goes (self time by symbol; kept in ${TMPDIR:-/tmp}/kennel-ssh-perf.data):"
  perf report -i "$work/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -40 || true
fi

# Wake latency: a stopped project, from the first SSH packet (`ssh
# bench@HOST true` through the gateway) to a working shell, beside a plain
# `start` (the boot alone) for what the gateway adds.
[ "${BENCH_WAKE:-1}" = 0 ] && exit 0
wake=(); start=()
for i in 1 2 3; do
  "$K" exec "stop bench" >/dev/null
  t0=$(now); kennel true; t1=$(now)
  wake+=("$(echo "($t1 - $t0) * 1000 / 1" | bc)")
  "$K" exec "stop bench" >/dev/null
  t0=$(now); "$K" exec "start bench" >/dev/null; t1=$(now)
  start+=("$(echo "($t1 - $t0) * 1000 / 1" | bc)")
done
echo
echo "wake of a stopped project (median of 3, ms): ssh through the gateway $(median "${wake[@]}") (${wake[*]}); 'start' alone $(median "${start[@]}") (${start[*]})"

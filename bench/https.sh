#!/usr/bin/env bash
# HTTPS gateway benchmark, side by side in one run on loopback: nginx as a
# TLS reverse proxy (upstream keep-alive) and Kennel's gateway, both in
# front of the SAME small HTTP backend on the host (nginx serving a tiny
# and a 1 MiB response; a guest under TCG is too slow to be the backend).
# The proxies are pinned to CPU 0, the load generators to CPU 1.
#   wrk     HTTP/1.1, keep-alive
#   h2load  HTTP/2
# Reports requests/s (and the ratio to nginx), p50/p99 latency over
# hitting the backend directly (wrk), the proxy's CPU ms per 10k requests,
# the same with the backend's CPU added ("+app": both share CPU 0, and
# loopback's TCP work is charged to whichever of them is running, so
# some of it moves between the two with the proxy's timing) and its RSS.
# Installs nginx, wrk and h2load (nghttp2-client) if missing.
# Usage: bench/https.sh [seconds per run]   (default 10)
#   BENCH_REPEATS=N rounds of each cell (default 3): the median round and
#   the range of the ratio to nginx.
#   BENCH_BEFORE=PATH also runs an older build of the gateway example
#   (a copy of target/release/examples/https_bench) beside this one, on
#   the same backend and CPU, as "before" rows: before/after in one run.
#   BENCH_PERF=1 (or dwarf, with callers) also profiles the gateway (perf, Debian linux-perf) on
#   the tiny HTTP/1.1 run and prints where its CPU goes.
set -euo pipefail
secs="${1:-10}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
(cd "$repo" && cargo build --quiet --release -p kennel-gateway --features kennel-core/testing --example https_bench)
GW="$CARGO_TARGET_DIR/release/examples/https_bench"

work=$(mktemp -d /tmp/kh.XXXXXX)
chmod 755 "$work"  # nginx workers run as another user
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in nginx backend; do
    [ -f "$work/$f.pid" ] && kill "$(cat "$work/$f.pid")" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
bport=$(free); nport=$(free); kport=$(free); oport=$(free)
mkdir -p "$work/www"
printf 'ok\n' >"$work/www/tiny"
head -c $((1 << 20)) /dev/zero >"$work/www/big"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=app.bench.test" -addext "subjectAltName=DNS:app.bench.test" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat >"$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work/tmp;
  proxy_temp_path $work/tmp;
  sendfile on;
  upstream backend { server 127.0.0.1:$bport; keepalive 64; }
  server {
    listen 127.0.0.1:$nport ssl http2;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_buffering on;
      proxy_buffer_size 64k;
      proxy_buffers 16 64k;
      proxy_max_temp_file_size 0;
    }
  }
}
CONF
# The backend: an nginx of its own, so the proxy's columns are the proxy's.
cat >"$work/backend.conf" <<CONF
worker_processes 1;
pid $work/backend.pid;
error_log $work/backend-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work/tmp;
  sendfile on;
  server { listen 127.0.0.1:$bport; root $work/www; }
}
CONF
mkdir -p "$work/tmp"
taskset -c 0 "$NGINX" -c "$work/backend.conf"
taskset -c 0 "$NGINX" -c "$work/nginx.conf"
taskset -c 0 "$GW" "127.0.0.1:$bport" "$kport" bench.test "$work/ca" >"$work/gw.log" 2>&1 &
gw=$!
pids+=("$gw")
until grep -q ready "$work/gw.log" 2>/dev/null; do sleep 0.1; done
old=
if [ -n "${BENCH_BEFORE:-}" ]; then
  taskset -c 0 "$BENCH_BEFORE" "127.0.0.1:$bport" "$oport" bench.test "$work/ca-before" >"$work/old.log" 2>&1 &
  old=$!
  pids+=("$old")
  until grep -q ready "$work/old.log" 2>/dev/null; do sleep 0.1; done
fi
sleep 0.3
nginx_worker=$(pgrep -P "$(cat "$work/nginx.pid")" | head -1)
backend_worker=$(pgrep -P "$(cat "$work/backend.pid")" | head -1)
[ "$(curl -s -o /dev/null -w "%{size_download}" "http://127.0.0.1:$bport/big")" = 1048576 ] || { echo "the backend does not serve /big" >&2; exit 1; }

cpu_ms() { awk '{print ($14 + $15) * 1000 / '"$(getconf CLK_TCK)"'}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# ratio A B -> A/B to two places, "-" when B is 0.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}'; }

# run URL PID|- h1|h2 [h2load --connect-to]
#   -> "rps p50 p99 cpu_ms_per_10k syscalls_per_request cpu_ms_per_10k_with_the_backend"
run() {
  local url=$1 pid=$2 proto=$3 connect=${4:-} before after out rps p50 p99 n b0 b1
  before=$([ "$pid" = - ] && echo 0 || cpu_ms "$pid")
  b0=$(cpu_ms "$backend_worker")
  local stat=$work/stat.$RANDOM sp=
  if [ "$pid" != - ] && command -v perf >/dev/null 2>&1; then
    perf stat -x, -e raw_syscalls:sys_enter -p "$pid" -o "$stat" -- sleep "$secs" >/dev/null 2>&1 &
    sp=$!
  fi
  if [ "$proto" = h1 ]; then
    out=$(taskset -c 1 wrk -t1 -c32 -d"${secs}s" --latency -H "Host: app.bench.test" "$url" 2>&1)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
  else
    out=$(taskset -c 1 h2load -D "$secs" -c 8 -m 16 -t 1 ${connect:+--connect-to=$connect} "$url" 2>&1)
    rps=$(awk '/^finished in/ {gsub(",",""); print $4}' <<<"$out")
    p50=-; p99=-
    n=$(awk '/^requests:/ {print $8}' <<<"$out")
  fi
  after=$([ "$pid" = - ] && echo 0 || cpu_ms "$pid")
  b1=$(cpu_ms "$backend_worker")
  local per10k=- sys=- both=-
  if [ "$pid" != - ] && [ "${n:-0}" -gt 0 ] 2>/dev/null; then
    per10k=$(awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN {printf "%.0f", (a - b) * 10000 / n}')
    both=$(awk -v a="$after" -v b="$before" -v c="$b1" -v d="$b0" -v n="$n" 'BEGIN {printf "%.0f", (a - b + c - d) * 10000 / n}')
    if [ -n "$sp" ]; then
      wait "$sp" 2>/dev/null || true
      sys=$(awk -F, -v n="$n" '/raw_syscalls/ {printf "%.1f", $1 / n}' "$stat" 2>/dev/null)
    fi
  fi
  echo "${rps:-0} ${p50:--} ${p99:--} $per10k ${sys:--} $both"
}

row() { printf '%-8s %-6s %-6s %12s %12s %10s %10s %12s %12s %10s %10s\n' "$@"; }
row proxy proto size "req/s" "x nginx" p50 p99 "cpu ms/10k" "+app ms/10k" "syscall/req" "rss KiB"
# Each cell runs in rounds (BENCH_REPEATS, default 3), nginx and Kennel
# (and the older build) one after the other in each, each in turn first,
# so a change in this shared host's load falls on all alike. Shown: the
# round with the median ratio to nginx, and the lowest and highest ratio
# of all rounds.
repeats="${BENCH_REPEATS:-3}"
for size in tiny big; do
  read -r drps dp50 dp99 _ <<<"$(run "http://127.0.0.1:$bport/$size" - h1)"
  row direct h1 "$size" "$drps" - "$dp50" "$dp99" - - - -
  for proto in ${BENCH_PROTOS:-h1 h2}; do
    if [ "$proto" = h1 ]; then
      nurl=https://127.0.0.1:$nport/$size kurl=https://127.0.0.1:$kport/$size ourl=https://127.0.0.1:$oport/$size
      kto= oto=
    else
      nurl=https://127.0.0.1:$nport/$size kurl=https://app.bench.test:$kport/$size ourl=https://app.bench.test:$oport/$size
      kto=127.0.0.1:$kport oto=127.0.0.1:$oport
    fi
    rounds=()
    for r in $(seq "$repeats"); do
      # (With one binary as both Kennel and "before", the run right after
      # nginx's came out a few per cent apart from the other.)
      who=(n k); [ -n "$old" ] && who+=(o)
      shift_by=$(((r - 1) % ${#who[@]}))
      who=("${who[@]:$shift_by}" "${who[@]:0:$shift_by}")
      o=-
      for w in "${who[@]}"; do
        case $w in
          n) n=$(run "$nurl" "$nginx_worker" "$proto") ;;
          k) k=$(run "$kurl" "$gw" "$proto" "$kto") ;;
          o) o=$(run "$ourl" "$old" "$proto" "$oto") ;;
        esac
      done
      # "ratio|nginx's line|kennel's line|before's line"
      rounds+=("$(ratio "${k%% *}" "${n%% *}")|$n|$k|$o")
    done
    mid=$(printf '%s\n' "${rounds[@]}" | sort -t'|' -k1,1g | awk -v m=$(((repeats + 1) / 2)) 'NR == m')
    lo=$(printf '%s\n' "${rounds[@]}" | cut -d'|' -f1 | sort -g | head -1)
    hi=$(printf '%s\n' "${rounds[@]}" | cut -d'|' -f1 | sort -g | tail -1)
    IFS='|' read -r kratio nline kline oline <<<"$mid"
    read -r nrps np50 np99 ncpu nsys nboth <<<"$nline"
    read -r krps kp50 kp99 kcpu ksys kboth <<<"$kline"
    spread=$kratio; [ "$repeats" -gt 1 ] && spread="$kratio ($lo-$hi)"
    row nginx "$proto" "$size" "$nrps" 1.00 "$np50" "$np99" "$ncpu" "$nboth" "$nsys" "$(rss_kib "$nginx_worker")"
    row kennel "$proto" "$size" "$krps" "$spread" "$kp50" "$kp99" "$kcpu" "$kboth" "$ksys" "$(rss_kib "$gw")"
    if [ -n "$old" ]; then
      read -r orps op50 op99 ocpu osys oboth <<<"$oline"
      row before "$proto" "$size" "$orps" "$(ratio "$orps" "$nrps")" "$op50" "$op99" "$ocpu" "$oboth" "$osys" "$(rss_kib "$old")"
    fi
  done
done
echo "($repeats round(s) of each cell: the round with the median ratio, and the range of the ratio over all rounds."
echo " Proxies, and the backend nginx, pinned to CPU 0; wrk and h2load to CPU 1. p50/p99 from wrk; h2load reports no percentiles."
echo " +app: the proxy's CPU and the backend's together, per 10k requests: what a request through each proxy costs CPU 0.)"
if [ -n "${BENCH_PERF:-}" ]; then
  command -v perf >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends linux-perf >/dev/null
  # BENCH_PERF=dwarf: call graphs unwound from the stack (callers of
  # memmove, malloc and the like), at a higher cost per sample.
  cg=(-g); [ "$BENCH_PERF" = dwarf ] && cg=(--call-graph dwarf,16384)
  perf record -q "${cg[@]}" -o "$work/perf.data" -p "$gw" -- sleep "$secs" >/dev/null 2>&1 &
  rec=$!
  taskset -c 1 wrk -t1 -c32 -d"${secs}s" -H "Host: app.bench.test" "https://127.0.0.1:$kport/tiny" >/dev/null
  wait "$rec" || true
  echo; echo "where the gateway's CPU goes (tiny, HTTP/1.1; self time by symbol):"
  cp "$work/perf.data" "${TMPDIR:-/tmp}/kennel-https-perf.data"
  perf report -i "$work/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -40 || true
  echo "(perf data kept in ${TMPDIR:-/tmp}/kennel-https-perf.data)"
  perf record -q -g -o "$work/nginx.data" -p "$nginx_worker" -- sleep "$secs" >/dev/null 2>&1 &
  rec=$!
  taskset -c 1 wrk -t1 -c32 -d"${secs}s" -H "Host: app.bench.test" "https://127.0.0.1:$nport/tiny" >/dev/null
  wait "$rec" || true
  cp "$work/nginx.data" "${TMPDIR:-/tmp}/nginx-https-perf.data"
  echo; echo "nginx's, the same way (kept in ${TMPDIR:-/tmp}/nginx-https-perf.data):"
  perf report -i "$work/nginx.data" --no-children --sort dso,symbol --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -40 || true
fi

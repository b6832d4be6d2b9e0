#!/usr/bin/env bash
# The LLM gateway's overhead (issue: agents and the LLM gateway), side by
# side in one run: an OpenAI-compatible upstream reached directly and
# through Kennel's metadata service (a project's socket; the owner's key
# added on the host, usage counted, one audit line per request). The
# upstream, the gateway and the client are separate processes; each one's
# CPU and RSS come from /proc. Prints a table: p50/p99 latency of small
# requests, time to the first streamed chunk, N concurrent streams (CPU of
# the upstream and of the gateway, the gateway's RSS).
# Usage: bench/llm.sh [requests] [concurrent streams]   (default 2000 50)
#   LLM_BENCH_WRAP="valgrind --tool=callgrind" runs the gateway under a
#   profiler (its output lands in the working directory).
#   The upstream and the gateway are pinned to CPU 0, the client to CPU 1
#   (taskset), where the host has two.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
(cd "$repo" && cargo build --quiet --release -p kennel-gateway --features kennel-core/testing --example llm_bench)
bin="$CARGO_TARGET_DIR/release/examples/llm_bench"
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  # Children (upstream, gateway) are started on CPU 0 by the client,
  # which moves itself to CPU 1 once they run.
  exec taskset -c 0 "$bin" "${1:-2000}" "${2:-50}"
fi
exec "$bin" "${1:-2000}" "${2:-50}"

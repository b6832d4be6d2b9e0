#!/usr/bin/env bash
# Runs every fuzz target for a while: bench/fuzz.sh [SECONDS per target]
# (default 60; 0 only builds them). The test command runs each for a few
# seconds.
#   FUZZ_SANITIZER=address  a sanitizer build (default none: safe Rust,
#                           and the build is a third the time)
#   FUZZ_TARGETS="parse config"  only these
#   FUZZ_JOBS=2             run two targets at a time (default 1)
#   FUZZ_BUILD=dev          an unoptimised build (default release):
#                           quicker to build, slower to run; for the
#                           test command's short runs
# cargo-fuzz needs nightly features; on a stable toolchain RUSTC_BOOTSTRAP=1
# enables them for this build only. Crashes land in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
targets="${FUZZ_TARGETS:-parse ssh_key config https_host}"
case "${FUZZ_BUILD:-release}" in
  release) profile=(--release) ;;
  dev) profile=(--dev) ;;
  *) echo "FUZZ_BUILD is release or dev, not ${FUZZ_BUILD}" >&2; exit 2 ;;
esac
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Build outputs outside the checkout, like the rest of the tests'.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${HOME}/.cache/kennel/fuzz-target}"
export RUSTC_BOOTSTRAP=1
cargo fuzz build "${profile[@]}" --sanitizer "$sanitizer"
[ "$secs" != 0 ] || exit 0
# Targets run side by side, FUZZ_JOBS at a time (default 1); each one's
# corpus and log are its own.
jobs="${FUZZ_JOBS:-1}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
run_one() {
  local t="$1"
  mkdir "$work/$t.corpus"
  if cargo fuzz run "${profile[@]}" --sanitizer "$sanitizer" "$t" "$work/$t.corpus" -- \
      -max_total_time="$secs" -max_len=4096 -print_final_stats=1 >"$work/$t.log" 2>&1; then
    echo ok >"$work/$t.result"
  else
    echo FAILED >"$work/$t.result"
  fi
}
running=0
for t in $targets; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait
failed=0
printf '%-12s %10s %12s %8s\n' target seconds executions result
for t in $targets; do
  result="$(cat "$work/$t.result" 2>/dev/null || echo FAILED)"
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo '?')"
  printf '%-12s %10s %12s %8s\n' "$t" "$secs" "$runs" "$result"
  if [ "$result" != ok ]; then
    tail -40 "$work/$t.log" >&2
    failed=1
  fi
done
exit "$failed"

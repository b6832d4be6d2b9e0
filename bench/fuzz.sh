#!/usr/bin/env bash
# Runs every fuzz target for a while: bench/fuzz.sh [SECONDS per target]
# (default 60). The test command runs each for a few seconds.
#   FUZZ_SANITIZER=address  a sanitizer build (default none: safe Rust,
#                           and the build is a third the time)
#   FUZZ_TARGETS="parse config"  only these
# cargo-fuzz needs nightly features; on a stable toolchain RUSTC_BOOTSTRAP=1
# enables them for this build only. Crashes land in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
targets="${FUZZ_TARGETS:-parse ssh_key config https_host}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Build outputs outside the checkout, like the rest of the tests'.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${HOME}/.cache/kennel/fuzz-target}"
export RUSTC_BOOTSTRAP=1
cargo fuzz build --sanitizer "$sanitizer"
printf '%-12s %10s %12s %8s\n' target seconds executions result
for t in $targets; do
  corpus="$(mktemp -d)"
  log="$(mktemp)"
  if cargo fuzz run --sanitizer "$sanitizer" "$t" "$corpus" -- \
      -max_total_time="$secs" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
  fi
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  printf '%-12s %10s %12s %8s\n' "$t" "$secs" "$runs" "$result"
  if [ "$result" != ok ]; then
    tail -40 "$log" >&2
    exit 1
  fi
  rm -rf "$corpus" "$log"
done

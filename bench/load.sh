#!/usr/bin/env bash
# Load on the real daemon, the longer run of what the test command runs
# once: the SSH, VM-session and HTTPS phases of tests/e2e/load_vm.rs repeated
# ROUNDS times (then the 20 concurrent creates), and the Matrix bot taking
# 1,000 commands from 50 people on a real Synapse (tests/e2e/bots_serve.rs).
# Prints one table: per phase what held, the errors, the seconds, and the
# daemon's CPU seconds, peak RSS and peak open descriptors.
# Needs root, QEMU, virtiofsd, OpenSSH and Synapse (scripts/install-deps.sh
# test installs them).
# Usage: bench/load.sh [ROUNDS]   (default 3)
set -euo pipefail
rounds="${1:-3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
cd "$repo"
LOAD_ROUNDS="$rounds" cargo test --quiet --workspace --all-features --locked \
  --test e2e -- --nocapture load_vm:: >"$out" 2>&1 || { tail -60 "$out" >&2; exit 1; }
cargo test --quiet --workspace --all-features --locked \
  --test e2e -- --nocapture bots_serve::the_matrix_bot >>"$out" 2>&1 || { tail -60 "$out" >&2; exit 1; }
grep -a '^LOAD | phase' "$out" | head -1 | sed 's/^LOAD //'
grep -a '^LOAD |' "$out" | grep -v '^LOAD | phase' | sed 's/^LOAD //'
grep -a '^LOAD idle' "$out" | sed 's/^LOAD //' || true
grep -a '^sent ' "$out" || true

#!/usr/bin/env bash
# Kennel's test command (README): installs what the tests need, then runs
# rustfmt, clippy and every test. Idempotent; safe to run again.
#
# Build outputs are cached outside the checkout (CARGO_TARGET_DIR, default
# ~/.cache/kennel/target) so repeated runs are fast; nothing depends on it.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

step() { printf '\n== %s\n' "$*"; }

step "prerequisites"
./scripts/install-deps.sh test

step "cargo fmt --check"
cargo fmt --all --check 2> >(grep -v "unstable features are only available in nightly" >&2)

step "cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "cargo test"
cargo test --workspace --all-features --locked

#!/usr/bin/env bash
# Kennel's test command (README): installs what the tests need, then runs
# rustfmt, clippy, the guest image builds and every test. Idempotent; safe
# to run again. Each phase prints how long it took.
#
# Build outputs are cached outside the checkout (CARGO_TARGET_DIR, default
# ~/.cache/kennel/target) and so are guest images (KENNEL_TEST_CACHE,
# default ~/.cache/kennel/test-data) so repeated runs are fast; nothing
# depends on them: with both empty, everything is built here.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"
# Test binaries link the whole dependency graph; mold (installed below as
# a test prerequisite) links them several times faster than GNU ld. Set
# for this host's target only, so a caller's RUSTFLAGS still win.
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="${CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS:--C link-arg=-fuse-ld=mold}"

started=$SECONDS
phase_start=$SECONDS
phase=""
timings=()
step() {
  if [ -n "$phase" ]; then timings+=("$(printf '%-28s %5d s' "$phase" $((SECONDS - phase_start)))"); fi
  phase="$*"
  phase_start=$SECONDS
  printf '\n== %s (at %d s)\n' "$*" $((SECONDS - started))
}
report() {
  step "done"
  printf '\n== phases\n'
  printf '%s\n' "${timings[@]}"
  printf '%-28s %5d s\n' "total" $((SECONDS - started))
}
trap 'report' EXIT

step "prerequisites"
./scripts/install-deps.sh test

step "cargo fmt --check"
cargo fmt --all --check 2> >(grep -v "unstable features are only available in nightly" >&2)

# Clippy and the test build in one pass: clippy-driver compiles Kennel's
# own crates (linting them, `-D warnings`) while rustc compiles the
# dependencies, as `cargo clippy` would, but to real test binaries. A
# separate `cargo clippy` would check the whole dependency graph a second
# time (195 s cold). Every cargo call below keeps this environment, so
# nothing is compiled twice.
command -v clippy-driver >/dev/null || {
  echo "missing: clippy-driver; install it with: rustup component add clippy" >&2
  exit 1
}
export RUSTC_WORKSPACE_WRAPPER="${RUSTC_WORKSPACE_WRAPPER:-$(command -v clippy-driver)}"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
step "compile and clippy (tests, all features)"
cargo test --workspace --all-features --locked --no-run

# The guest kernel and the base, rust and node images, built once into the
# test cache before the tests that boot guests, with their progress shown
# here. Each test still builds what it lacks on its own (with progress), so
# none depends on this step or on another test having run first.
# (Selected by test name rather than `--test it`: the same target
# selection as the compile above, so nothing is built again.)
step "guest images (kernel, base, rust, node)"
cargo test --workspace --all-features --locked -- --exact images::kernel_base_rust_and_node_images --nocapture

# Every test binary runs even when one fails (--no-fail-fast); cargo
# names each failed binary at the end, and each binary its failed tests.
# The load tests measure the daemon under load, so they run on their own
# afterwards, one at a time: beside guests booting under TCG on two cores
# they would measure the neighbours (and time out).
load_tests=(load_vm:: bots_serve::the_matrix_bot_answers_1000)
skip=()
for t in "${load_tests[@]}"; do skip+=(--skip "$t"); done
failed=0
step "cargo test"
cargo test --workspace --all-features --locked --no-fail-fast -- "${skip[@]}" || failed=1
step "cargo test (load tests, alone)"
cargo test --workspace --all-features --locked --no-fail-fast --test e2e -- \
  --test-threads=1 "${load_tests[@]}" || failed=1
if [ "$failed" != 0 ]; then
  echo "some tests failed (see above)" >&2
  exit 1
fi

# Every fuzz target briefly (bench/fuzz.sh runs them longer); a crash
# fails the run and leaves its input in fuzz/artifacts/.
step "fuzz (each target 15 s)"
./bench/fuzz.sh 15

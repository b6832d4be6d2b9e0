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
fuzz_build=""
# Every test's output is also kept here, so the end of the run can repeat
# why each failed test failed: a long log is often shown only in part.
test_log="$(mktemp)"
failures() {
  [ -s "$test_log" ] || return 0
  grep -q "panicked at" "$test_log" || return 0
  printf '\n== why tests failed (each panic, first lines)\n'
  awk '/panicked at/ { n = 10 }
       n > 0 { if ($0 ~ /^note: run with/) { n = 0; next } print; n-- }' \
    "$test_log" | head -n 80
}
report() {
  # A run that stops early leaves no fuzz build behind it.
  if [ -n "$fuzz_build" ]; then
    kill -- "-$fuzz_build" 2>/dev/null || kill "$fuzz_build" 2>/dev/null || true
  fi
  step "done"
  failures
  rm -f "$test_log"
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

# The fuzz targets build in the background from here, in their own
# target directory, unoptimised (their runs below are short): the image
# build leaves a core mostly idle. Its output is shown if it fails.
fuzz_log="$(mktemp)"
# (In a session of its own, so an early exit stops cargo and rustc too.)
FUZZ_BUILD=dev setsid ./bench/fuzz.sh 0 >"$fuzz_log" 2>&1 &
fuzz_build=$!

# The guest kernel and every stack's image, built once into the test
# cache before the tests that boot guests (not beside them: two cores),
# with their progress shown here, and each stack's versions checked.
# Each test still builds what it lacks on its own (with progress), so
# none depends on this step or on another test having run first.
# (Selected by test name rather than `--test it`: the same target
# selection as the compile above, so nothing is built again.)
step "guest images (kernel, every stack)"
cargo test --workspace --all-features --locked -- --exact \
  images::kernel_base_rust_and_node_images \
  images::every_stack_image_holds_the_versions_its_stack_file_names --nocapture --test-threads=1

# Every test binary runs even when one fails (--no-fail-fast); cargo
# names each failed binary at the end, and each binary its failed tests.
# Three tests at a time: several end-to-end tests spend much of their
# time waiting (idle-stop limits, wakes), so a third keeps both cores busy
# (measured: the e2e binary took 445 s against 500–600 s with two, the
# CPU 85 % busy).
# The load tests push the daemon to its limits, so they run afterwards,
# beside each other (each has its own daemon) but not beside guests
# booting under TCG on two cores, where they would time out.
load_tests=(load_vm:: bots_serve::the_matrix_bot_answers_1000)
# The Incus end-to-end tests run alone at the end, one after the other:
# Incus 6.0 cuts operations off by its own deadlines ("context deadline
# exceeded": a move between members, an instance's delete) when two
# cores are also emulating guests for other tests (the cluster test in 1
# of 3 full runs, the single-server one in 1 of 4; never alone).
alone=(incus_cluster_vm:: incus_vm::)
skip=()
for t in "${load_tests[@]}" "${alone[@]}"; do skip+=(--skip "$t"); done
failed=0
step "cargo test"
cargo test --workspace --all-features --locked --no-fail-fast -- \
  --test-threads=3 "${skip[@]}" 2>&1 | tee -a "$test_log" || failed=1
step "cargo test (load tests)"
cargo test --workspace --all-features --locked --no-fail-fast --test e2e -- \
  --test-threads=2 "${load_tests[@]}" 2>&1 | tee -a "$test_log" || failed=1
step "cargo test (Incus, alone)"
cargo test --workspace --all-features --locked --no-fail-fast --test e2e -- \
  --test-threads=1 "${alone[@]}" 2>&1 | tee -a "$test_log" || failed=1
if [ "$failed" != 0 ]; then
  echo "some tests failed (see above)" >&2
  exit 1
fi

# Every fuzz target briefly, two at a time (bench/fuzz.sh runs them
# longer); a crash fails the run and leaves its input in fuzz/artifacts/.
step "fuzz (each target 15 s)"
if ! wait "$fuzz_build"; then
  cat "$fuzz_log" >&2
  echo "the fuzz targets did not build (above)" >&2
  exit 1
fi
rm -f "$fuzz_log"
fuzz_build=""
FUZZ_BUILD=dev FUZZ_JOBS=2 ./bench/fuzz.sh 15

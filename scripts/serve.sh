#!/usr/bin/env bash
# Sets up this host and runs Kennel on the embedded defaults: SQLite in
# ./kennel-data, QEMU when KVM cannot run guests, loopback ports, no chat
# tokens. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
./scripts/install-deps.sh run
cargo build --release --locked --features matrix,discord
kennel="$CARGO_TARGET_DIR/release/kennel"
"$kennel" doctor || echo "(doctor found missing parts; see above)"
# The kernel artefacts and base image (cached by content hash: instant when built).
"$kennel" image build
exec "$kennel" serve

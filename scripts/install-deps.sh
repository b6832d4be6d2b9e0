#!/usr/bin/env bash
# Installs Kennel's host prerequisites from Debian's archive, idempotently.
#   install-deps.sh run    what `kennel serve` needs to build images and run VMs
#   install-deps.sh test   what the test suite needs
# Packages already present are not touched; apt-get runs only when
# something is missing. Fails loudly (naming the package) if it cannot.
set -euo pipefail
mode="${1:-run}"

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || { echo "missing: $1 ($2)" >&2; exit 1; }
}
need_cmd cargo "install the Rust toolchain (rustup) first"

# Debian packages per mode. Keep each list to what that mode really uses.
run_pkgs=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs openssh-client iproute2 nftables pkg-config libssl-dev)
test_pkgs=(mmdebstrap e2fsprogs qemu-system-x86 qemu-utils openssh-client iproute2 nftables pkg-config libssl-dev git expect python3 python3-venv)

case "$mode" in
  run) pkgs=("${run_pkgs[@]}") ;;
  test) pkgs=("${test_pkgs[@]}") ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
# The Matrix bot's tests run a real Synapse homeserver (PyPI matrix-synapse)
# from a virtualenv kept outside the checkout.
if [ "$mode" = test ]; then
  venv="${KENNEL_SYNAPSE_VENV:-$HOME/.cache/kennel/synapse}"
  if ! "$venv/bin/python" -c 'import synapse' >/dev/null 2>&1; then
    echo "installing matrix-synapse into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q 'matrix-synapse>=1.100'
  fi
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
echo "prerequisites ok (${mode})"

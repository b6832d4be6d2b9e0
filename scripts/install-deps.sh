#!/usr/bin/env bash
# Installs Kennel's host prerequisites from Debian's archive, idempotently.
#   install-deps.sh run    what `kennel serve` runs to build images and VMs
#   install-deps.sh test   that, plus what the test suite runs
#
# It decides by what the code runs (binaries and paths), never by package
# names: a machine may carry other package versions (a backported
# qemu-utils, say) and a package being "installed" says nothing about the
# binary still being there after apt resolved something else. Everything
# missing is installed in ONE apt call, so apt resolves one consistent set,
# and afterwards every check runs again: what is still missing is named
# and the script fails.
set -euo pipefail
mode="${1:-run}"
case "$mode" in
  run | test) ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

# Where Kennel itself looks for host tools (provisioner/src/host.rs).
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

command -v cargo >/dev/null 2>&1 || {
  echo "missing: cargo; install the Rust toolchain (rustup) first" >&2
  exit 1
}

# What is checked, and which Debian package brings it. A check is a
# command name on PATH, an absolute path, or a test function (fn:NAME).
#   check | package | modes
checks=(
  "qemu-system-x86_64|qemu-system-x86|run test"
  "qemu-img|qemu-utils|run test"
  "qemu-io|qemu-utils|test"
  "fn:have_virtiofsd|qemu-system-common|run test"
  "mmdebstrap|mmdebstrap|run test"
  # Guest images are Debian 13 (images/base/debian.sources): an older
  # keyring lacks its keys, and installing the package upgrades it.
  "/usr/share/keyrings/debian-archive-trixie-stable.gpg|debian-archive-keyring|run test"
  "unshare|util-linux|test"
  "gpg|gpg|run test"
  "mkfs.ext4|e2fsprogs|run test"
  "debugfs|e2fsprogs|test"
  "ssh|openssh-client|run test"
  "ssh-keygen|openssh-client|run test"
  "sftp|openssh-client|test"
  "scp|openssh-client|test"
  "ssh-agent|openssh-client|test"
  "ip|iproute2|run test"
  "bridge|iproute2|run test"
  "nft|nftables|run test"
  "sysctl|procps|run test"
  "pgrep|procps|test"
  "apt-get|apt|run test"
  "dpkg-deb|dpkg|run test"
  "fn:have_openssl_dev|libssl-dev|run test"
  "pkg-config|pkg-config|run test"
  "mold|mold|test"
  "git|git|run test"
  "expect|expect|test"
  "curl|curl|test"
  "chromium|chromium|test"
  "chromedriver|chromium-driver|test"
  "pebble|pebble|test"
  "pebble-challtestsrv|pebble|test"
  "systemd-analyze|systemd|test"
  "python3|python3|test"
  # The Incus backend's tests run a real Incus daemon (containers), from
  # bookworm-backports on Debian 12 (below); its bridge serves DHCP with
  # dnsmasq. The client test's image is a static busybox.
  "/usr/libexec/incus/incusd|incus-base|test"
  "incus|incus-base|test"
  "dnsmasq|dnsmasq-base|test"
  "fn:have_static_busybox|busybox-static|test"
  "fn:have_venv|python3-venv|test"
)

# virtiofsd at one of the places provisioner/src/virtiofs.rs looks.
have_virtiofsd() {
  command -v virtiofsd >/dev/null 2>&1 ||
    [ -x /usr/libexec/virtiofsd ] || [ -x /usr/lib/qemu/virtiofsd ]
}
have_openssl_dev() { pkg-config --exists openssl 2>/dev/null; }
have_venv() { python3 -c 'import venv, ensurepip' >/dev/null 2>&1; }
have_static_busybox() { [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; }

# Debian 12 has Incus only in bookworm-backports. Its own source list, at
# the archive's default priority for backports (100: below every
# installed or bookworm package, so nothing else, QEMU above all, is ever
# upgraded from it), and only incus-base asked for from there by name.
backports_list=/etc/apt/sources.list.d/kennel-bookworm-backports.sources
codename() { . /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}"; }
add_backports() {
  [ -e "$backports_list" ] && return 0
  as_root tee "$backports_list" >/dev/null <<'LIST'
# Added by Kennel's scripts/install-deps.sh for incus-base (tests only).
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
LIST
}

present() {
  case "$1" in
    fn:*) "${1#fn:}" ;;
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

# Prints "check|package" for every check of this mode that fails.
missing_checks() {
  local line check pkg modes
  for line in "${checks[@]}"; do
    IFS='|' read -r check pkg modes <<<"$line"
    [[ " $modes " == *" $mode "* ]] || continue
    present "$check" || echo "$check|$pkg"
  done
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "installing packages needs root, and sudo is not installed: run this as root" >&2
    exit 1
  fi
}

# The candidate version apt would install for a package ("" if none).
candidate() {
  apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'
}
installed_version() {
  dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true
}

mapfile -t missing < <(missing_checks)
if ((${#missing[@]})); then
  declare -A want=()
  for m in "${missing[@]}"; do want[${m#*|}]=1; done
  pkgs=("${!want[@]}")
  if [[ -n "${want[incus-base]:-}" && "$(codename)" == bookworm ]]; then
    add_backports
    pkgs=("${pkgs[@]/#incus-base/incus-base/bookworm-backports}")
  fi
  as_root apt-get update -qq
  apt_opts=(-y -qq --no-install-recommends)
  # qemu-system-x86 pins qemu-system-common to its own version, and a
  # newer qemu-utils (a backport) Breaks an older qemu-system-common: asked
  # only for qemu-system-x86, apt would silently remove qemu-utils and with
  # it qemu-img. Ask for the matching qemu-utils in the same call.
  if [[ -n "${want[qemu-system-x86]:-}" ]]; then
    sys="$(candidate qemu-system-x86)"
    if [[ -n "$sys" && "$(installed_version qemu-utils)" != "$sys" ]]; then
      pkgs=("${pkgs[@]/#qemu-utils/}")
      pkgs+=("qemu-utils=$sys")
      apt_opts+=(--allow-downgrades)
    fi
  fi
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | grep -v '^$' | sort -u)
  echo "missing: $(printf '%s ' "${missing[@]%%|*}")"
  echo "installing (one apt call): ${pkgs[*]}"
  started=$SECONDS
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${pkgs[@]}"
  echo "apt-get install took $((SECONDS - started)) s"
fi

# The Matrix bot's tests run a real Synapse homeserver (PyPI matrix-synapse)
# from a virtualenv kept outside the checkout.
if [ "$mode" = test ] && have_venv; then
  venv="${KENNEL_SYNAPSE_VENV:-$HOME/.cache/kennel/synapse}"
  if ! "$venv/bin/python" -c 'import synapse' >/dev/null 2>&1; then
    echo "installing matrix-synapse into $venv"
    started=$SECONDS
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q 'matrix-synapse>=1.100'
    echo "pip install took $((SECONDS - started)) s"
  fi
fi
if ! rustup component list --installed 2>/dev/null | grep -q '^clippy'; then
  rustup component add clippy rustfmt
fi

# Check everything again: an install that "succeeded" may still have
# removed or not provided what the code runs.
mapfile -t still < <(missing_checks)
if [ "$mode" = test ]; then
  venv="${KENNEL_SYNAPSE_VENV:-$HOME/.cache/kennel/synapse}"
  "$venv/bin/python" -c 'import synapse' >/dev/null 2>&1 ||
    still+=("$venv/bin/python -c 'import synapse'|pip install matrix-synapse")
fi
if ((${#still[@]})); then
  echo "prerequisites still missing after installing:" >&2
  for m in "${still[@]}"; do echo "  ${m%%|*} (from ${m#*|})" >&2; done
  exit 1
fi
if [ "$mode" = test ]; then
  # Installing Incus must not have changed the QEMU the code runs.
  qemu-system-x86_64 --version | head -1
fi
echo "prerequisites ok (${mode}): every binary and path checked is present"

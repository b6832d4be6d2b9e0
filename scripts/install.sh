#!/usr/bin/env bash
# Installs Kennel as a service: the `kennel` binary in /usr/local/bin, its
# stacks, templates and image recipe in /usr/local/share/kennel, a config
# at /etc/kennel/kennel.toml (kept if present), data in /var/lib/kennel and
# a systemd unit, kennel.service, enabled and started. Idempotent.
#
#   scripts/install.sh                 build (release), install, start
#   scripts/install.sh --uninstall     stop, remove the unit, binary and
#                                      share (config and data stay)
# Options: --root DIR (install under DIR, e.g. for a package or a test;
# nothing is started), --bin PATH (install this binary, do not build),
# --no-start (install, enable nothing).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
root="" bin="" start=1 uninstall=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="${2%/}"; start=0; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --no-start) start=0; shift ;;
    --uninstall) uninstall=1; shift ;;
    *) echo "unknown option $1; see the top of $0" >&2; exit 2 ;;
  esac
done
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "installing the service needs root (or --root DIR)" >&2
  exit 1
fi
share="$root/usr/local/share/kennel"
unit="$root/etc/systemd/system/kennel.service"
systemd_up() { [ -z "$root" ] && [ -d /run/systemd/system ]; }

if [ "$uninstall" = 1 ]; then
  if systemd_up; then
    systemctl disable --now kennel.service 2>/dev/null || true
  fi
  rm -f "$unit" "$root/usr/local/bin/kennel"
  rm -rf "$share"
  systemd_up && systemctl daemon-reload
  echo "Kennel is uninstalled. Kept: $root/etc/kennel (config) and $root/var/lib/kennel (data:"
  echo "projects' sources, VM disks, keys). Running VMs were left alone; 'rm -rf' those two to purge."
  exit 0
fi

if [ -z "$bin" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kennel/target}"
  (cd "$repo" && cargo build --release --locked --features matrix,discord)
  bin="$CARGO_TARGET_DIR/release/kennel"
fi
[ -x "$bin" ] || { echo "no kennel binary at $bin" >&2; exit 1; }

install -d -m 0755 "$root/usr/local/bin" "$share" "$root/etc/kennel" "$root/etc/systemd/system"
install -d -m 0700 "$root/var/lib/kennel"
install -d -m 0755 "$root/var/cache/kennel/apt"
install -m 0755 "$bin" "$root/usr/local/bin/kennel"
rm -rf "$share/stacks" "$share/templates" "$share/images" "$share/docs"
cp -r "$repo/stacks" "$repo/templates" "$share/"
mkdir -p "$share/docs"
cp "$repo"/docs/*.md "$share/docs/"
mkdir -p "$share/images"
cp -r "$repo/images/base" "$share/images/"

config="$root/etc/kennel/kennel.toml"
if [ ! -e "$config" ]; then
  cat > "$config" <<'EOF'
# Kennel's configuration: every setting and its default is in
# /usr/local/share/kennel/kennel.example.toml. `kennel config` shows what
# is in force and where each value comes from.
data_dir = "/var/lib/kennel"

[images]
stacks_dir = "/usr/local/share/kennel/stacks"
templates_dir = "/usr/local/share/kennel/templates"
recipe_dir = "/usr/local/share/kennel/images/base"
apt_cache = "/var/cache/kennel/apt"

# [ssh]
# listen = "0.0.0.0:2222"
# public_host = "dev.example.org"
# [https]
# listen = "0.0.0.0:443"
# domain = "dev.example.org"
EOF
  chmod 0640 "$config"
  echo "wrote $config"
else
  echo "kept $config"
fi
install -m 0644 "$repo/docs/kennel.example.toml" "$share/kennel.example.toml"
install -m 0644 "$repo/scripts/kennel.service" "$unit"

if [ "$start" = 1 ] && systemd_up; then
  systemctl daemon-reload
  systemctl enable --now kennel.service
  echo "kennel.service is enabled and started: systemctl status kennel; journalctl -u kennel"
else
  echo "installed under ${root:-/}; start it with: systemctl daemon-reload && systemctl enable --now kennel"
fi

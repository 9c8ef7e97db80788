#!/usr/bin/env bash
# Install (or upgrade in place) edgeknn as a systemd service on 64-bit Raspberry Pi OS Bookworm or Trixie,
# or on another 64-bit Debian. Run from a clone, as root:
#   sudo scripts/install-pi.sh                    install, or upgrade keeping config and store
#   sudo scripts/install-pi.sh --with-mosquitto   also install a local MQTT broker
#   sudo scripts/install-pi.sh --uninstall        remove program and service; keep /etc/edgeknn and the store
#   sudo scripts/install-pi.sh --uninstall --purge   remove config, store and the edgeknn user too
# Offline: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR, DIR made by scripts/wheelhouse.sh (docs/service.md, "Offline install")
set -euo pipefail

prog=install-pi.sh
die() { echo "$prog: $*" >&2; exit 1; }
say() { echo "$prog: $*"; }

with_mosquitto=0 uninstall=0 purge=0
for arg in "$@"; do
  case "$arg" in
    --with-mosquitto) with_mosquitto=1 ;;
    --uninstall) uninstall=1 ;;
    --purge) purge=1 ;;
    -h | --help) sed -n '2,8s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown option $arg (try --help)" ;;
  esac
done
[ "$purge" = 0 ] || [ "$uninstall" = 1 ] || die "--purge goes with --uninstall"
[ "$(id -u)" = 0 ] || die "run as root (sudo)"

here=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/edgeknn
venv=$prefix/venv
unit=/etc/systemd/system/edgeknn.service
# A booted systemd (not a chroot, an image build or a container without it): only then start or stop units.
if [ -d /run/systemd/system ]; then booted=1; else booted=0; fi

if [ "$uninstall" = 1 ]; then
  if [ -e "$unit" ]; then
    if [ "$booted" = 1 ]; then systemctl disable --now edgeknn.service || true; else systemctl disable edgeknn.service || true; fi
    rm -f "$unit"
    [ "$booted" = 0 ] || systemctl daemon-reload
  fi
  rm -rf "$prefix"
  if [ "$purge" = 1 ]; then
    rm -rf /etc/edgeknn /var/lib/edgeknn
    if id edgeknn >/dev/null 2>&1; then userdel edgeknn; fi
    say "removed: $prefix, the service, /etc/edgeknn, /var/lib/edgeknn and the edgeknn user"
  else
    say "removed: $prefix and the service; kept /etc/edgeknn and the store in /var/lib/edgeknn (--purge removes them)"
  fi
  exit 0
fi

# 64-bit only: the inference runtime (LiteRT, formerly tflite-runtime) has no 32-bit ARM wheel on PyPI.
# A 32-bit Raspberry Pi OS on a 64-bit kernel reports aarch64 in uname -m, so ask dpkg for the userland.
arch=$(dpkg --print-architecture)
machine=$(uname -m)
case "$machine" in armv6*) die "this is an ARMv6 board (Pi Zero/1): edgeknn needs a 64-bit CPU and OS, because PyPI has no 32-bit ARM wheel of LiteRT/tflite-runtime" ;; esac
case "$arch" in
  arm64 | amd64) ;;
  armhf | armel) die "this is a 32-bit userland (dpkg architecture $arch, kernel $machine): install 64-bit Raspberry Pi OS (arm64), because PyPI has no 32-bit ARM wheel of LiteRT/tflite-runtime" ;;
  *) die "unsupported architecture $arch: edgeknn installs on 64-bit Debian (arm64, or amd64 for testing)" ;;
esac

if ! apt-get update; then say "apt-get update failed (offline?): going on with the package lists already here"; fi
# The Raspberry Pi archive provides picamera2 and lgpio; a plain Debian arm64 board has neither.
in_archive() { apt-cache policy "$1" 2>/dev/null | grep -q '^ *Candidate: [^(]'; }
packages=(python3 python3-venv python3-numpy)
missing=()
for pkg in python3-picamera2 python3-lgpio; do
  if in_archive "$pkg"; then packages+=("$pkg"); else missing+=("$pkg"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  # Without picamera2, a USB (V4L2) camera through OpenCV is the camera.
  packages+=(python3-opencv)
  say "not in this system's apt archive (not Raspberry Pi OS?): ${missing[*]}; no Pi camera or GPIO panel without them; a USB camera (v4l2, apt's python3-opencv, installed now), replay, MQTT and the web page still work"
fi
# The panel a new config starts with: GPIO buttons and LEDs need lgpio (Raspberry Pi OS's python3-lgpio) and a GPIO
# chip. An image built in a chroot (no booted systemd) has no /dev/gpiochip* yet: there lgpio decides alone.
no_gpio=""
if ! in_archive python3-lgpio; then
  no_gpio="no python3-lgpio in this system's apt archive"
elif [ "$booted" = 1 ] && ! compgen -G '/dev/gpiochip*' >/dev/null; then
  no_gpio="no /dev/gpiochip* on this board"
fi
[ "$with_mosquitto" = 0 ] || packages+=(mosquitto)
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "Python $(python3 -c 'import platform; print(platform.python_version())') is too old: edgeknn needs 3.11 (Bookworm) or newer"

id edgeknn >/dev/null 2>&1 || useradd --system --home-dir /var/lib/edgeknn --shell /usr/sbin/nologin edgeknn
# The unit names no supplementary groups (a group missing on this system would stop it with 216/GROUP):
# systemd gives the service the user's groups, so join those that exist here (gpio is Raspberry Pi OS's).
for group in video gpio; do
  if getent group "$group" >/dev/null; then usermod -aG "$group" edgeknn; fi
done

# The venv sees apt's packages (picamera2, simplejpeg, lgpio, OpenCV), which are built against apt's numpy:
# pin the venv to exactly that numpy (1.24 on Bookworm, 2.2 on Trixie), so pip never installs another over it.
numpy_version=$(python3 -c 'import numpy; print(numpy.__version__)')
# A venv of another Python (after an upgrade from Bookworm to Trixie) is rebuilt; otherwise it is upgraded in place.
pyver='import sys; print(sys.version_info[:2])'
if [ "$("$venv/bin/python" -c "$pyver" 2>/dev/null || true)" != "$(python3 -c "$pyver")" ]; then
  python3 -m venv --clear --system-site-packages "$venv"
fi
echo "numpy==$numpy_version" >"$prefix/constraints.txt"
"$venv/bin/pip" install --disable-pip-version-check --upgrade --upgrade-strategy only-if-needed \
  -c "$prefix/constraints.txt" "$here"

install -d -m 0755 /etc/edgeknn
conf=/etc/edgeknn/edgeknn.toml
if [ ! -e "$conf" ] && [ -z "$no_gpio" ]; then
  install -m 0644 "$here/config/edgeknn.toml" "$conf"
elif [ ! -e "$conf" ]; then
  # panel.kind = "gpio" would stop the service at its start (exit 78, not restarted): "none" works on any board
  # (the keyboard panel needs a terminal, which a service has not).
  sed '/^\[panel\]/,/^\[/ s/^kind = "gpio"$/kind = "none"  # written by install-pi.sh: this board has no GPIO for lgpio/' \
    "$here/config/edgeknn.toml" >"$conf.new"
  grep -q '^kind = "none"  # written by install-pi.sh' "$conf.new" || die "could not set panel.kind in $conf.new"
  chmod 0644 "$conf.new" && mv "$conf.new" "$conf"
  say "$no_gpio: $conf gets panel.kind = \"none\" (teach from the web page, MQTT or edgeknn teach; \"gpio\" needs lgpio and /dev/gpiochip*)"
else
  kind=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb")).get("panel", {}).get("kind", "gpio"))' "$conf" 2>/dev/null || echo "?")
  if [ -n "$no_gpio" ] && [ "$kind" = gpio ]; then
    say "warning: $conf (kept) says panel.kind = \"gpio\", but $no_gpio: the service will exit 78; set it to \"none\""
  fi
fi
install -m 0644 "$here/systemd/edgeknn.service" "$unit"
install -d -o edgeknn -g edgeknn -m 0750 /var/lib/edgeknn /var/lib/edgeknn/models
# The configured model (model.name; unset: the one the store was made with, else the default; pinned sha256)
# is fetched now if the network allows, else by the daemon, which retries until it can. Already there: no download.
timeout 120 runuser -u edgeknn -- env STATE_DIRECTORY=/var/lib/edgeknn \
  "$venv/bin/edgeknn" model fetch --config /etc/edgeknn/edgeknn.toml ||
  say "model not downloaded now: the service fetches it once the network is up (README: Offline install)"

if [ "$booted" = 1 ]; then
  systemctl daemon-reload
  systemctl enable edgeknn.service
  systemctl restart edgeknn.service
  say "edgeknn $("$venv/bin/edgeknn" --version | cut -d' ' -f2) installed and started (numpy $numpy_version from apt): journalctl -u edgeknn -f to watch it; edit /etc/edgeknn/edgeknn.toml, then systemctl reload edgeknn"
else
  systemctl enable edgeknn.service
  say "edgeknn $("$venv/bin/edgeknn" --version | cut -d' ' -f2) installed and enabled (numpy $numpy_version from apt); no running systemd here, so it starts at the next boot"
fi

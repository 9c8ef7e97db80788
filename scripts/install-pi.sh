#!/usr/bin/env bash
# Install edgeknn as a systemd service on Raspberry Pi OS (Bookworm or later). Run from a clone:
#   sudo scripts/install-pi.sh            (add --with-mosquitto to install a local broker too)
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "install-pi.sh: run as root (sudo)" >&2; exit 1; }
here=$(cd "$(dirname "$0")/.." && pwd)
venv=/opt/edgeknn/venv

packages=(python3-venv python3-picamera2 python3-lgpio)
[ "${1:-}" = "--with-mosquitto" ] && packages+=(mosquitto)
apt-get update
apt-get install -y --no-install-recommends "${packages[@]}"

# picamera2 (and its simplejpeg) come from apt, built against Debian's numpy 1.x: the venv sees
# the system packages and must not pull numpy 2 over them.
id edgeknn >/dev/null 2>&1 || useradd --system --home-dir /var/lib/edgeknn --shell /usr/sbin/nologin edgeknn
for group in video gpio; do getent group "$group" >/dev/null && usermod -aG "$group" edgeknn; done
python3 -m venv --system-site-packages "$venv"
echo "numpy<2" > /opt/edgeknn/constraints.txt
"$venv/bin/pip" install --upgrade pip
"$venv/bin/pip" install -c /opt/edgeknn/constraints.txt "$here"

install -d -m 0755 /etc/edgeknn
[ -e /etc/edgeknn/edgeknn.toml ] || install -m 0644 "$here/config/edgeknn.toml" /etc/edgeknn/edgeknn.toml
install -m 0644 "$here/systemd/edgeknn.service" /etc/systemd/system/edgeknn.service
install -d -o edgeknn -g edgeknn -m 0750 /var/lib/edgeknn /var/lib/edgeknn/models
# The model (pinned sha256) is fetched now if the network allows, else by the daemon at first start.
sudo -u edgeknn "$venv/bin/edgeknn" model fetch --config /etc/edgeknn/edgeknn.toml \
  --dest /var/lib/edgeknn/models/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite || true

systemctl daemon-reload
systemctl enable --now edgeknn.service
echo "edgeknn installed: journalctl -u edgeknn -f to watch it; edit /etc/edgeknn/edgeknn.toml, then systemctl reload edgeknn"

#!/usr/bin/env bash
# Boot a Debian 13 (Trixie) amd64 VM in which the real picamera2 runs on a real libcamera (the kernel's vimc test
# camera) and the panel's buttons and LEDs go through the kernel's GPIO character device (a gpio-sim chip), and check
# edgeknn against them.
#   sudo scripts/check-device-vm.sh ROOTS_DIR
# ROOTS_DIR caches the root (mmdebstrap, 2-5 minutes), the vimc and gpio-sim modules (built from linux-source for
# the root's own kernel: Debian builds neither) and a wheelhouse for Python 3.13 (picamera2 and lgpio from PyPI, and
# edgeknn's dependencies). Each run copies this working tree (not .git or venvs), the MobileNet extractor and the
# check scripts into a fresh disk image and boots it under qemu-system-x86_64 (TCG: no KVM here). A oneshot unit in
# the VM runs the checks: picamera2 open/configure/start, frame size and channel order (vimc's colour bars), only
# advertised controls, close and reopen; `edgeknn run` with the camera taught over MQTT and a prediction published;
# the camera unplugged and plugged back while it runs; the GPIO panel (gpiozero's lgpio factory on the sim chip):
# a press adds one example, a hold records several, clear+class forgets, the LEDs follow the prediction. Then the VM
# powers off and this prints one table. About 25 minutes under TCG on 2 cores (the first run builds for ~10 more).
# Needs: mmdebstrap, qemu-system-x86, e2fsprogs (mke2fs -d, debugfs). Exit 0 only if every check passed.
# What it cannot cover (a Pi's ISP, sensor modes, Pi-only controls, the Pi's own GPIO chip): docs/device-vm.md.
set -euo pipefail

prog=check-device-vm.sh
die() { echo "$prog: $*" >&2; exit 2; }
say() { echo "$prog: $*"; }

[ $# = 1 ] || die "usage: $prog ROOTS_DIR"
[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap --mode=root, chroot for the module and wheel builds)"
for tool in mmdebstrap qemu-system-x86_64 mke2fs debugfs; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install mmdebstrap qemu-system-x86 e2fsprogs)"
done

here=$(cd "$(dirname "$0")/.." && pwd)
shared=${EDGEKNN_SHARED:-$(cd "$here/.." && pwd)/shared}
model=$shared/models/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite
[ -f "$model" ] || die "no model at $model (set EDGEKNN_SHARED to the folder that has models/)"
mkdir -p "$1"
roots=$(cd "$1" && pwd)
# The real directories: the image is a hard-linked copy of the root, and a copy of a symlink would write into it.
root=$(realpath -m "$roots/trixie-amd64-vm")
wheels=$(realpath -m "$roots/wheels-cp313-amd64")
timeout_s=${EDGEKNN_VM_TIMEOUT:-5400}
# pip in the chroot trusts the host's CA bundle too (a host may reach PyPI through a TLS proxy of its own).
host_ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}

rows=()
row() { rows+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"$4"); }

# in_root COMMAND...: run in the cached root with /proc, /sys and /dev, and no environment of the host's.
in_root() {
  local rc=0
  mount --bind /proc "$root/proc" && mount --bind /sys "$root/sys" && mount --bind /dev "$root/dev"
  chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 "$@" || rc=$?
  umount "$root/dev" "$root/sys" "$root/proc"
  return $rc
}

# -- the root (cached): Trixie with a kernel and its headers and source, systemd and udev, libcamera and its cam
# tool, apt's Python, numpy and what picamera2 needs from apt, libgpiod's tools, a broker, and a compiler (PiDNG and
# lgpio build from source, and so do the two modules).
t=$SECONDS
if [ -e "$root/.complete" ]; then
  row "root: Trixie amd64 (cached)" ok 0 "$root"
else
  say "building $root with mmdebstrap (2-5 minutes)"
  rm -rf "$root.tmp"
  pkgs=systemd-sysv,udev,dbus,kmod,procps,iproute2,passwd,ca-certificates,xz-utils
  pkgs+=,linux-image-amd64,linux-headers-amd64,linux-source-6.12,initramfs-tools,make,gcc,libc6-dev,bc,swig
  pkgs+=,python3,python3-venv,python3-dev,python3-pip-whl,python3-numpy,python3-pil
  pkgs+=,python3-libcamera,libcamera-ipa,libcamera-tools,v4l-utils,python3-prctl,python3-av,python3-piexif
  pkgs+=,python3-libarchive-c,python3-tqdm,python3-jsonschema,python3-libgpiod,gpiod,mosquitto,mosquitto-clients
  # shellcheck disable=SC2016 # the hooks' $1 is mmdebstrap's root, expanded by its shell
  mmdebstrap --variant=apt --mode=root --aptopt='APT::Install-Recommends "false"' --include="$pkgs" \
    --customize-hook='echo edgeknn-vm > "$1/etc/hostname"' \
    --customize-hook='printf "/dev/vda / ext4 rw,errors=remount-ro 0 1\n" > "$1/etc/fstab"' \
    trixie "$root.tmp" \
    "deb http://deb.debian.org/debian trixie main" \
    "deb http://deb.debian.org/debian trixie-updates main" \
    "deb http://deb.debian.org/debian-security trixie-security main" >"$roots/trixie-amd64-vm.log" 2>&1 ||
    die "mmdebstrap failed: see $roots/trixie-amd64-vm.log"
  rm -rf "$root" && mv "$root.tmp" "$root" && touch "$root/.complete"
  row "root: Trixie amd64 (built)" ok $((SECONDS - t)) "$root"
fi
kernel=$(find "$root/boot" -name 'vmlinuz-*' | sort -V | tail -n 1)
initrd=$(find "$root/boot" -name 'initrd.img-*' | sort -V | tail -n 1)
kver=${kernel##*/vmlinuz-}
[ -d "$root/usr/src/linux-headers-$kver" ] || die "no linux-headers-$kver in the root: its kernel and headers differ"

# -- the modules (cached per kernel version): vimc and gpio-sim from linux-source, built against the headers of
# the very kernel that boots. Debian's kernel has no CONFIG_IRQ_SIM (gpio-sim selects it), so the interrupt
# simulator is linked into gpio-sim.ko; it calls irq_to_desc(), which a module cannot, so that one call becomes
# the exported generic_handle_irq() (the same handler runs).
mods=$(realpath -m "$roots/modules-$kver")
t=$SECONDS
if [ -e "$mods/.complete" ]; then
  row "modules: vimc, gpio-sim (cached)" ok 0 "$kver"
else
  say "building vimc.ko and gpio-sim.ko for $kver"
  # shellcheck disable=SC2016 # ${Version} is dpkg-query's field, not the shell's
  src_version=$(chroot "$root" dpkg-query -W -f '${Version}' linux-source-6.12)
  # shellcheck disable=SC2016
  image_version=$(chroot "$root" dpkg-query -W -f '${Version}' "linux-image-$kver")
  [ "$src_version" = "$image_version" ] || die "linux-source $src_version is not the kernel's $image_version"
  b=$root/tmp/modbuild
  rm -rf "$b" && mkdir -p "$b"
  tar -C "$b" -xJf "$root/usr/src/linux-source-6.12.tar.xz" --strip-components=1 \
    linux-source-6.12/drivers/media/test-drivers/vimc linux-source-6.12/drivers/gpio/gpio-sim.c \
    linux-source-6.12/kernel/irq/irq_sim.c
  mkdir -p "$b/gpio-sim"
  mv "$b/drivers/gpio/gpio-sim.c" "$b/gpio-sim/gpio-sim-main.c"
  sed 's/handle_simple_irq(irq_to_desc(irqnum));/generic_handle_irq(irqnum);/' "$b/kernel/irq/irq_sim.c" >"$b/gpio-sim/irq_sim.c"
  grep -q 'generic_handle_irq(irqnum);' "$b/gpio-sim/irq_sim.c" || die "irq_sim.c changed: the patch no longer applies"
  printf 'obj-m := gpio-sim.o\ngpio-sim-y := gpio-sim-main.o irq_sim.o\n' >"$b/gpio-sim/Makefile"
  {
    in_root make -C "/lib/modules/$kver/build" M=/tmp/modbuild/drivers/media/test-drivers/vimc CONFIG_VIDEO_VIMC=m modules &&
      in_root make -C "/lib/modules/$kver/build" M=/tmp/modbuild/gpio-sim modules
  } >"$roots/modules.log" 2>&1 || die "module build failed: see $roots/modules.log"
  rm -rf "$mods" && mkdir -p "$mods"
  cp "$b/drivers/media/test-drivers/vimc/vimc.ko" "$b/gpio-sim/gpio-sim.ko" "$mods/"
  rm -rf "$b"
  touch "$mods/.complete"
  row "modules: vimc, gpio-sim (built)" ok $((SECONDS - t)) "$kver"
fi

# -- the wheelhouse (cached): built in the root by its own pip, so every wheel fits its Python 3.13. picamera2 and
# the three it needs that apt lacks (PiDNG, simplejpeg, videodev2) without their dependencies, which apt has; lgpio
# from its sdist, statically linked (PYPI=1); edgeknn's dependencies read from pyproject.toml.
t=$SECONDS
if [ ! -e "$wheels/.complete" ]; then
  say "building the wheelhouse"
  rm -rf "$wheels" "$root/tmp/wheels" "$root/tmp/whv"
  mkdir -p "$root/tmp/wheels"
  cp "$host_ca" "$root/tmp/host-ca.crt"
  cp "$here/pyproject.toml" "$root/tmp/pyproject.toml"
  {
    chroot "$root" python3 -c 'import tomllib; d = tomllib.load(open("/tmp/pyproject.toml", "rb"))
print("\n".join(d["project"]["dependencies"] + d["build-system"]["requires"] + ["wheel"]))' >"$root/tmp/reqs.txt" &&
      echo "numpy==$(chroot "$root" python3 -c 'import numpy; print(numpy.__version__)')" >"$root/tmp/constraints.txt" &&
      in_root python3 -m venv /tmp/whv &&
      in_root env PIP_CERT=/tmp/host-ca.crt /tmp/whv/bin/pip wheel --no-cache-dir -w /tmp/wheels \
        -c /tmp/constraints.txt -r /tmp/reqs.txt &&
      in_root env PIP_CERT=/tmp/host-ca.crt /tmp/whv/bin/pip wheel --no-cache-dir --no-deps -w /tmp/wheels \
        picamera2 PiDNG simplejpeg videodev2 &&
      in_root env PIP_CERT=/tmp/host-ca.crt PYPI=1 /tmp/whv/bin/pip wheel --no-cache-dir --no-deps -w /tmp/wheels lgpio
  } >"$roots/wheels.log" 2>&1 || die "pip wheel failed: see $roots/wheels.log"
  mv "$root/tmp/wheels" "$wheels"
  rm -rf "$root/tmp/whv" "$root/tmp/host-ca.crt" "$root/tmp/pyproject.toml" "$root/tmp/reqs.txt" "$root/tmp/constraints.txt"
  touch "$wheels/.complete"
fi
row "wheelhouse: Python 3.13 x86-64" ok $((SECONDS - t)) "$(find "$wheels" -name '*.whl' | wc -l) wheels"

# -- the disk image: the cached root hard-linked (files are only added or replaced, never written in place), the
# modules installed for the kernel, the working tree, the model and the checks.
t=$SECONDS
work=$(mktemp -d "$roots/vm-run.XXXXXX")
trap 'rm -rf "$work/stage"' EXIT
stage=$work/stage
cp -al "$root" "$stage"
if [ ! -d "$stage" ] || [ -L "$stage" ]; then die "$stage is not a copy of the root"; fi
rm -f "$stage/.complete"
mkdir -p "$stage/lib/modules/$kver/updates/edgeknn-check"
cp "$mods"/*.ko "$stage/lib/modules/$kver/updates/edgeknn-check/"
rm -f "$stage/lib/modules/$kver"/modules.*  # depmod writes new ones; never through the hard links
cp "$root/lib/modules/$kver"/modules.{builtin,builtin.modinfo,order} "$stage/lib/modules/$kver/" 2>/dev/null || true
chroot "$stage" depmod "$kver"
chk=$stage/srv/edgeknn-check
mkdir -p "$chk/edgeknn"
(cd "$here" && git ls-files -co --exclude-standard -z |
  while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
  tar --null -T - -cf -) | tar -C "$chk/edgeknn" -xf -
cp -a "$wheels" "$chk/wheels"
cp "$model" "$chk/"
cp "$here/scripts/device-vm/"*.py "$chk/"
[ -e "$stage/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n127.0.1.1\tedgeknn-vm\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$stage/etc/hosts"
cp "$here/scripts/device-vm/vm-test.sh" "$chk/vm-test.sh"
chmod 0755 "$chk/vm-test.sh"
cat >"$stage/etc/systemd/system/edgeknn-check.service" <<'EOF'
[Unit]
Description=edgeknn device check (runs once, then powers off)
After=mosquitto.service systemd-udev-settle.service systemd-user-sessions.service
ConditionPathExists=!/var/log/edgeknn-check/results.tsv

[Service]
Type=oneshot
ExecStart=/srv/edgeknn-check/vm-test.sh
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$stage/etc/systemd/system/multi-user.target.wants"
ln -s /etc/systemd/system/edgeknn-check.service "$stage/etc/systemd/system/multi-user.target.wants/"
for unit in apt-daily.service apt-daily-upgrade.service apt-daily.timer apt-daily-upgrade.timer; do
  ln -sf /dev/null "$stage/etc/systemd/system/$unit"
done
cp "$kernel" "$work/vmlinuz" && cp "$initrd" "$work/initrd.img"
size_mb=$(($(du -sm "$stage" | cut -f1) + 1536))
mke2fs -q -t ext4 -L root -d "$stage" "$work/disk.img" "${size_mb}M" >/dev/null
rm -rf "$stage"
row "disk image (mke2fs -d)" ok $((SECONDS - t)) "${size_mb} MiB, kernel $kver"

# -- boot: TCG (KVM aborts on this kind of host), serial console to a file, no network.
t=$SECONDS
say "booting the VM (TCG, about 25 minutes); console: $work/console.log"
timeout "$timeout_s" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 3072 -no-reboot \
  -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0,115200 panic=10 net.ifnames=0 loglevel=4" \
  -drive "file=$work/disk.img,format=raw,if=virtio" -nic none -display none -serial "file:$work/console.log" \
  2> >(grep -v "TCG doesn't support requested feature" >&2) &
qemu=$!
tail -n +1 -F --pid=$qemu "$work/console.log" 2>/dev/null | grep --line-buffered -a '^check: ' || true
wait $qemu && qemu_rc=0 || qemu_rc=$?
row "VM boot, checks, poweroff" "$([ "$qemu_rc" = 0 ] && echo ok || echo "exit $qemu_rc")" $((SECONDS - t)) \
  "qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 3072"

for f in results.tsv camera-diag.txt log.txt install.log probe.txt source.txt run-camera.log run-panel.log frame.png dmesg.txt; do
  debugfs -c -R "dump /var/log/edgeknn-check/$f $work/$f" "$work/disk.img" >/dev/null 2>&1 || true
done

# -- the table
expected=$(sed -n 's/^# checks: \([0-9]*\).*/\1/p' "$here/scripts/device-vm/vm-test.sh")
failed=0
[ "$qemu_rc" = 0 ] || failed=1
if [ -s "$work/results.tsv" ]; then
  while IFS= read -r line; do
    rows+=("$line")
    [ "$(cut -f2 <<<"$line")" = PASS ] || failed=1
  done <"$work/results.tsv"
  ran=$(wc -l <"$work/results.tsv")
  [ "$ran" -ge "$expected" ] || { failed=1; row "checks" FAIL 0 "only $ran of $expected ran: see $work/log.txt"; }
else
  failed=1
  row "checks" FAIL 0 "no results from the VM: see $work/console.log"
fi
echo
printf '%-44s %-6s %6s  %s\n' check result secs detail
for r in "${rows[@]}"; do
  IFS=$'\t' read -r name result secs detail <<<"$r"
  printf '%-44s %-6s %6s  %s\n' "$name" "$result" "$secs" "$detail"
done
say "logs in $work (console.log, log.txt, probe.txt, source.txt, run-camera.log, run-panel.log, frame.png); disk.img kept for debugfs"
exit $failed

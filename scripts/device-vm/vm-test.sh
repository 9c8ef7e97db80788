#!/bin/bash
# Runs once at boot inside the device VM (edgeknn-check.service, as root): the checks, one line each in
# results.tsv, then poweroff. scripts/check-device-vm.sh builds the image and prints the table.
# checks: 23 (the number of rows results.tsv gets when every step ran; the host compares)
set -u
out=/var/log/edgeknn-check
mkdir -p "$out"
exec > >(tee -a "$out/log.txt" >/dev/ttyS0) 2>&1
chk=/srv/edgeknn-check
venv=/opt/edgeknn/venv
py=$venv/bin/python
ek=$venv/bin/edgeknn
base=edgeknn/vm
results=$out/results.tsv
: >"$results"
cd /tmp || exit 1 # lgpio keeps its notification pipes in the working directory

say() { echo "check: $*"; }
record() { # check result seconds detail
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(tr '\n\t' '  ' <<<"$4" | cut -c1-900)" >>"$results"
  say "$1: $2 (${3}s) $4"
}
# pass_if COMMAND...: PASS if it succeeds (a compound condition is written out as "$(if A && B; then ...)").
pass_if() { if "$@"; then echo PASS; else echo FAIL; fi; }
# wait_for SECONDS COMMAND...: poll once a second until COMMAND succeeds.
wait_for() {
  local end=$((SECONDS + $1))
  shift
  until "$@"; do [ $SECONDS -lt $end ] || return 1; sleep 1; done
}
# mq TOPIC REGEX SECONDS [PUB_TOPIC PAYLOAD]: the first matching message (retained ones count), after publishing.
mq() { "$py" "$chk/mq.py" "$base/$1" "$2" "$3" "${@:4}"; }
# camera_log FILE FROM_LINE: the camera's and capture's log lines since FROM_LINE, on one line.
camera_log() { tail -n +"$2" "$1" | grep -a -i -e 'camera' | cut -c1-220 | tr '\n' '|'; }
lines() { wc -l <"$1"; }

say "begin $(date -u +%FT%TZ) on $(uname -r)"

# -- 1. the camera: vimc, libcamera's dma-buf heap name, udev (systemd's udevd runs here)
t=$SECONDS
mkdir -p /dev/dma_heap
# picamera2's allocator opens /dev/dma_heap/{vidbuf_cached,linux,cma}; Debian's kernel names its heap "system".
[ -e /dev/dma_heap/linux,cma ] || ln -s system /dev/dma_heap/linux,cma
modprobe vimc
# vimc's media graph appears in steps under emulation: wait until libcamera lists the camera.
listed() { udevadm settle && cams=$(cam -l 2>&1 | grep -v '^\[' | tr '\n' ' ') && grep -q "Sensor B" <<<"$cams"; }
cams=
wait_for 120 listed
ok=$(pass_if grep -q "Sensor B" <<<"$cams")
if [ "$ok" != PASS ]; then
  { ls -l /dev/media* /dev/video* /dev/v4l-subdev*; lsmod | grep -e vimc -e videodev; dmesg | tail -n 20
    for m in /dev/media*; do media-ctl -d "$m" -p; done; LIBCAMERA_LOG_LEVELS='*:DEBUG' cam -l; } >"$out/camera-diag.txt" 2>&1
fi
record "vimc camera listed by libcamera (cam -l)" "$ok" $((SECONDS - t)) "$cams"

# -- 2. the venv as install-pi.sh makes it (--system-site-packages: apt's libcamera, numpy, Pillow, av, prctl),
# offline from the wheelhouse; picamera2 and lgpio from PyPI (on Pi OS both come from apt), and a pykms stand-in
# (Raspberry Pi archive only; picamera2 imports it for its DRM preview, which nothing here uses).
t=$SECONDS
numpy_version=$(python3 -c 'import numpy; print(numpy.__version__)')
echo "numpy==$numpy_version" >/tmp/constraints.txt
{
  python3 -m venv --system-site-packages "$venv" &&
    "$venv/bin/pip" install --no-index --find-links "$chk/wheels" -c /tmp/constraints.txt "$chk/edgeknn" &&
    "$venv/bin/pip" install --no-index --find-links "$chk/wheels" --no-deps picamera2 PiDNG simplejpeg videodev2 lgpio &&
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))') &&
    cp "$chk/pykms.py" "$site/pykms.py" &&
    "$py" -c 'import picamera2, lgpio, gpiozero, edgeknn; print("picamera2", picamera2.__file__.split("/")[-3], "gpiozero", gpiozero.__version__ if hasattr(gpiozero, "__version__") else "", "edgeknn", edgeknn.__version__)'
} >"$out/install.log" 2>&1
rc=$?
record "venv: edgeknn, picamera2, lgpio (offline)" "$(pass_if [ $rc = 0 ])" $((SECONDS - t)) "exit $rc: $(tail -n 1 "$out/install.log")"

# -- 3. the real picamera2 alone: what vimc advertises, where an unadvertised control is refused
t=$SECONDS
"$py" "$chk/probe_picamera2.py" >"$out/probe.txt" 2>"$out/probe.err"
rc=$?
record "picamera2 alone: open, configure, start, capture" "$(pass_if grep -q '"fact": "frame"' "$out/probe.txt")" \
  $((SECONDS - t)) "exit $rc; $(grep -a -e '"FrameRate"' -e '"frame"' -e set_controls "$out/probe.txt" | tr '\n' ' ')"

# -- 4. edgeknn's Picamera2Source: five rows from source_check.py
"$py" "$chk/source_check.py" "$results" "$out/frame.png" 2>&1 | tee "$out/source.txt" | grep -a '^check: '


# -- 5. the daemon on the camera: taught over MQTT, a prediction, the camera unplugged and back, a clean stop
cat >"$out/run-camera.toml" <<EOF
classes = ["one", "two", "three"]
state_dir = "/var/lib/edgeknn-camera"
[model]
path = "$chk/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
[store]
autosave_s = 1.0
[camera]
source = "auto"  # --source picamera2 on the command line
[panel]
kind = "none"
[mqtt]
device_id = "vm"
[web]
enabled = false
EOF
mosquitto_pub -t "$base/state" -r -n # no retained state from an earlier run
t=$SECONDS
log=$out/run-camera.log
: >"$log"
# Under systemd with the restart policy of systemd/edgeknn.service (Restart=on-failure, RestartSec=5).
unit=edgeknn-camera
systemd-run --unit=$unit -p Restart=on-failure -p RestartSec=5 -p WorkingDirectory=/tmp \
  -p StandardOutput=append:"$log" -p StandardError=append:"$log" \
  "$ek" run --config "$out/run-camera.toml" --source picamera2
prop() { systemctl show -p "$1" --value $unit; }
pid=$(prop MainPID)
state=$(mq state '"camera": "ok"' 600)
record "run --source picamera2: camera ok" "$(pass_if [ -n "$state" ])" $((SECONDS - t)) \
  "state: $(cut -c1-300 <<<"$state") | log: $(camera_log "$log" 1)"

t=$SECONDS
answer=$(mq cmd/result '"command": "add_example"' 900 "$base/cmd/add_example" '{"class": "one", "count": 2}')
record "MQTT add_example one x2" "$(pass_if grep -q '"ok": true' <<<"$answer")" $((SECONDS - t)) "$answer"

t=$SECONDS
prediction=$(mq prediction '"label": "one"' 300)
record "a prediction published" "$(pass_if [ -n "$prediction" ])" $((SECONDS - t)) "$(cut -c1-300 <<<"$prediction")"

# The camera leaves: rmmod vimc as asked; while a process has the camera open the kernel refuses ("in use"),
# so the device is unbound from its driver instead, which is what unplugging does (the nodes vanish, open files
# get ENODEV), and the module is removed once nothing holds it.
t=$SECONDS
from=$(lines "$log")
if rmmod_out=$(rmmod vimc 2>&1); then how="rmmod vimc"; else
  how="rmmod refused ($rmmod_out), so unbind vimc.0"
  echo vimc.0 >/sys/bus/platform/drivers/vimc/unbind
fi
down=$(mq state '"camera": "down"' 180)
sleep 20 # the capture thread gives up on the vanished camera (picamera2 read timeout) and closes it
if [ "${how#rmmod vimc}" != "$how" ]; then removed=yes; else
  if rmmod_out=$(rmmod vimc 2>&1); then removed="rmmod after unbind: ok"; else removed="rmmod after unbind: $rmmod_out"; fi
fi
record "camera leaves: device says down" "$(pass_if [ -n "$down" ])" $((SECONDS - t)) \
  "$how; $removed; state: $(cut -c1-200 <<<"$down") | log: $(camera_log "$log" "$from")"

t=$SECONDS
from=$(lines "$log")
if lsmod | grep -q '^vimc '; then echo vimc.0 >/sys/bus/platform/drivers/vimc/bind; how="bind vimc.0"; else
  modprobe vimc
  how="modprobe vimc"
fi
udevadm settle
sleep 10
back=$(mq state '"camera": "ok"' 300)
if [ "$(prop MainPID)" = "$pid" ]; then alive="same process $pid, no restart"; else
  alive="pid $pid gone ($(grep -a -m 1 -o 'FATAL.*' "$log" | cut -c1-160)); systemd restarted it: pid $(prop MainPID), NRestarts=$(prop NRestarts)"
fi
record "camera returns: device back (state ok)" "$(pass_if [ -n "$back" ])" $((SECONDS - t)) \
  "$how; $alive; state: $(cut -c1-120 <<<"$back") | log: $(camera_log "$log" "$from" | grep -v -e '^ *libcamera::' | cut -c1-600)"

t=$SECONDS
kept=$(mq state '"one": 2' 30)
systemctl stop $unit
rc=$(prop ExecMainStatus)
record "store kept, stop (SIGTERM) is clean" "$(if [ "$rc" = 0 ] && [ -n "$kept" ]; then echo PASS; else echo FAIL; fi)" $((SECONDS - t)) \
  "exit $rc, result $(prop Result); classes after the camera came back: $(grep -o '"classes": {[^}]*}' <<<"$kept") | $(tail -n 2 "$log" | tr '\n' '|')"

# -- 6. the panel on the kernel's GPIO: a gpio-sim chip with the default pins' lines, gpiozero's own factory
t=$SECONDS
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
modprobe gpio-sim
sim_cfg=/sys/kernel/config/gpio-sim/edgeknn
mkdir -p "$sim_cfg/bank0"
echo 28 >"$sim_cfg/bank0/num_lines" # GPIO0-27, the header's
echo edgeknn-sim >"$sim_cfg/bank0/label"
echo 1 >"$sim_cfg/live"
chip=$(cat "$sim_cfg/bank0/chip_name")
sim=/sys/devices/platform/$(cat "$sim_cfg/dev_name")/$chip
chips=$(gpiodetect 2>&1 | tr '\n' ' ')
record "gpio-sim chip, 28 lines" "$(if [ "$chip" = gpiochip0 ] && [ -e "$sim/sim_gpio27/pull" ]; then echo PASS; else echo FAIL; fi)" \
  $((SECONDS - t)) "$chips"

# gpiozero finds the board from the device tree or /proc/cpuinfo's Revision line; this VM has neither, so its
# factories refuse. The smallest honest way: a Revision line (a Pi 4B's, c03114) over /proc/cpuinfo in a private
# mount namespace for edgeknn alone. gpiozero then picks its default factory (lgpio, as on Pi OS), which opens
# gpiochip0 (a Pi 5 would be gpiochip4 or 0 by kernel) and maps GPIO17 to line 17, as on the Pi's own chip.
{ cat /proc/cpuinfo; printf 'Revision\t: c03114\n'; } >/run/cpuinfo-pi4b
as_pi() { unshare -m sh -c 'mount --bind /run/cpuinfo-pi4b /proc/cpuinfo && exec "$@"' sh "$@"; }
# listen TOPIC REGEX SECONDS: start waiting for a message in the background (events are not retained, so the
# waiter must be subscribed before the button acts); heard waits for it (not in a $(...): the waiter is this
# shell's child) and leaves the message in $heard.
listen() { "$py" "$chk/mq.py" "$base/$1" "$2" "$3" >/tmp/heard & heard_pid=$!; sleep 3; }
heard() { wait "$heard_pid"; heard=$(cat /tmp/heard); }
probe_gpio='from gpiozero import Device, DigitalInputDevice
d = DigitalInputDevice(17, pull_up=True)
f = Device.pin_factory
print(type(f).__name__, "chip", getattr(f, "chip", "?"), f.board_info.model, "GPIO17 value", d.value)
d.close()'
t=$SECONDS
bare=$("$py" -W ignore -c "$probe_gpio" 2>&1 | tail -n 1)
as_pi_out=$(as_pi "$py" -W ignore -c "$probe_gpio" 2>&1 | tail -n 1)
record "gpiozero's default factory on the sim chip" "$(pass_if grep -q '^LGPIOFactory chip 0 .* GPIO17 value 0$' <<<"$as_pi_out")" \
  $((SECONDS - t)) "without a Pi revision: $bare | with Revision c03114 in /proc/cpuinfo: $as_pi_out"

cat >"$out/run-panel.toml" <<EOF
classes = ["one", "two", "three"]
state_dir = "/var/lib/edgeknn-panel"
[model]
path = "$chk/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
[store]
autosave_s = 1.0
[camera]
source = "auto"
[panel]
kind = "gpio"
# Under TCG gpiozero's callbacks reach the panel seconds late while a frame is embedded, so a 0.3 s press
# would look like a hold past the default 0.8 s (docs/device-vm.md): a longer hold_time keeps the two apart.
hold_time = 3.0
hold_rate = 2.0
[mqtt]
device_id = "vm"
[web]
enabled = false
EOF
value() { cat "$sim/sim_gpio$1/value"; }
pull() { echo "pull-$2" >"$sim/sim_gpio$1/pull"; }
leds() { echo "GPIO5=$(value 5) GPIO6=$(value 6) GPIO13=$(value 13) status GPIO19=$(value 19)"; }
sensor_subdev() {
  local m
  for m in /dev/media*; do media-ctl -d "$m" -e "Sensor B" 2>/dev/null && return 0; done
  return 1
}
# pattern NAME: vimc's sensor draws another test pattern (v4l2-ctl's menu of test_pattern) from the next frame on.
pattern() {
  local sub n
  sub=$(sensor_subdev) || return 1
  n=$(v4l2-ctl -d "$sub" -L 2>/dev/null | grep -F ": $1" | head -n 1 | cut -d: -f1 | tr -d ' \t')
  [ -n "$n" ] && v4l2-ctl -d "$sub" -c "test_pattern=$n"
}
mosquitto_pub -t "$base/state" -r -n
t=$SECONDS
log=$out/run-panel.log
: >"$log"
unit=edgeknn-panel
systemd-run --unit=$unit -p WorkingDirectory=/tmp -p StandardOutput=append:"$log" -p StandardError=append:"$log" \
  /usr/bin/unshare -m sh -c 'mount --bind /run/cpuinfo-pi4b /proc/cpuinfo && exec "$@"' sh \
  "$ek" run --config "$out/run-panel.toml"
state=$(mq state '"camera": "ok"' 600)
sleep 3
record "run (auto), panel gpio on the sim chip: up" "$(if [ -n "$state" ] && [ "$(value 19)" = 1 ]; then echo PASS; else echo FAIL; fi)" \
  $((SECONDS - t)) "$(leds); log: $(grep -a -i -e 'auto found' -e panel -e gpio -e pin "$log" | cut -c1-200 | tr '\n' '|')"

t=$SECONDS
before=$(value 17)
listen event '"example_added", "class": "one"' 600
pull 17 down
sleep 0.3
pull 17 up
heard
event=$heard
sleep 5
counts=$(mq state '"examples": ' 10 | grep -o '"classes": {[^}]*}')
record "button press (GPIO17 low 0.3 s) adds one example" "$(if [ -n "$event" ] && grep -q '"one": 1,' <<<"$counts"; then echo PASS; else echo FAIL; fi)" \
  $((SECONDS - t)) "line before: $before; event: $(cut -c1-160 <<<"$event"); $counts"

t=$SECONDS
switched=$(pattern "100% Green" && echo "test pattern now 100% Green" || echo "pattern switch failed")
sleep 8
pull 27 down
sleep 5
pull 27 up
wait_for 900 sh -c "$py $chk/mq.py $base/state '\"two\": [2-9]' 5 >/dev/null"
counts=$(mq state '"examples": ' 10 | grep -o '"classes": {[^}]*}')
record "button hold (GPIO27 low 5 s) records several" "$(pass_if grep -q '"two": [2-9]' <<<"$counts")" \
  $((SECONDS - t)) "$switched; $counts"

t=$SECONDS
pattern "75% Colorbar"
sleep 8
pull 17 down
sleep 5
pull 17 up
wait_for 900 sh -c "$py $chk/mq.py $base/state '\"one\": [3-9]' 5 >/dev/null"
counts=$(mq state '"examples": ' 10 | grep -o '"classes": {[^}]*}')
record "button hold (GPIO17 low 5 s), colour bars" "$(pass_if grep -q '"one": [3-9]' <<<"$counts")" \
  $((SECONDS - t)) "$counts"

t=$SECONDS
pattern "100% Green"
p_two=$(mq prediction '"label": "two"' 300)
sleep 3
leds_two=$(leds)
pattern "75% Colorbar"
p_one=$(mq prediction '"label": "one"' 300)
sleep 3
leds_one=$(leds)
record "LEDs follow the prediction" \
  "$(if [ -n "$p_two" ] && [ -n "$p_one" ] && grep -q 'GPIO5=0 GPIO6=1' <<<"$leds_two" && grep -q 'GPIO5=1 GPIO6=0' <<<"$leds_one"; then echo PASS; else echo FAIL; fi)" \
  $((SECONDS - t)) "green -> two: $leds_two | colour bars -> one: $leds_one"

t=$SECONDS
listen event '"class_forgotten", "class": "two"' 120
pull 26 down
pull 27 down
sleep 4
pull 27 up
pull 26 up
heard
forgot=$heard
sleep 3
counts=$(mq state '"examples": ' 10 | grep -o '"classes": {[^}]*}')
record "clear + class button held 4 s forgets the class" "$(if [ -n "$forgot" ] && grep -q '"two": 0' <<<"$counts"; then echo PASS; else echo FAIL; fi)" \
  $((SECONDS - t)) "$(cut -c1-160 <<<"$forgot"); $counts"

t=$SECONDS
leds_before=$(leds)
systemctl stop $unit
rc=$(prop ExecMainStatus)
record "panel run: stop (SIGTERM) is clean" "$(pass_if [ "$rc" = 0 ])" $((SECONDS - t)) \
  "exit $rc, result $(prop Result); lines before: $leds_before; after: $(leds) | $(tail -n 2 "$log" | tr '\n' '|')"

dmesg >"$out/dmesg.txt"
say "end $(date -u +%FT%TZ)"
sync
systemctl poweroff --no-block

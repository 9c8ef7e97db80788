#!/usr/bin/env bash
# Check the installer and the device on Raspberry Pi OS's base, emulated: build arm64 Debian Bookworm and Trixie
# roots with mmdebstrap (cached in ROOTS_DIR), run them under qemu-user-static through binfmt, and inside each:
# scripts/install-pi.sh, `edgeknn classify` (parrot.jpg -> macaw), `teach`/`predict` on sign-language digits,
# a 20-second `edgeknn run --source replay:... --panel none` on a free port (its page must answer) ended by SIGTERM
# (exit 0 expected), the fast tests, the installer rerun (an upgrade in place keeps config and store), the wheelhouse
# made by scripts/wheelhouse.sh (the docs' offline-install command), `--uninstall` (keeps the store) and an install
# with no network from that wheelhouse.
# Prints one summary table per root. Not part of .ci/run: a root takes 30-45 minutes to build on 2 busy cores,
# a check about 20 more.
#
#   sudo scripts/check-pi-os.sh ROOTS_DIR [bookworm|trixie|all]      (default all)
#
# Debian's archive has no python3-picamera2 or python3-lgpio (they come from the Raspberry Pi archive, not
# reachable here), so the installer takes its "other Debian arm64 board" path: it says so and installs
# python3-opencv instead, and writes panel.kind = "none" (no lgpio: no GPIO panel). Everything else is what it
# does on a Pi. The model download is not assumed to be reachable: model.path is set to the extractor from
# ../shared (SHARED=DIR overrides). pip inside the root needs PyPI. The host's /sys is not mounted in the root (XNNPACK's cpuinfo segfaults under qemu when it is).
# Needs root on a Debian/Ubuntu host; installs mmdebstrap, qemu-user-static and binfmt-support if missing.
set -euo pipefail
# shellcheck disable=SC2317  # the step functions are called through step()

usage() { echo "usage: $0 ROOTS_DIR [bookworm|trixie|all]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
roots_dir=$(mkdir -p "$1" && cd "$1" && pwd)
case "${2:-all}" in
  all) suites=(bookworm trixie) ;;
  bookworm | trixie) suites=("$2") ;;
  *) usage ;;
esac
[ "$(id -u)" = 0 ] || { echo "check-pi-os.sh: run as root (mmdebstrap, chroot and mounts need it)" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/.." && pwd)
shared=$(cd "${SHARED:-$repo/../shared}" && pwd)
mirror=${MIRROR:-http://deb.debian.org/debian}
# What a Raspberry Pi OS Lite image already has that matters here; the installer installs the rest.
base_packages="ca-certificates,passwd,python3,python3-venv,python3-numpy,python3-opencv,systemd,systemd-sysv"
extractor=mobilenet_v1_1.0_224_quant_embedding_extractor.tflite
check=/srv/edgeknn-check # inside the root: the working tree in $check/edgeknn, the shared files in $check/shared

# --- host set-up -------------------------------------------------------------------------------------------
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}"; fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "check-pi-os.sh: binfmt for qemu-aarch64 not registered" >&2; exit 1; }

# --- one step of the summary --------------------------------------------------------------------------------
rows=()
failed=0
last=0
# step NAME FUNCTION: runs FUNCTION in a subshell with errexit (so step is never called as a condition, where
# bash would ignore errexit inside), its output to the log; adds (NAME, ok/FAIL, seconds) to the table and
# leaves the exit status in $last.
step() {
  local name=$1 t0 rc
  shift
  echo "=== $name: $*" >>"$log"
  t0=$(date +%s)
  set +e
  (
    set -e
    "$@"
  ) >>"$log" 2>&1
  rc=$?
  set -e
  last=$rc
  local detail=""
  [ -s "$tmp/detail" ] && detail=$(cat "$tmp/detail") && : >"$tmp/detail"
  if [ $rc = 0 ]; then
    rows+=("$name|ok${detail:+: $detail}|$(($(date +%s) - t0))")
  else
    rows+=("$name|FAIL (exit $rc)${detail:+: $detail}|$(($(date +%s) - t0))")
    failed=1
  fi
  echo "=== $name: exit $rc" >>"$log"
}
note() { echo "$*" >"$tmp/detail"; }

# in_root CMD...: run in the root as root; as_edgeknn CMD...: as the service's user, with its environment.
in_root() { chroot "$run" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }
as_edgeknn() { in_root runuser -u edgeknn -- env HOME=/var/lib/edgeknn STATE_DIRECTORY=/var/lib/edgeknn \
  PYTHONUNBUFFERED=1 "$@"; }
edgeknn() { as_edgeknn /opt/edgeknn/venv/bin/edgeknn "$@"; }

# --- the steps ----------------------------------------------------------------------------------------------
build_root() {
  rm -rf "$roots_dir/$suite.tmp"
  mmdebstrap --arch=arm64 --variant=apt --include="$base_packages" "$suite" "$roots_dir/$suite.tmp" "$mirror"
  mv "$roots_dir/$suite.tmp" "$roots_dir/$suite"
}

# A throw-away copy of the cached root (an overlay if the kernel allows, else a copy), with /proc, /dev and
# DNS; no /sys, and no /run/systemd/system, so the installer sees no running systemd (as in an image build).
prepare_run() {
  mkdir -p "$run" "$tmp/upper" "$tmp/work"
  if ! mount -t overlay overlay -o "lowerdir=$roots_dir/$suite,upperdir=$tmp/upper,workdir=$tmp/work" "$run"; then
    cp -a "$roots_dir/$suite/." "$run/"
  fi
  mount -t proc proc "$run/proc"
  mount --rbind /dev "$run/dev"
  mount -t tmpfs tmpfs "$run/run"
  mount -t tmpfs tmpfs "$run/tmp"
  cp -L /etc/resolv.conf "$run/etc/resolv.conf"
  # A host behind a TLS-inspecting proxy trusts it through local CAs: the root needs them too, for pip.
  for ca in /usr/local/share/ca-certificates/*.crt; do
    [ -e "$ca" ] || continue
    cp "$ca" "$run/usr/local/share/ca-certificates/"
    cat "$ca" >>"$run/etc/ssl/certs/ca-certificates.crt"
  done
  mkdir -p "$run$check/edgeknn" "$run$check/shared/models" "$run$check/shared/data"
  tar -C "$repo" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=__pycache__ --exclude=build \
    -cf - . | tar -C "$run$check/edgeknn" -xf -
  cp -r "$shared/models/." "$run$check/shared/models/" # the tests use the other models too
  cp -r "$shared/data/test_photos" "$shared/data/sign_language_digits" "$run$check/shared/data/"
  chmod -R a+rX "$run$check"
  note "$(in_root sh -c '. /etc/os-release; echo "$PRETTY_NAME, $(dpkg --print-architecture), $(python3 -V), numpy $(python3 -c "import numpy; print(numpy.__version__)")"')"
}

install() {
  in_root "$check/edgeknn/scripts/install-pi.sh"
  local numpy pin
  numpy=$(in_root python3 -c 'import numpy; print(numpy.__version__)')
  pin=$(cat "$run/opt/edgeknn/constraints.txt")
  [ "$pin" = "numpy==$numpy" ] || { note "constraints say $pin, apt has $numpy"; return 1; }
  # The venv uses apt's numpy, not a copy from PyPI.
  in_root /opt/edgeknn/venv/bin/python -c 'import numpy, sys; sys.exit("/usr/lib/python3/dist-packages" not in numpy.__file__)'
  cmp "$repo/systemd/edgeknn.service" "$run/etc/systemd/system/edgeknn.service"
  [ "$(in_root systemctl is-enabled edgeknn.service)" = enabled ]
  # No python3-lgpio in Debian's archive: the installer writes a panel that works here, not the Pi's GPIO one.
  local panel
  panel=$(in_root python3 -c 'import tomllib; print(tomllib.load(open("/etc/edgeknn/edgeknn.toml", "rb"))["panel"]["kind"])')
  [ "$panel" = none ] || { note "panel.kind = $panel on a board without GPIO"; return 1; }
  note "numpy $numpy from apt kept, service enabled, panel.kind = none (no GPIO)"
  # As the check's stand-in for a download: the extractor from ../shared.
  sed -i "/^\[model\]/,/^\[/ s|^path = \"\"|path = \"$check/shared/models/$extractor\"|" "$run/etc/edgeknn/edgeknn.toml"
  grep -q "^path = \"$check/shared/models/$extractor\"" "$run/etc/edgeknn/edgeknn.toml"
}

classify() {
  local m=$check/shared/models out
  out=$(edgeknn classify "$check/shared/data/test_photos/parrot.jpg" --model "$m/$extractor" \
    --head "$m/mobilenet_quant_v1_224_head_layers.tflite" --labels "$m/imagenet_labels.txt" --top 1)
  echo "$out"
  note "${out##*: }"
  grep -q macaw <<<"$out"
}

# 5 photos each of the digits 1, 2 and 3 as the configured classes one, two and three; predict 3 others of each.
digits=(1 2 3)
names=(one two three)
teach() {
  local i
  for i in 0 1 2; do
    mapfile -t files < <(ls "$run$check/shared/data/sign_language_digits/${digits[$i]}" | sort | head -n 5)
    edgeknn teach --store /var/lib/edgeknn/store.npz --class "${names[$i]}" \
      "${files[@]/#/$check/shared/data/sign_language_digits/${digits[$i]}/}"
  done
  note "15 examples, 3 classes"
}

# What the row measures is the embedding and the head on arm64 (native x86-64 gives the same labels), not the
# unknown threshold (calibrated from 15 examples, it may turn a right answer into `unrecognized`; issue 22): a photo
# counts as right when its top-1 class by the head's scores is the right one, whether the answer is that class or
# `unrecognized` with it as the candidate. The answers themselves are counted beside it.
predict() {
  local i images=() out right
  for i in 0 1 2; do
    mapfile -t files < <(ls "$run$check/shared/data/sign_language_digits/${digits[$i]}" | sort | sed -n '101,103p')
    images+=("${files[@]/#/$check/shared/data/sign_language_digits/${digits[$i]}/}")
  done
  out=$(edgeknn predict --store /var/lib/edgeknn/store.npz --json "${images[@]}")
  echo "$out"
  right=$(python3 -c '
import json, sys
want = {"1": "one", "2": "two", "3": "three"}
rows = [json.loads(line) for line in sys.stdin if line.strip()]
top = sum(want[r["file"].split("/")[-2]] == max(r["scores"], key=r["scores"].get) for r in rows)
said = sum(want[r["file"].split("/")[-2]] == r["label"] for r in rows)
unknown = sum(r["label"] == "unrecognized" for r in rows)
print(top, len(rows), said, unknown)' <<<"$out")
  read -r top n said unknown <<<"$right"
  note "top-1 class right for $top/$n held-out photos (answers: $said right, $unknown unrecognized at the calibrated threshold)"
  [ "$n" = 9 ] && [ "$top" -ge 6 ]
}

# The daemon as the unit runs it (user, state directory, installed config), for 20 s after it reports running.
# The chroot shares the host's network: its page listens on a port that is free now, on 127.0.0.1 only, and must
# answer (any HTTP status: the page asks for its password) while the daemon runs.
run_daemon() {
  local pid waited=0 rc port page
  port=$(in_root python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # edgeknn itself writes its pid (the host's: a chroot shares the pid namespace), to get the SIGTERM.
  as_edgeknn sh -c 'echo $$ >/tmp/edgeknn-run.pid; exec "$@"' sh /opt/edgeknn/venv/bin/edgeknn run \
    --config /etc/edgeknn/edgeknn.toml --panel none --mqtt none --web "127.0.0.1:$port" \
    --source "replay:$check/shared/data/sign_language_digits/2?fps=5" >"$tmp/run.log" 2>&1 &
  pid=$!
  until grep -q "running:" "$tmp/run.log" || ! kill -0 "$pid" 2>/dev/null || [ $waited -ge 300 ]; do
    sleep 1
    waited=$((waited + 1))
  done
  if ! grep -q "running:" "$tmp/run.log"; then
    cat "$tmp/run.log"
    note "not running after ${waited}s"
    kill "$pid" 2>/dev/null || true
    wait "$pid" || true
    return 1
  fi
  sleep 10
  page=$(in_root python3 -c '
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=30).status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError as e:
    print(f"none ({e})")' "http://127.0.0.1:$port/")
  sleep 10
  local daemon_pid
  daemon_pid=$(cat "$run/tmp/edgeknn-run.pid")
  [ "${daemon_pid:-0}" -gt 0 ] || { note "no pid written"; return 1; }
  kill -TERM "$daemon_pid"
  set +e
  wait "$pid"
  rc=$?
  set -e
  cat "$tmp/run.log"
  local predictions
  predictions=$(grep -c "prediction:" "$tmp/run.log" || true)
  note "READY after ${waited}s, 20 s running, $predictions predictions logged, page on :$port HTTP $page, SIGTERM -> exit $rc"
  [ "$rc" = 0 ] && grep -q "stopped" "$tmp/run.log" && [[ $page =~ ^[0-9]+$ ]]
}

fast_tests() {
  in_root /opt/edgeknn/venv/bin/pip install --disable-pip-version-check -q -c /opt/edgeknn/constraints.txt \
    pytest hypothesis
  local rc=0
  in_root sh -c "cd $check/edgeknn && /opt/edgeknn/venv/bin/python -m pytest -q -p no:cacheprovider \
    -m 'not slow' tests/test_store.py tests/test_model.py" >"$tmp/pytest.out" 2>&1 || rc=$?
  cat "$tmp/pytest.out"
  note "$(grep -E '(passed|failed|error).* in [0-9.]+s' "$tmp/pytest.out" | tail -n 1 | tr -d '=' | xargs)"
  return $rc
}

rerun() {
  local conf store
  conf=$(sha256sum <"$run/etc/edgeknn/edgeknn.toml")
  store=$(sha256sum <"$run/var/lib/edgeknn/store.npz")
  in_root "$check/edgeknn/scripts/install-pi.sh"
  [ "$conf" = "$(sha256sum <"$run/etc/edgeknn/edgeknn.toml")" ] || { note "config changed"; return 1; }
  [ "$store" = "$(sha256sum <"$run/var/lib/edgeknn/store.npz")" ] || { note "store changed"; return 1; }
  note "config and store unchanged"
}

# README "Offline install": the wheels for this root's Python, made as the README makes them (scripts/wheelhouse.sh:
# the package's own metadata, no list of its own), with the venv's pip (the root's python3 has none).
offline_wheels() {
  local py numpy
  py=$(in_root python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  numpy=$(in_root python3 -c 'import numpy; print(numpy.__version__)')
  in_root env PIP=/opt/edgeknn/venv/bin/pip "$check/edgeknn/scripts/wheelhouse.sh" /srv/wheels "$py" "$numpy"
  note "scripts/wheelhouse.sh /srv/wheels $py $numpy: $(find "$run/srv/wheels" -name '*.whl' | wc -l) wheels"
}

# After --uninstall: install again with no network at all (a new network namespace), from those wheels.
offline_install() {
  rm -f "$run/var/lib/edgeknn/models/$extractor"
  unshare --net chroot "$run" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PIP_NO_INDEX=1 PIP_FIND_LINKS=/srv/wheels \
    "$check/edgeknn/scripts/install-pi.sh" | tee "$tmp/offline.out"
  [ "$(in_root systemctl is-enabled edgeknn.service)" = enabled ]
  grep -q "model not downloaded now" "$tmp/offline.out" || { note "no word about the missing model"; return 1; }
  edgeknn predict --store /var/lib/edgeknn/store.npz "$check/shared/data/sign_language_digits/3/$(ls "$run$check/shared/data/sign_language_digits/3" | sort | sed -n 150p)"
  note "no network: installed, enabled, model fetch failure reported, kept store predicts"
}

uninstall() {
  in_root "$check/edgeknn/scripts/install-pi.sh" --uninstall
  if [ -e "$run/opt/edgeknn" ] || [ -e "$run/etc/systemd/system/edgeknn.service" ]; then
    note "program or unit left behind"
    return 1
  fi
  if [ ! -s "$run/var/lib/edgeknn/store.npz" ] || [ ! -s "$run/etc/edgeknn/edgeknn.toml" ]; then
    note "config or store removed"
    return 1
  fi
  note "program and unit gone, config and store kept"
}

cleanup() {
  [ -n "${run:-}" ] || return 0
  if [ -s "$run/tmp/edgeknn-run.pid" ]; then kill -TERM "$(cat "$run/tmp/edgeknn-run.pid")" 2>/dev/null || true; fi
  for m in tmp run dev proc; do umount -R "$run/$m" 2>/dev/null || umount -l "$run/$m" 2>/dev/null || true; done
  umount "$run" 2>/dev/null || true
  rm -rf "$run" "$tmp"
  run=""
}
trap cleanup EXIT

# --- each suite ---------------------------------------------------------------------------------------------
tables=()
for suite in "${suites[@]}"; do
  log=$roots_dir/$suite-check.log
  : >"$log"
  rows=()
  last=0
  tmp=$(mktemp -d "$roots_dir/.$suite-check.XXXX")
  run=$tmp/root
  : >"$tmp/detail"
  echo "check-pi-os.sh: $suite, log in $log"
  if [ -d "$roots_dir/$suite" ]; then
    rows+=("root $roots_dir/$suite|cached|0")
  else
    step "build root (mmdebstrap arm64 $suite)" build_root
  fi
  [ "$last" = 0 ] && step "prepare (copy root, tree, shared files)" prepare_run
  if [ "$last" = 0 ]; then step "install-pi.sh" install; fi
  if [ "$last" = 0 ]; then
    step "classify parrot.jpg" classify
    step "teach (sign digits 1-3, 5 each)" teach
    if [ "$last" = 0 ]; then
      step "predict (3 held-out each)" predict
      step "run 20 s replay, SIGTERM" run_daemon
    fi
    step "fast tests (test_store, test_model)" fast_tests
    step "rerun install-pi.sh (upgrade)" rerun
    step "wheels for offline (scripts/wheelhouse.sh)" offline_wheels
    step "install-pi.sh --uninstall" uninstall
    step "offline install-pi.sh (no network)" offline_install
  fi
  cleanup
  table=$(
    echo "## $suite (arm64, qemu-user), $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "| step | result | seconds |"
    echo "|---|---|---:|"
    for r in "${rows[@]}"; do IFS='|' read -r a b c <<<"$r"; echo "| $a | $b | $c |"; done
  )
  echo "$table" >"$roots_dir/$suite-summary.md"
  tables+=("$table")
done

for t in "${tables[@]}"; do echo; echo "$t"; done
exit $failed

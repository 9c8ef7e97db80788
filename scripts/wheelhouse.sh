#!/usr/bin/env bash
# The wheels for an offline install (scripts/install-pi.sh with PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR), for a board's
# Python, fetched on a machine with network. What to fetch comes from the package's own metadata, never from a list
# kept here: pip resolves the project directory itself ([project].dependencies, with every dependency's own
# dependencies), and the build backend the installer's `pip install CLONE` needs is [build-system].requires, read
# from pyproject.toml. The checks (check-pi-os.sh, check-systemd-vm.sh) make their wheelhouses with this too.
#
#   scripts/wheelhouse.sh DIR PYTHON NUMPY [ARCH]
#     DIR     where the wheels go (made if missing; wheels already there are kept)
#     PYTHON  the board's Python: 3.11 on Bookworm, 3.13 on Trixie
#     NUMPY   the numpy apt has on the board (python3 -c 'import numpy; print(numpy.__version__)'):
#             1.24.2 on Bookworm, 2.2.4 on Trixie; the installer pins the venv to it, and pip then picks the
#             dependencies' releases that work with it
#     ARCH    aarch64 (default: a Raspberry Pi's 64-bit OS) or x86_64
#   e.g. scripts/wheelhouse.sh ../wheels 3.11 1.24.2
# Runs `python3 -m pip` (PIP="/path/to/pip" to use another; python3 needs tomllib: 3.11 or newer).
set -euo pipefail

prog=wheelhouse.sh
die() { echo "$prog: $*" >&2; exit 2; }
if [ $# -lt 3 ] || [ $# -gt 4 ]; then die "usage: $prog DIR PYTHON NUMPY [ARCH]   (e.g. $prog ../wheels 3.11 1.24.2)"; fi
dir=$1 py=$2 numpy=$3 arch=${4:-aarch64}
case "$py" in 3.1[1-9]) ;; *) die "PYTHON: 3.11 or newer, as major.minor (got $py)" ;; esac
case "$numpy" in [0-9]*.[0-9]*) ;; *) die "NUMPY: a version such as 1.24.2 (got $numpy)" ;; esac
case "$arch" in aarch64 | x86_64) ;; *) die "ARCH: aarch64 or x86_64 (got $arch)" ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
read -r -a pip <<<"${PIP:-python3 -m pip}"

# The build backend: pip builds the clone in an isolated environment, which offline comes from DIR too.
mapfile -t build_requires < <(python3 - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
EOF
)
[ ${#build_requires[@]} -gt 0 ] || die "no [build-system].requires in $repo/pyproject.toml"

# Wheels only, for the board: CPython PYTHON on glibc Linux up to Bookworm's 2.36 (Trixie has 2.41).
platforms=(--platform "manylinux2014_$arch")
for glibc in $(seq 17 36); do platforms+=(--platform "manylinux_2_${glibc}_$arch"); done
mkdir -p "$dir"
"${pip[@]}" download --disable-pip-version-check -d "$dir" --only-binary=:all: --python-version "$py" \
  --implementation cp --abi "cp${py/./}" "${platforms[@]}" "$repo" "numpy==$numpy" "${build_requires[@]}"
echo "$prog: $(find "$dir" -maxdepth 1 -name '*.whl' | wc -l) wheels in $dir for CPython $py on $arch (numpy $numpy)"

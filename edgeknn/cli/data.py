"""`edgeknn data fetch`: the models and photo sets the tests and the bench use, downloaded and checked.

A fresh clone runs the suite on what the package carries (the default model, the demo photos); the
tests that need more find it in ``../shared`` beside the repository, else ``$EDGEKNN_DATA``, else the
cache this fills (``$XDG_CACHE_HOME/edgeknn``, i.e. ``~/.cache/edgeknn``). The cache is laid out like
``../shared``: ``models/<file>``, ``data/test_photos/<file>``, ``data/sign_language_digits/<digit>/<file>``.

Every file is pinned: the models and test photos to google-coral/test_data at one commit and each file's
sha256; the sign digits to ardamavi/Sign-Language-Digits-Dataset at one commit, as that commit's
archive, checked by the sha256 over every photo's sha256 (the same check ``../shared``'s README gives).
A file is kept only once it checks out, and a folder appears only whole (written beside it, then renamed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeknn.cli.errors import InputError
from edgeknn.model.registry import MODELS
from edgeknn.model.tflite import ModelError, sha256_of

GITHUB = "https://github.com"
GITHUB_ENV = "EDGEKNN_GITHUB_BASE"  # tests only: a local mirror laid out like github.com
TEST_DATA = ("google-coral/test_data", "104342d2d3480b3e66203073dac24f4e2dbb4c41")
DIGITS_REPO = ("ardamavi/Sign-Language-Digits-Dataset", "4b09433ef9d5c60602e8805bb54b8aa2428527f8")
# sha256 of the sorted "<sha256>  ./<digit>/<file>" lines of every photo (`sha256sum` | sha256sum)
DIGITS_SHA256 = "b2db9f69d918a9c3638bda75402275dc25e42ac380995d0ae357278a560a16c9"
DIGITS_COUNT = 2062
FETCHED = ".fetched"  # written once every file checked out: the tests take the cache only then


@dataclass(frozen=True)
class Pinned:
    """One file of google-coral/test_data at ``TEST_DATA``'s commit: where it goes, and its sha256."""

    path: str  # in the repository
    dest: str  # in the cache
    sha256: str


FILES = [
    *(Pinned(m.file, f"models/{m.file}", m.sha256) for m in MODELS.values()),
    Pinned(
        "tools/mobilenet_quant_v1_224_head_layers.tflite",
        "models/mobilenet_quant_v1_224_head_layers.tflite",
        "65a88984b258c6f3c99d7573acac8cf85bd747293d83d51fafc1c2fb6d632286",
    ),
    Pinned(
        "imagenet_labels.txt",
        "models/imagenet_labels.txt",
        "b8aaeb5630c62626a7d124a05c0e14230a7ffdd2136a31d0190a4fb71c1d82f1",
    ),
    *(
        Pinned(name, f"data/test_photos/{name}", sha256)
        for name, sha256 in (
            ("grace_hopper.bmp", "c43444bf3b1b1e3080551ca194bd231da4b67f20fc91454502915a6b806b614f"),
            ("cat.bmp", "34f235786382686111728287fd26d4c24dd8c25de8233469d6eeb301888ce0a9"),
            ("parrot.jpg", "a8fba9e7e29439fa414c13129aad661f2289ff891231920a7c33641b076f1833"),
            ("hot_dog.jpg", "ed6952e022eb71c0d0b1ff068dcee3abed056dfa1852f041c35f138c4ff15b2e"),
        )
    ),
]


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/edgeknn``, else ``~/.cache/edgeknn``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeknn"


def _github() -> str:
    return (os.environ.get(GITHUB_ENV) or GITHUB).rstrip("/")


def file_url(pinned: Pinned) -> str:
    repo, commit = TEST_DATA
    return f"{_github()}/{repo}/raw/{commit}/{pinned.path}"


def digits_url() -> str:
    repo, commit = DIGITS_REPO
    return f"{_github()}/{repo}/archive/{commit}.tar.gz"


def data_fetch(args) -> int:
    """Fetch what is missing into ``--dest`` (default: the cache); say each file once; exit 1 on a failure."""
    from edgeknn.model.download import fetch

    dest = Path(args.dest) if args.dest else default_cache()
    failed = 0
    for pinned in FILES:
        target = dest / pinned.dest
        if target.is_file() and sha256_of(target) == pinned.sha256:
            continue
        try:
            fetch(file_url(pinned), pinned.sha256, target)
        except ModelError as e:
            print(f"edgeknn: {e}")
            failed += 1
            continue
        print(f"{target}: sha256 {pinned.sha256[:12]} verified")
    digits = dest / "data" / "sign_language_digits"
    if digits_digest(digits) == DIGITS_SHA256:
        print(f"{digits}: {DIGITS_COUNT} photos verified (already there)")
    else:
        try:
            fetch_digits(digits)
            print(f"{digits}: {DIGITS_COUNT} photos verified")
        except InputError as e:
            print(f"edgeknn: {e}")
            failed += 1
    if failed:
        print(f"edgeknn: {failed} download(s) failed; what was verified is kept in {dest}")
        return 1
    (dest / FETCHED).write_text(f"{TEST_DATA[0]}@{TEST_DATA[1]}\n{DIGITS_REPO[0]}@{DIGITS_REPO[1]}\n")
    print(f"the tests find these in {dest} (or point $EDGEKNN_DATA at a folder laid out the same)")
    return 0


def digits_digest(folder: Path) -> str:
    """The sha256 over ``<sha256>  ./<digit>/<file>`` lines sorted by path: ``find . -type f | LC_ALL=C sort
    | xargs sha256sum | sha256sum`` in the folder (README.md excluded); "" when there is no folder."""
    if not folder.is_dir():
        return ""
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"),
        key=lambda p: os.fsencode(p.relative_to(folder)),
    )
    lines = "".join(f"{sha256_of(p)}  ./{p.relative_to(folder)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def fetch_digits(folder: Path) -> None:
    """The digits' archive unpacked beside ``folder`` (only ``Dataset/<digit>/*``), checked, renamed in."""
    import urllib.request

    url = digits_url()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".digits-") as tmp:
        archive, unpacked = Path(tmp) / "archive.tar.gz", Path(tmp) / "digits"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 16)
        except (OSError, ValueError) as e:
            raise InputError(f"{url}: download failed ({getattr(e, 'reason', None) or e})") from None
        try:
            _unpack_digits(archive, unpacked)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise InputError(f"{url}: not a readable archive ({e})") from None
        got = digits_digest(unpacked)
        if got != DIGITS_SHA256:
            raise InputError(f"{url}: checksum mismatch: expected photos sha256 {DIGITS_SHA256}, got {got}")
        if folder.exists():
            shutil.rmtree(folder)
        unpacked.replace(folder)


def _unpack_digits(archive: Path, dest: Path) -> None:
    """Only regular files at ``<top>/Dataset/<digit>/<name>``: nothing else is written, nowhere else."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 4 or parts[1] != "Dataset" or not parts[2].isdigit():
                continue
            if parts[3] in (".", ".."):
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            target = dest / parts[2] / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            with source, open(target, "wb") as f:
                shutil.copyfileobj(source, f)

"""The store's file: a plain ``.npz`` with a format version and a checksum, written atomically.

``write`` puts a temporary file beside the target, fsyncs it, renames it over the target and fsyncs
the folder, so a power cut leaves the old file or the new one, never half of one. ``read`` never
unpickles and checks every array's dtype, shape and size against the file before it allocates
anything (a header claiming 10^8 rows must not cost 572 GiB), then the checksum, the format version,
the model the store was made with, and the contents (widths, label indices, finite rows): a sha256
anyone can recompute proves nothing. It raises ``StoreError`` naming the file and what is wrong.

Pictures (each example's JPEG) are files of their own in ``<store>.pictures/<id>.jpg`` (that folder's
files are ``pictures``'): a save writes only the pictures not yet there, each atomically and before the
store file, and removes the pictures of examples the store no longer has only after it. The store file
records each picture's size and crc32, so a lost or damaged picture costs that example its picture,
never the store. Format 1 files (before pictures and per-example times) still load.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import io
import logging
import math
import os
import stat
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np

from edgeknn.store.examples import MAX_TIME
from edgeknn.store.names import class_name_error
from edgeknn.store.pictures import pictures_dir, remove_pictures_except, write_pictures
from edgeknn.store.rows import Picked

Arrays = Mapping[str, "np.ndarray | Picked"]  # what a save writes: ``Picked`` rows are not copied

FORMAT_VERSION = 2
CONTENTS_V1 = ("model_id", "storage", "classes", "rows", "scale", "labels", "example", "center", "seen")
PER_EXAMPLE = ("examples", "added", "picture_size", "picture_crc")  # one entry per example, by id
CONTENTS = (*CONTENTS_V1, "next_example", *PER_EXAMPLE)
MEMBERS = frozenset(f"{name}.npy" for name in ("format_version", *CONTENTS, "checksum"))
MEMBERS_V1 = frozenset(f"{name}.npy" for name in ("format_version", *CONTENTS_V1, "checksum"))
# What each array must be: dtype kinds and number of dimensions (rows: float32 or uint8, checked apart)
_KINDS = {
    "format_version": ("iu", 0),
    "checksum": ("U", 0),
    "model_id": ("U", 0),
    "storage": ("U", 0),
    "classes": ("U", 1),
    "rows": ("fu", 2),
    "scale": ("f", 1),
    "labels": ("iu", 1),
    "example": ("iu", 1),
    "center": ("f", 1),
    "seen": ("iu", 0),
    "next_example": ("iu", 0),
    "examples": ("iu", 1),
    "added": ("f", 1),
    "picture_size": ("iu", 1),
    "picture_crc": ("iu", 1),
}
log = logging.getLogger(__name__)
_FINITE_CHUNK = 4096  # rows checked for NaN/inf at a time (a small temporary, not one of all rows)


class StoreError(Exception):
    """A store file cannot be used; ``corrupt`` tells whether moving it aside is the remedy."""

    def __init__(self, message: str, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt


class ModelMismatch(StoreError):
    """The store was made with another model (``model_id``): re-embedding can rebuild it from pictures."""

    def __init__(self, message: str, model_id: str):
        super().__init__(message)
        self.model_id = model_id


class _Damaged(Exception):
    """What is inconsistent in a store file (``read`` adds the path and raises ``StoreError``)."""


def write(path: Path, arrays: Arrays, pictures: Mapping[int, bytes] | None = None) -> None:
    """Write a store's ``CONTENTS`` atomically: a temporary file beside ``path``, fsync, rename,
    fsync the folder; then remove the temporary files of writers killed mid-save.

    ``pictures`` (example id: JPEG) are written first, each atomically (a file that already holds the
    same bytes is left alone); after the store file, the pictures of examples it does not list go."""
    if set(arrays) != set(CONTENTS):
        raise ValueError(f"a store file holds {', '.join(CONTENTS)}; got {', '.join(arrays)}")
    folder = pictures_dir(path)
    if pictures:
        write_pictures(folder, pictures)
    arrays = {"format_version": np.array(FORMAT_VERSION), **arrays}
    arrays["checksum"] = np.array(_checksum(arrays))
    examples, picture_size = arrays["examples"], arrays["picture_size"]
    assert isinstance(examples, np.ndarray) and isinstance(picture_size, np.ndarray)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            _write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _remove_stale_temporaries(path)
    if folder.is_dir():
        keep = examples[picture_size > 0].tolist()
        remove_pictures_except(folder, set(keep))


def read(
    path: Path, model_id: str, room: Callable[[int], int], dim: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A store's ``CONTENTS`` as written for ``model_id`` (with rows of ``dim`` values, when given),
    and its rows in a matrix of ``room(n)`` rows for the n stored ones (``arrays["rows"]`` is its
    first n rows).

    The room is memory the kernel has not handed out yet: it costs nothing until examples fill it,
    and a store taught after loading does not copy all its rows to grow (np.load would read the
    rows into a matrix of exactly their size).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise StoreError(f"{path}: store file not found") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot read store ({e.strerror})") from None
    if not stat.S_ISREG(mode):  # a FIFO would block the open until a writer comes: never open it
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise StoreError(f"{path}: is {kind}, not a store file; check store.path")
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            with zipfile.ZipFile(file) as archive:
                return _read_archive(path, archive, size, model_id, room, dim)
    except StoreError:
        raise
    except PermissionError as e:
        raise StoreError(f"{path}: cannot read store ({e.strerror})") from None
    except _Damaged as e:
        raise StoreError(f"{path}: {e}", corrupt=True) from None
    except zipfile.BadZipFile as e:
        if not zipfile.is_zipfile(path):
            raise StoreError(f"{path}: not a readable store (not an .npz file)", corrupt=True) from None
        raise StoreError(f"{path}: not a readable store (BadZipFile: {e})", corrupt=True) from None
    except (OSError, EOFError, ValueError, KeyError) as e:
        raise StoreError(f"{path}: not a readable store ({type(e).__name__}: {e})", corrupt=True) from None


def _read_archive(
    path: Path,
    archive: zipfile.ZipFile,
    size: int,
    model_id: str,
    room: Callable[[int], int],
    dim: int | None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``read`` of an open zip: headers first, then the small arrays, then the rows, then the contents."""
    names = archive.namelist()
    if set(names) not in (MEMBERS, MEMBERS_V1):
        found = sorted(name.removesuffix(".npy") for name in set(names))
        raise StoreError(f"{path}: not an edgeknn store (arrays {found})", corrupt=True)
    if len(names) != len(set(names)):
        raise _Damaged("an array is in the file twice")
    headers = {name.removesuffix(".npy"): _header(archive, name, size) for name in names}
    n, width = headers["rows"][0]
    for name, length in (("scale", n), ("labels", n), ("example", n), ("center", width)):
        if headers[name][0] != (length,):
            raise _Damaged(f"{name} has shape {headers[name][0]}, the rows are {(n, width)}")
    if "examples" in headers:
        (m,) = headers["examples"][0]
        if m > n or any(headers[name][0] != (m,) for name in PER_EXAMPLE):
            raise _Damaged(f"per-example arrays of {[headers[k][0] for k in PER_EXAMPLE]}, for {n} rows")
    arrays = {name: _array(archive, name) for name in headers if name != "rows"}
    storage = str(arrays["storage"])
    if storage not in ("float32", "uint8") or headers["rows"][1] != np.dtype(storage):
        raise _Damaged(f"rows are {headers['rows'][1]}, storage says {storage!r}")
    matrix = _read_rows(archive, n, width, headers["rows"][1], headers["rows"][2], room)  # sizes checked
    arrays["rows"] = matrix[:n]
    checksum = str(arrays.pop("checksum"))
    if _checksum(arrays) != checksum:
        raise StoreError(f"{path}: checksum mismatch, the file is damaged", corrupt=True)
    version = int(arrays.pop("format_version"))
    if version not in (1, FORMAT_VERSION):
        raise StoreError(f"{path}: store format {version}, expected {FORMAT_VERSION}")
    if (version == 1) != (set(names) == MEMBERS_V1):
        raise _Damaged(f"store format {version} with the arrays of the other format")
    if str(arrays["model_id"]) != model_id:
        raise ModelMismatch(
            f"{path}: store was made with model {str(arrays['model_id'])[:12]}, "
            f"not the configured model {model_id[:12]}; move it aside or configure that model",
            str(arrays["model_id"]),
        )
    if version == 1:
        arrays.update(_examples_of_v1(arrays["example"], os.stat(path).st_mtime))
    _repair_times(path, arrays)
    _check_contents(arrays, dim)
    return arrays, matrix


def _examples_of_v1(example: np.ndarray, mtime: float) -> dict[str, np.ndarray]:
    """What a format 1 file did not keep: its examples were added by the file's time, none has a picture."""
    ids = np.unique(example).astype(np.int64)
    return {
        "next_example": np.array(int(ids[-1]) + 1 if len(ids) else 0, np.int64),
        "examples": ids,
        "added": np.full(len(ids), mtime, np.float64),
        "picture_size": np.zeros(len(ids), np.int64),
        "picture_crc": np.zeros(len(ids), np.uint32),
    }


def _header(archive: zipfile.ZipFile, name: str, size: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """The shape and dtype an array member declares and where its data starts, checked against the
    bytes the member really holds (so nothing is allocated for what the file does not contain)."""
    info = archive.getinfo(name)
    label = name.removesuffix(".npy")
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
        raise _Damaged(f"{label}: a compressed array (a store is never compressed)")
    if info.header_offset + info.compress_size > size:
        raise _Damaged(f"{label}: claims {info.file_size} bytes, more than the file holds")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        start = f.tell()
    if dtype.hasobject:  # never unpickled
        raise _Damaged("store holds pickled objects, refused")
    kinds, ndim = _KINDS[label]
    if dtype.kind not in kinds or len(shape) != ndim or (fortran_order and ndim > 1):
        raise _Damaged(f"{label} is {dtype} of shape {shape}, not what a store holds")
    if label == "rows" and dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
        raise _Damaged(f"rows are {dtype}, expected float32 or uint8")
    if any(d < 0 for d in shape):
        raise _Damaged(f"{label} has a negative size {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if expected != info.file_size - start:
        raise _Damaged(
            f"{label} claims {shape} of {dtype} ({expected} bytes) but holds {info.file_size - start}"
        )
    return shape, dtype, start


def _array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """A small array member whose header ``_header`` checked (so its size is what the file holds)."""
    return np.load(io.BytesIO(archive.read(f"{name}.npy")), allow_pickle=False)


def _read_rows(
    archive: zipfile.ZipFile,
    n: int,
    width: int,
    dtype: np.dtype,
    start: int,
    room: Callable[[int], int],
) -> np.ndarray:
    """The n stored rows read into a matrix of ``room(n)`` rows (``_header`` checked their size)."""
    matrix = np.empty((room(n), width), dtype)
    with archive.open("rows.npy") as f:
        assert isinstance(f, io.BufferedIOBase)  # a ZipExtFile: it reads into a buffer
        f.read(start)
        data = matrix.reshape(-1)[: n * width].view(np.uint8).data
        for begin in range(0, len(data), 1 << 20):  # in 1 MB pieces: readinto would read a copy of all
            piece = data[begin : begin + (1 << 20)]
            if f.readinto(piece) != len(piece):
                raise EOFError("the rows are cut short")
    return matrix


def _repair_times(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Times of adding outside 1970..9999 (an import before they were checked took ``1e300``, which
    broke every listing of the examples) become the file's time: one warning, and no example lost."""
    added = arrays["added"]
    bad = ~((added >= 0) & (added <= MAX_TIME))  # (NaN compares False: bad too)
    if bad.any():
        log.warning("%s: %d examples had a time of adding out of range; now the file's", path, bad.sum())
        arrays["added"] = np.where(bad, os.stat(path).st_mtime, added)


def _check_contents(arrays: dict[str, np.ndarray], dim: int | None) -> None:
    """What a checksum cannot vouch for: widths, label indices, counts and finite values."""
    rows, classes, labels, example = arrays["rows"], arrays["classes"], arrays["labels"], arrays["example"]
    if dim is not None and rows.shape[1] != dim:
        raise _Damaged(f"rows of {rows.shape[1]} values, the model makes {dim}")
    if len(set(classes.tolist())) != len(classes):
        raise _Damaged("a class name is in the class list twice")
    for name in classes.tolist():  # a checksum anyone can recompute vouches for no name
        problem = class_name_error(name)
        if problem:
            raise _Damaged(f"class {name[:40]!r} breaks the naming rule ({problem})")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise _Damaged(f"a label index past the class list ({len(classes)} classes)")
    if len(example) and example.min() < 0:
        raise _Damaged("a negative example number")
    if int(arrays["seen"]) < 0:
        raise _Damaged("a negative count of seen frames")
    ids = arrays["examples"]
    if not np.array_equal(ids, np.unique(example)):  # (np.unique: sorted, each id once)
        raise _Damaged("the list of examples does not match the examples of the rows")
    if len(ids) and int(arrays["next_example"]) <= int(ids[-1]):
        raise _Damaged("the next example id is one already used")
    size = arrays["picture_size"]
    crc = arrays["picture_crc"]
    if len(size) and (size.min() < 0 or crc.min() < 0 or crc.max() >= 1 << 32):
        raise _Damaged("a negative picture size or a picture checksum out of range")
    finite = np.isfinite(arrays["scale"]).all() and np.isfinite(arrays["center"]).all()
    if rows.dtype.kind == "f":
        finite = finite and all(
            np.isfinite(rows[i : i + _FINITE_CHUNK]).all() for i in range(0, len(rows), _FINITE_CHUNK)
        )
    if not finite:
        raise _Damaged("rows that are not finite numbers (NaN or infinity)")


_MAGIC = (  # files a store path may point at by mistake: never moved aside as a damaged store
    (b"\x93NUMPY", "a .npy array"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"\x7fELF", "a program"),
    (b"\x1f\x8b", "a gzip file"),
    (b"SQLite format 3\x00", "an SQLite database"),
)


def foreign_kind(path: Path) -> str | None:
    """What the regular file at ``path`` recognisably is when it is not a store ("a text file", "a
    TFLite model", "a zip archive without a store in it"), so that a mistake in ``store.path`` never
    renames the config or the model; None when it is, or may be, a (damaged) store.

    A store is a zip whose members are the store's arrays: the central directory says so, or, when
    the file is cut short, the name in the first local header (``write`` puts format_version first).
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head:
        return None  # an empty file: a store cut to nothing (moving it aside loses nothing)
    if head[4:8] == b"TFL3":  # before the zip test: a model's metadata is a zip appended to it
        return "a TFLite model"
    if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path):
        names: set[str] = set()
        with contextlib.suppress(zipfile.BadZipFile, OSError, ValueError), zipfile.ZipFile(path) as archive:
            names.update(archive.namelist())
        if head.startswith(b"PK\x03\x04") and len(head) >= 30:
            first = head[30 : 30 + int.from_bytes(head[26:28], "little")].decode("utf-8", "replace")
            if first and any(member.startswith(first) for member in MEMBERS):  # (the file may end in it)
                return None
        return None if names & MEMBERS else "a zip archive without a store in it"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if b"\x00" not in head:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            return None
        return "a text file"
    return None


def model_id_of(path: Path) -> str:
    """The model identity a store file says it was made with; "" when it cannot tell (``read`` then
    says what is wrong). Reads only that array, and never opens what is not a regular file."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return ""
        with zipfile.ZipFile(path) as archive:
            _header(archive, "model_id.npy", os.stat(path).st_size)
            return str(_array(archive, "model_id"))
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, EOFError, _Damaged):
        return ""


def _write_npz(file: IO[bytes], arrays: Arrays) -> None:
    """What ``np.savez`` writes, without its copies: it hands the zip each array in 16 MB
    ``tobytes()`` pieces, which cost a 10 000-row store 16 MB more memory at every autosave."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False}
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, {**header, "shape": array.shape})
                for piece in _pieces(array):
                    member.write(piece)


def _pieces(array: np.ndarray | Picked) -> Iterator[memoryview]:
    """The bytes of an array (or of picked rows, a few MB at a time) as ``tobytes()`` gives them."""
    for part in array.chunks() if isinstance(array, Picked) else [array]:
        part = part if part.flags.c_contiguous else part.copy()  # 0-d arrays stay 0-d
        yield part.reshape(-1).view(np.uint8).data


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of writers killed mid-save (a power cut), so they cannot pile up.

    A temporary file is named after its writer's pid; one whose process is still alive is left alone.
    """
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):  # the save itself succeeded; a leftover is only untidy
                tmp.unlink()
        except OSError:
            pass  # alive (another user's process), or cannot tell: keep it


def _checksum(arrays: Arrays) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        a = a if isinstance(a, Picked) else np.ascontiguousarray(a)  # 0-d arrays hash as 1-d, as always
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        for piece in _pieces(a):
            h.update(piece)  # the bytes of tobytes(), without a copy of them
    return h.hexdigest()

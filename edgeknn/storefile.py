"""The store's file: a plain ``.npz`` with a format version and a checksum, written atomically.

``write`` puts a temporary file beside the target, fsyncs it, renames it over the target and fsyncs
the folder, so a power cut leaves the old file or the new one, never half of one. ``read`` never
unpickles, checks the arrays, the checksum, the format version and the model the store was made
with, and raises ``StoreError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

FORMAT_VERSION = 1
CONTENTS = ("model_id", "storage", "classes", "rows", "scale", "labels", "example", "center", "seen")


class StoreError(Exception):
    """A store file cannot be used; ``corrupt`` tells whether moving it aside is the remedy."""

    def __init__(self, message: str, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt


def write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a store's ``CONTENTS`` atomically: a temporary file beside ``path``, fsync, rename,
    fsync the folder; then remove the temporary files of writers killed mid-save."""
    if set(arrays) != set(CONTENTS):
        raise ValueError(f"a store file holds {', '.join(CONTENTS)}; got {', '.join(arrays)}")
    arrays = {"format_version": np.array(FORMAT_VERSION), **arrays}
    arrays["checksum"] = np.array(_checksum(arrays))
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


def read(path: Path, model_id: str, room: Callable[[int], int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A store's ``CONTENTS`` as written for ``model_id``, and its rows in a matrix of ``room(n)``
    rows for the n stored ones (``arrays["rows"]`` is its first n rows).

    The room is memory the kernel has not handed out yet: it costs nothing until examples fill it,
    and a store taught after loading does not copy all its rows to grow (np.load would read the
    rows into a matrix of exactly their size).
    """
    matrix = None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files if name != "rows"}
            if "rows" in f.files:
                matrix, n = _read_rows(f.zip, room)
                arrays["rows"] = matrix[:n]
    except FileNotFoundError:
        raise StoreError(f"{path}: store file not found") from None
    except PermissionError as e:
        raise StoreError(f"{path}: cannot read store ({e.strerror})") from None
    except ValueError as e:
        if not zipfile.is_zipfile(path):  # numpy takes any file that is not .npz/.npy for a pickle
            raise StoreError(f"{path}: not a readable store (not an .npz file)", corrupt=True) from None
        if "pickle" in str(e):
            raise StoreError(f"{path}: store holds pickled objects, refused", corrupt=True) from None
        raise StoreError(f"{path}: not a readable store ({e})", corrupt=True) from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise StoreError(f"{path}: not a readable store ({type(e).__name__}: {e})", corrupt=True) from None
    if set(arrays) != {"format_version", *CONTENTS, "checksum"} or matrix is None:
        raise StoreError(f"{path}: not an edgeknn store (arrays {sorted(arrays)})", corrupt=True)
    checksum = str(arrays.pop("checksum"))
    if _checksum(arrays) != checksum:
        raise StoreError(f"{path}: checksum mismatch, the file is damaged", corrupt=True)
    version = int(arrays.pop("format_version"))
    if version != FORMAT_VERSION:
        raise StoreError(f"{path}: store format {version}, expected {FORMAT_VERSION}")
    if str(arrays["model_id"]) != model_id:
        raise StoreError(
            f"{path}: store was made with model {str(arrays['model_id'])[:12]}, "
            f"not the configured model {model_id[:12]}; move it aside or configure that model"
        )
    return arrays, matrix


def _write_npz(file: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes, without its copies: it hands the zip each array in 16 MB
    ``tobytes()`` pieces, which cost a 10 000-row store 16 MB more memory at every autosave."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            array = array if array.flags.c_contiguous else array.copy()  # 0-d arrays stay 0-d
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
                member.write(array.reshape(-1).view(np.uint8).data)


def _read_rows(archive: zipfile.ZipFile, room: Callable[[int], int]) -> tuple[np.ndarray, int]:
    """The stored rows read into a matrix of ``room(n)`` rows, and their number n."""
    with archive.open("rows.npy") as f:
        assert isinstance(f, io.BufferedIOBase)  # a ZipExtFile: it reads into a buffer
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:  # never unpickled: the message makes read() say so
            raise ValueError("the rows hold pickled objects")
        if len(shape) != 2 or fortran_order or dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
            raise ValueError(f"rows are {dtype} {shape}, expected a float32 or uint8 matrix")
        n = shape[0]
        matrix = np.empty((room(n), shape[1]), dtype)
        data = matrix.reshape(-1)[: n * shape[1]].view(np.uint8).data
        for start in range(0, len(data), 1 << 20):  # in 1 MB pieces: readinto would read a copy of all
            piece = data[start : start + (1 << 20)]
            if f.readinto(piece) != len(piece):
                raise EOFError("the rows are cut short")
    return matrix, n


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


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8).data)  # the bytes of tobytes(), without a copy of them
    return h.hexdigest()

"""The examples archive: a store's examples as one stream (`edgeknn store export`, the page's download
and upload, and the fleet's packs over MQTT), written and read with bounded memory, never random access.

A plain uncompressed tar (ustar), because the standard library writes and reads it as a stream
(``tarfile`` modes ``w|`` and ``r|``), any tool can list it (``tar tvf``), and its members are bytes as
they are: rows and JPEGs, not numbers as JSON text or base64. Its members, in this order and no other:

``manifest.json``
    ``{"format": "edgeknn-archive", "version": 1, "model_id", "dim", "dtype", "classes": [...] (in slot
    order), "examples": [{"id", "class", "added", "views", "picture": null | {"size", "crc32"}}, ...]}``.
``examples/<id>.rows``, then ``examples/<id>.jpg`` (if it has a picture), for each example in order
    Its ``views`` rows of ``dim`` values as raw little-endian ``float32`` or ``float16``; or ``uint8``
    followed by each row's scale (``float32``), the store's own uint8 storage. ``float32`` and ``uint8``
    are the store's storages, so a round trip is exact; ``float16`` halves a float32 store's rows.

The manifest comes first so that a reader checks everything it can (the model, every name, id and
time) before any data, and knows each member's exact size; a follower of a pack knows what it will get.
The writer (``write``) is deterministic (times and owners of the tar headers are 0): the same examples
make the same bytes. The reader (``Reader``) checks as it reads and raises ``ArchiveError`` (one line
naming the culprit) on the first problem: any other member or member type, a member out of order or of
the wrong size, a picture that is not the JPEG the manifest describes, rows that are not finite, a
truncated archive, more than its caps. Whoever applies an archive reads it whole first (a fleet's pack:
gathered beside the store, ``staged.py``): all or nothing.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

import numpy as np

from edgeknn.store.examples import time_error
from edgeknn.store.names import class_name_error
from edgeknn.store.pictures import MAX_PICTURE_BYTES

FORMAT = "edgeknn-archive"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16", "uint8")
MAX_MANIFEST_BYTES = 16 << 20  # ~100 000 examples' entries
MAX_EXAMPLES = 100_000  # a store of max_classes (at most 1000) x capacity: a reader may ask for less
MAX_VIEWS = 64  # rows per example (the daemon adds 6, or 1)
MAX_DIM = 16_384
MAX_CLASSES = 1000  # config's bound of store.max_classes
MAX_ID = (1 << 53) - 1  # an id JSON carries exactly
_JPEG = b"\xff\xd8"


class Sink(Protocol):
    """Where an archive is written: a binary file, a socket's writer, an MQTT pack's chunker."""

    def write(self, data: bytes, /) -> int | None: ...


class ArchiveError(ValueError):
    """An archive that cannot be used (or written): one line naming the culprit."""


@dataclass(frozen=True)
class Entry:
    """One example in the manifest: ``picture`` is (size, crc32) of its JPEG, or None."""

    id: int
    class_name: str
    added: float
    views: int
    picture: tuple[int, int] | None

    def rows_size(self, dim: int, dtype: str) -> int:
        """The exact size of its ``.rows`` member."""
        return self.views * dim_bytes(dim, dtype)


@dataclass(frozen=True)
class Manifest:
    model_id: str
    dim: int
    dtype: str
    classes: list[str]  # in slot order, those without examples too
    examples: list[Entry]

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "model_id": self.model_id,
                "dim": self.dim,
                "dtype": self.dtype,
                "classes": self.classes,
                "examples": [
                    {
                        "id": e.id,
                        "class": e.class_name,
                        "added": e.added,
                        "views": e.views,
                        "picture": e.picture and {"size": e.picture[0], "crc32": e.picture[1]},
                    }
                    for e in self.examples
                ],
            },
            separators=(",", ":"),
        ).encode()


@dataclass(frozen=True)
class Example:
    """One example as read: ``values`` (views, dim) in the archive's dtype, ``scale`` per row for uint8."""

    entry: Entry
    values: np.ndarray
    scale: np.ndarray | None
    picture: bytes | None

    def vectors(self) -> np.ndarray:
        """Its rows as float32 (uint8 ones scaled back), as ``KnnStore.add`` takes them."""
        if self.scale is None:
            return self.values.astype(np.float32)
        return self.values.astype(np.float32) * self.scale[:, None]


def dim_bytes(dim: int, dtype: str) -> int:
    """The bytes one row takes in a ``.rows`` member."""
    return dim * 4 if dtype == "float32" else dim * 2 if dtype == "float16" else dim + 4


def encode_rows(values: np.ndarray, scale: np.ndarray | None, dtype: str) -> bytes:
    """An example's ``.rows`` member: rows (float32, or uint8 with their ``scale``) in ``dtype``."""
    if dtype == "uint8":
        if values.dtype != np.uint8 or scale is None:
            raise ArchiveError("uint8 rows are written from a uint8 store (with its scales)")
        return values.tobytes() + np.asarray(scale, "<f4").tobytes()
    rows = values.astype(np.float32) * scale[:, None] if scale is not None else values
    return np.ascontiguousarray(rows, "<f4" if dtype == "float32" else "<f2").tobytes()


def decode_rows(data: bytes, entry: Entry, dim: int, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A ``.rows`` member (its size checked) as (values, scale or None); ArchiveError when not finite."""
    if dtype == "uint8":
        cut = entry.views * dim
        values = np.frombuffer(data, np.uint8, cut).reshape(entry.views, dim)
        scales = np.frombuffer(data, "<f4", entry.views, cut).astype(np.float32)
        finite, scale = bool(np.isfinite(scales).all() and (scales > 0).all()), scales
    else:
        values = np.frombuffer(data, "<f4" if dtype == "float32" else "<f2").reshape(entry.views, dim)
        values, scale = values.astype(values.dtype.newbyteorder("="), copy=False), None
        finite = bool(np.isfinite(values).all())
    if not finite:
        raise ArchiveError(f"example {entry.id}: rows that are not finite numbers (NaN or infinity)")
    return values, scale


# --- writing -------------------------------------------------------------------------------------------


def write(out: Sink, manifest: Manifest, payloads: Iterable[tuple[bytes, bytes | None]]) -> None:
    """Write the archive of ``manifest`` to ``out`` as a stream: ``payloads`` gives, in the manifest's
    order, each example's ``.rows`` bytes (``encode_rows``) and its JPEG (None when it has none).

    Memory: one example at a time, and tarfile's 10 KB buffer. ArchiveError (the stream is then cut
    short, which a reader refuses) when a payload is not what the manifest says."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
        _add(tar, MANIFEST, manifest.to_json())
        count = 0
        for entry, (rows, picture) in zip(manifest.examples, payloads, strict=False):
            count += 1
            if len(rows) != entry.rows_size(manifest.dim, manifest.dtype):
                raise ArchiveError(f"example {entry.id}: {len(rows)} bytes of rows, not the manifest's")
            _add(tar, f"examples/{entry.id}.rows", rows)
            if (picture is None) != (entry.picture is None) or (
                picture is not None and (len(picture), zlib.crc32(picture)) != entry.picture
            ):
                raise ArchiveError(f"example {entry.id}: its picture changed or is gone since the manifest")
            if picture is not None:
                _add(tar, f"examples/{entry.id}.jpg", picture)
        if count != len(manifest.examples):
            raise ArchiveError(f"{count} examples written, the manifest lists {len(manifest.examples)}")


def size(manifest: Manifest) -> int:
    """The exact size of ``write``'s archive of ``manifest``, known before a byte of it is written (a
    download's Content-Length: a client then notices a stream cut short)."""

    def member(n: int) -> int:  # a header block, the data padded to whole blocks
        return tarfile.BLOCKSIZE + -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE

    total = member(len(manifest.to_json())) + 2 * tarfile.BLOCKSIZE  # the end: two empty blocks
    for e in manifest.examples:
        total += member(e.rows_size(manifest.dim, manifest.dtype))
        total += member(e.picture[0]) if e.picture is not None else 0
    return -(-total // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


# --- reading -------------------------------------------------------------------------------------------


class _Strict(tarfile.TarInfo):
    """Refuses, before tarfile reads their data, the members an archive never holds: pax and GNU long-name
    headers (read whole into memory by tarfile), links, folders, devices. ``_proc_member`` is the hook
    tarfile documents for subclasses."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise ArchiveError(f"{self.name!r}: not a plain file (tar type {self.type!r})")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class _Capped(io.RawIOBase):
    """The stream the reader reads, refused past ``limit`` bytes (a body that never ends)."""

    def __init__(self, stream: IO[bytes], limit: int):
        self._stream, self._left, self.limit = stream, limit, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(min(len(buffer), self._left + 1))
        if len(data) > self._left:
            raise ArchiveError(f"larger than {self.limit} bytes, the most an archive may be")
        self._left -= len(data)
        buffer[: len(data)] = data
        return len(data)


class Reader:
    """Reads an archive from ``stream`` as it comes: ``manifest`` (read and checked at once), then
    ``examples()`` yields each example, checked. ``dim``: the rows the reader expects; ``max_examples``
    and ``max_bytes``: its caps. Every problem is an ArchiveError of one line."""

    def __init__(
        self,
        stream: IO[bytes],
        *,
        dim: int | None = None,
        max_examples: int = MAX_EXAMPLES,
        max_bytes: int = 1 << 40,
    ):
        self._tar = _open(_Capped(stream, max_bytes))
        self._members = iter(self._tar)
        data = self._member(MANIFEST, MAX_MANIFEST_BYTES)
        self.manifest = parse_manifest(data, dim, max_examples)

    def examples(self) -> Iterator[Example]:
        m = self.manifest
        for entry in m.examples:
            rows = self._member(f"examples/{entry.id}.rows", entry.rows_size(m.dim, m.dtype), exact=True)
            values, scale = decode_rows(rows, entry, m.dim, m.dtype)
            picture = None
            if entry.picture is not None:
                picture = self._member(f"examples/{entry.id}.jpg", entry.picture[0], exact=True)
                if not picture.startswith(_JPEG) or zlib.crc32(picture) != entry.picture[1]:
                    raise ArchiveError(f"examples/{entry.id}.jpg: not the JPEG the manifest describes")
            yield Example(entry, values, scale, picture)
        extra = _guard(lambda: next(self._members, None))
        if extra is not None:
            raise ArchiveError(f"{extra.name!r}: a member after the last example")

    def _member(self, name: str, size: int, exact: bool = False) -> bytes:
        """The next member, which must be ``name`` of at most (``exact``: exactly) ``size`` bytes."""
        info = _guard(lambda: next(self._members, None))
        if info is None and name == MANIFEST:
            raise ArchiveError(f"not an edgeknn archive (no {MANIFEST})")
        if info is None:
            raise ArchiveError(f"cut short: {name} is missing")
        if info.name != name:
            raise ArchiveError(f"{info.name!r}: unexpected member (expected {name})")
        if info.size > size or (exact and info.size != size):
            raise ArchiveError(f"{name}: {info.size} bytes, expected {'' if exact else 'at most '}{size}")
        file = self._tar.extractfile(info)
        assert file is not None  # a regular file (_Strict)
        data = _guard(lambda: file.read(info.size))
        if len(data) != info.size:
            raise ArchiveError(f"cut short in {name}")
        return data


def _open(stream: Any) -> tarfile.TarFile:
    return _guard(lambda: tarfile.open(fileobj=stream, mode="r|", tarinfo=_Strict), opening=True)  # type: ignore[call-overload]


def _guard(call: Any, opening: bool = False) -> Any:
    """``call()`` with tarfile's and the stream's errors as one-line ArchiveErrors."""
    try:
        return call()
    except ArchiveError:
        raise
    except tarfile.ReadError as e:
        if opening:
            raise ArchiveError(f"not an edgeknn archive (not a tar stream: {e})") from None
        raise ArchiveError(f"cut short or damaged ({e})") from None
    except (tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"cut short or damaged ({type(e).__name__}: {e})") from None


def parse_manifest(data: bytes, dim: int | None = None, max_examples: int = MAX_EXAMPLES) -> Manifest:
    """The manifest's JSON, every field checked (ArchiveError names the first that is wrong)."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ArchiveError(f"{MANIFEST}: not JSON ({type(e).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArchiveError(f'not an edgeknn archive ({MANIFEST} has no "format": "{FORMAT}")')
    if raw.get("version") != VERSION:
        raise ArchiveError(f"archive version {raw.get('version')!r}: this edgeknn reads version {VERSION}")
    model_id, width, dtype = raw.get("model_id"), raw.get("dim"), raw.get("dtype")
    if not isinstance(model_id, str) or not 0 < len(model_id) <= 200:
        raise ArchiveError(f"model_id: expected the model's identity, got {str(model_id)[:40]!r}")
    if not _integer(width, 1, MAX_DIM):
        raise ArchiveError(f"dim: expected an integer 1..{MAX_DIM}, got {width!r}")
    if dim is not None and width != dim:
        raise ArchiveError(f"rows of {width} values, this device's model makes {dim}")
    if dtype not in DTYPES:
        raise ArchiveError(f"dtype: expected one of {', '.join(DTYPES)}, got {str(dtype)[:20]!r}")
    classes, items = raw.get("classes"), raw.get("examples")
    if not isinstance(classes, list) or len(classes) > MAX_CLASSES:
        raise ArchiveError(f"classes: expected a list of at most {MAX_CLASSES} class names")
    for name in classes:
        problem = class_name_error(name)
        if problem:
            raise ArchiveError(f"class {str(name)[:40]!r}: {problem}")
    if len(set(classes)) != len(classes):
        raise ArchiveError("classes: a class is listed twice")
    if not isinstance(items, list) or len(items) > max_examples:
        raise ArchiveError(f"examples: expected a list of at most {max_examples} examples")
    known, seen = set(classes), set()
    examples = [_entry(item, known) for item in items]
    for entry in examples:
        if entry.id in seen:
            raise ArchiveError(f"example {entry.id}: listed twice")
        seen.add(entry.id)
    return Manifest(model_id, int(width), dtype, list(classes), examples)  # type: ignore[arg-type]


def _entry(item: Any, classes: set[str]) -> Entry:
    if not isinstance(item, dict):
        raise ArchiveError("examples: an example is not an object")
    example = item.get("id")
    if not _integer(example, 0, MAX_ID):
        raise ArchiveError(f"example id: expected an integer 0..{MAX_ID}, got {str(example)[:40]!r}")
    name, added, views, picture = item.get("class"), item.get("added"), item.get("views"), item.get("picture")
    if name not in classes:
        raise ArchiveError(f"example {example}: class {str(name)[:40]!r} is not in the classes")
    problem = time_error(added)
    if problem:
        raise ArchiveError(f"example {example}: added: {problem}")
    if not _integer(views, 1, MAX_VIEWS):
        raise ArchiveError(f"example {example}: views: expected an integer 1..{MAX_VIEWS}, got {views!r}")
    kept = None
    if picture is not None:
        size, crc = (picture.get("size"), picture.get("crc32")) if isinstance(picture, dict) else (None, None)
        if not _integer(size, 3, MAX_PICTURE_BYTES) or not _integer(crc, 0, (1 << 32) - 1):
            raise ArchiveError(
                f"example {example}: picture: expected null or a size 3..{MAX_PICTURE_BYTES} and a crc32"
            )
        kept = (int(size), int(crc))  # type: ignore[arg-type]
    return Entry(int(example), name, float(added), int(views), kept)  # type: ignore[arg-type]


def _integer(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

"""A pack: a device's examples archive (``store/archive.py``) cut into chunks, and the manifest that names
one version of them, so that a reader never mixes two versions.

The leader publishes every chunk of a version under ``<base>/fleet/pack/<version>/<n>`` first, then the
retained manifest under ``<base>/fleet/manifest``: a follower that has a manifest can find all of its
chunks. The manifest carries each chunk's sha256 and the whole's, and (with ``fleet.key``) an HMAC-SHA256
over its own canonical bytes; a follower refuses the whole pack on any mismatch and keeps its last good one.
Plain Python: no MQTT here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

FORMAT = "edgeknn-pack"
FORMAT_VERSION = 1
CHUNK_BYTES = 256 * 1024  # well under the device's 8 MiB packet limit and Mosquitto's defaults
MAX_CHUNKS = 65_536
MAX_MANIFEST_BYTES = 4 << 20  # 65 536 chunks' sha256s fit
MAX_CENTER_VALUES = 8192  # a centre as wide as the widest embedding a store takes
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PackError(ValueError):
    """A manifest or a chunk that cannot be used: one line naming the culprit."""


@dataclass(frozen=True)
class Manifest:
    """One version of a device's pack."""

    device: str
    sha256: str  # of the whole archive: the pack's identity
    size: int
    chunk_bytes: int
    chunks: list[str]  # each chunk's sha256, in order
    model_id: str
    classes: list[str]
    examples: int
    published: float
    center: bytes = b""  # the leader's centre (float32, little-endian; ``Head.fitted_center``)
    seen: int = 0  # the frames its running mean had seen

    @property
    def version(self) -> str:
        """The topic level of this version's chunks."""
        return self.sha256[:16]

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "device": self.device,
            "sha256": self.sha256,
            "size": self.size,
            "chunk_bytes": self.chunk_bytes,
            "chunks": self.chunks,
            "model_id": self.model_id,
            "classes": self.classes,
            "examples": self.examples,
            "published": self.published,
            **({"center": base64.b64encode(self.center).decode(), "seen": self.seen} if self.center else {}),
        }

    def to_json(self, key: str = "") -> bytes:
        """The retained manifest's payload, signed when ``key`` is set."""
        body = self.body()
        if key:
            body["hmac"] = _sign(body, key)
        return json.dumps(body, separators=(",", ":")).encode()


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _sign(body: dict[str, Any], key: str) -> str:
    return hmac.new(key.encode(), _canonical(body), hashlib.sha256).hexdigest()


def make(device: str, archive_file: IO[bytes], model_id: str, classes: list[str], examples: int,
         chunk_bytes: int = CHUNK_BYTES,
         center: tuple[np.ndarray, int] | None = None) -> Manifest:  # fmt: skip
    """The manifest of the archive in ``archive_file`` (read from its start, a chunk at a time), with the
    leader's ``center`` (``Head.fitted_center``) when it has one. The centre is not part of the pack's
    identity: a leader whose camera saw more frames publishes no new version for it."""
    archive_file.seek(0)
    whole, chunks, size = hashlib.sha256(), [], 0
    for data in iter(lambda: archive_file.read(chunk_bytes), b""):
        whole.update(data)
        chunks.append(hashlib.sha256(data).hexdigest())
        size += len(data)
    if len(chunks) > MAX_CHUNKS:
        raise PackError(f"the pack would be {len(chunks)} chunks, more than {MAX_CHUNKS}")
    vector, seen = center if center is not None else (np.zeros(0, np.float32), 0)
    return Manifest(
        device, whole.hexdigest(), size, chunk_bytes, chunks, model_id, classes, examples, time.time(),
        vector.astype("<f4").tobytes(), seen,
    )  # fmt: skip


def chunks_of(archive_file: IO[bytes], manifest: Manifest) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of each chunk, read from the file as they are sent."""
    archive_file.seek(0)
    for index in range(len(manifest.chunks)):
        yield index, archive_file.read(manifest.chunk_bytes)


def parse(payload: bytes, key: str = "", max_bytes: int = 256 << 20) -> Manifest:
    """A received manifest, checked whole (PackError naming the field): its sizes within ``max_bytes``, its
    chunk list consistent with its size, and its HMAC when ``key`` is set."""
    if len(payload) > MAX_MANIFEST_BYTES:
        raise PackError(f"manifest: {len(payload)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise PackError("manifest: not JSON") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise PackError(f"manifest: expected format {FORMAT!r}")
    if body.get("format_version") != FORMAT_VERSION:
        raise PackError(
            f"manifest: format_version {str(body.get('format_version'))[:20]!r} is not {FORMAT_VERSION}"
        )
    signature = body.pop("hmac", None)
    if key and not (isinstance(signature, str) and hmac.compare_digest(signature, _sign(body, key))):
        raise PackError("manifest: the HMAC does not check out with fleet.key (another key, or altered)")
    size, chunk, chunks = body.get("size"), body.get("chunk_bytes"), body.get("chunks")
    if not isinstance(size, int) or not 0 < size <= max_bytes:
        raise PackError(f"manifest: size expected 1..{max_bytes} bytes (fleet.max_pack_mb)")
    if not isinstance(chunk, int) or not 1024 <= chunk <= 1 << 20:
        raise PackError("manifest: chunk_bytes expected 1 KiB..1 MiB")
    if not isinstance(chunks, list) or len(chunks) != math.ceil(size / chunk):
        raise PackError("manifest: the chunk list does not match the size")
    if not all(isinstance(c, str) and _HEX64.fullmatch(c) for c in [*chunks, body.get("sha256")]):
        raise PackError("manifest: expected sha256s as 64 hex digits")
    classes, examples = body.get("classes"), body.get("examples")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise PackError("manifest: classes expected a list of names")
    if not isinstance(examples, int) or examples < 0:
        raise PackError("manifest: examples expected a count")
    published = body.get("published")
    if not isinstance(published, int | float) or not math.isfinite(published):
        raise PackError("manifest: published expected a time")
    device, model_id = body.get("device"), body.get("model_id")
    if not isinstance(device, str) or not isinstance(model_id, str):
        raise PackError("manifest: device and model_id expected strings")
    center, seen = _center(body)
    return Manifest(
        device,
        body["sha256"],
        size,
        chunk,
        chunks,
        model_id,
        classes,
        examples,
        float(published),
        center,
        seen,
    )


def _center(body: dict[str, Any]) -> tuple[bytes, int]:
    """The manifest's centre, checked: float32 values, finite, a mean of unit vectors (norm <= 1)."""
    if "center" not in body:
        return b"", 0
    text, seen = body.get("center"), body.get("seen")
    if (
        not isinstance(text, str)
        or len(text) > MAX_CENTER_VALUES * 6
        or not isinstance(seen, int)
        or seen < 1
    ):
        raise PackError("manifest: center expected base64 float32 values and seen a count of frames")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PackError("manifest: center is not base64") from None
    values = np.frombuffer(raw, "<f4") if len(raw) % 4 == 0 else np.zeros(0, np.float32)
    if not 0 < values.size <= MAX_CENTER_VALUES or not np.isfinite(values).all():
        raise PackError("manifest: center expected up to 8192 finite float32 values")
    if float(np.linalg.norm(values)) > 1.001:
        raise PackError("manifest: center is longer than a mean of unit vectors can be")
    return raw, seen


class Assembly:
    """The chunks of one version gathered into a temporary file (never whole in memory), each checked as
    it comes; ``complete`` once every chunk is in, then ``file()`` checks the whole."""

    def __init__(self, manifest: Manifest, folder: Path | None = None):
        self.manifest = manifest
        self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (closed by close())
        self._have: set[int] = set()

    @property
    def complete(self) -> bool:
        return len(self._have) == len(self.manifest.chunks)

    @property
    def received(self) -> int:
        return len(self._have)

    def put(self, index: int, data: bytes) -> None:
        """Take chunk ``index`` (PackError when it is not the chunk the manifest names)."""
        m = self.manifest
        if not 0 <= index < len(m.chunks):
            raise PackError(f"chunk {index}: the manifest has {len(m.chunks)}")
        want = m.chunk_bytes if index < len(m.chunks) - 1 else m.size - m.chunk_bytes * (len(m.chunks) - 1)
        if len(data) != want or hashlib.sha256(data).hexdigest() != m.chunks[index]:
            raise PackError(f"chunk {index}: not the chunk the manifest names ({len(data)} bytes)")
        if index not in self._have:
            self._file.seek(index * m.chunk_bytes)
            self._file.write(data)
            self._have.add(index)

    def file(self) -> IO[bytes]:
        """The whole archive, checked against the manifest's sha256, from its start."""
        whole = hashlib.sha256()
        self._file.seek(0)
        for data in iter(lambda: self._file.read(1 << 20), b""):
            whole.update(data)
        if whole.hexdigest() != self.manifest.sha256:
            raise PackError("the assembled pack does not match the manifest's sha256")
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        self._file.close()

"""Download the default model with a pinned sha256, so a fresh device finds its model by itself."""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

from edgeknn.model import ModelError


def fetch(url: str, sha256: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through a ``.part`` file; keep it only if its sha256 matches."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            for block in iter(lambda: response.read(1 << 16), b""):
                digest.update(block)
                f.write(block)
    except (OSError, ValueError) as e:  # URLError is an OSError; ValueError: a malformed URL
        part.unlink(missing_ok=True)
        raise ModelError(f"{url}: download failed ({getattr(e, 'reason', e)})") from None
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise ModelError(f"{url}: checksum mismatch: expected sha256 {sha256}, got {digest.hexdigest()}")
    part.replace(dest)
    return dest

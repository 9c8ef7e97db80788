"""Snapshots: the newest frame saved as a JPEG in a folder that keeps only the newest ``KEEP`` of them.

Names carry the time to the microsecond (``20261130-221850-123456.jpg``), so they sort in the order
they were taken, and a file is created only if its name is free (a ``-1``, ``-2`` … is added if not), so
no snapshot ever overwrites another. After each one the oldest are deleted beyond ``KEEP``; only files
named as snapshots are, so anything else a person puts in the folder stays.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

KEEP = 100  # snapshots kept in the folder; the oldest go first
QUALITY = 90  # JPEG quality
NAME = re.compile(r"\d{8}-\d{6}(-\d{6})?(-\d+)?\.jpg")  # also the one-second names of earlier versions


def save_snapshot(image: np.ndarray, folder: Path, keep: int = KEEP) -> Path:
    """Write ``image`` (RGB uint8) as a new JPEG in ``folder``, prune the folder, return the file's path.

    Raises OSError (a full disk, a read-only folder); a file that could not be written whole is removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path, n = folder / f"{stamp}.jpg", 0
    while True:
        try:
            file = open(path, "xb")  # noqa: SIM115 (closed below; "x": never overwrite)
            break
        except FileExistsError:
            n += 1
            path = folder / f"{stamp}-{n}.jpg"
    try:
        with file:
            Image.fromarray(np.asarray(image)).save(file, "JPEG", quality=QUALITY)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    prune(folder, keep)
    return path


def prune(folder: Path, keep: int = KEEP) -> None:
    """Delete the oldest snapshots in ``folder`` beyond the newest ``keep``."""
    names = sorted(
        entry.name for entry in os.scandir(folder) if entry.is_file() and NAME.fullmatch(entry.name)
    )
    for name in names[: max(len(names) - keep, 0)]:
        (folder / name).unlink(missing_ok=True)

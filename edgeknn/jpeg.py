"""An example's picture: the model-sized frame it was added from, as a small JPEG.

The store keeps one per added example (``KnnStore.add(..., picture=encode(frame))``), so that
examples can be shown and deleted one by one, and a store can be re-embedded for another model
(``reembed.py``) from what the camera saw rather than from vectors only that model understands.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

BUDGET = 15_000  # bytes per picture: 1000 examples take 15 MB of SD card
QUALITIES = (85, 75, 60, 45, 30)  # tried in turn until a picture fits the budget (224x224: 85 does)


class PictureError(ValueError):
    """A picture that cannot be decoded (a damaged file)."""


def encode(frame: np.ndarray) -> bytes:
    """The JPEG of an RGB uint8 frame (H, W, 3): the best quality of ``QUALITIES`` within ``BUDGET``."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 frame (H, W, 3), got {frame.dtype} {frame.shape}")
    for quality in QUALITIES:
        data = jpeg(frame, quality)
        if len(data) <= BUDGET:
            break
    return data


def jpeg(image: np.ndarray, quality: int) -> bytes:
    """``image`` (RGB uint8) as JPEG bytes: the one encoder of pictures, snapshots and the live view."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def decode(data: bytes) -> np.ndarray:
    """An RGB uint8 array from a picture's JPEG; ``PictureError`` when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return np.asarray(opened.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # truncated or corrupt data: any of Pillow's errors
        raise PictureError(f"cannot decode the picture ({type(e).__name__}: {e})") from None

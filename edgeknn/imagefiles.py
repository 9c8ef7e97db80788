"""Image files: find them in folders and load them as RGB arrays.

Used by the replay camera source and by the command line (teach, classify, eval). Every error is an
``ImageError`` whose one-line message names the file or folder, so a person knows what to fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from edgeknn import smallfiles

MAX_IMAGE_FILE = 256 << 20  # an image file larger than this is not a photo (checked before it is opened)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class ImageError(ValueError):
    """An image file is missing, unreadable or not an image."""


def load_rgb(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Load an image file as an RGB uint8 array (H, W, 3), upright as its EXIF orientation says.

    With ``max_side`` the image is shrunk (aspect kept) so that its longer side is at most
    ``max_side``. JPEGs are then decoded at a reduced scale (``Image.draft``), so a 3024x3024
    phone photo costs about as much as a small one.
    """
    path = Path(path)
    try:
        smallfiles.check(path, os.stat(path), MAX_IMAGE_FILE)  # a FIFO would block the open for ever
        with Image.open(path) as opened:
            if max_side is not None:
                opened.draft("RGB", (max_side, max_side))
            image: Image.Image = ImageOps.exif_transpose(opened)
            if image.mode != "RGB":
                image = image.convert("RGB")
            if max_side is not None and max(image.size) > max_side:
                image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (or not a format Pillow reads)") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except smallfiles.FileRefused as e:
        raise ImageError(str(e)) from None
    except OSError as e:
        if smallfiles.transient(e):  # out of descriptors: not the image's fault; the caller tries again
            raise
        raise ImageError(f"{path}: cannot read the image ({e.strerror or e})") from None
    except Exception as e:  # truncated or corrupt data, decompression bombs, ...
        raise ImageError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


def is_image_file(path: Path) -> bool:
    """True if ``path`` has an image suffix (the file is not opened)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def find_images(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders searched recursively.

    Each folder's images come sorted; files whose suffix is not an image suffix and hidden files
    or folders (such as macOS ``._IMG_1.JPG``) are skipped. A missing path, a named file that is not an image,
    or a folder without images raises ImageError.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            images = sorted(
                p
                for p in path.rglob("*")
                if is_image_file(p) and p.is_file() and not _hidden(p.relative_to(path))
            )
            if not images:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                raise ImageError(f"{path}: no image files in this folder (looked for {suffixes})")
            found.extend(images)
        elif path.is_file():
            if not is_image_file(path):
                raise ImageError(f"{path}: not an image file (expected a suffix like .jpg or .png)")
            found.append(path)
        else:
            raise ImageError(f"{path}: no such file or folder")
    return found

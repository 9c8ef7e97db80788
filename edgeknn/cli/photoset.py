"""The labelled photos an evaluation draws from, embedded once, and the cache that keeps them embedded.

Each photo of ``root/<class>/<image>`` is embedded as a frame (what the device classifies) and as
the six views an added example stores (``Embedder.embed_views``), so that any draw of examples and
queries reuses them. The cache (one ``.npz`` per model and photo list) makes a second run on the
same photos cost no invoke at all: the machine is shared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeknn.imagefiles import ImageError, find_images, load_rgb
from edgeknn.model.embedder import Embedder

VIEWS = 6  # what ``Embedder.embed_views`` makes: the frame, its mirror, its four corners


@dataclass
class Dataset:
    classes: list[str]
    files: list[Path]
    labels: np.ndarray
    vectors: np.ndarray  # (photos, dim): each photo as a frame
    views: np.ndarray  # (photos, VIEWS, dim): what adding it as an example stores (``embed_views``)
    storage: str = "float32"  # the model's embeddings (``Embedder.storage``): what ``auto`` stores


def load_dataset(
    root: Path,
    embedder: Embedder,
    progress: Callable[[int, int], None] | None = None,
    cache: Path | None = None,
) -> Dataset:
    """Embed every photo of ``root/<class>/<image>`` once, as a frame and as an added example's views.

    ``cache``: a folder where the embeddings are kept between runs, one ``.npz`` per model and
    photo list (named by a hash of the model's sha256 and every photo's path, size and time), so
    that a second ``edgeknn eval`` on the same photos invokes the model not at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageError(f"{root}: not a folder of <class>/<image> folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ImageError(f"{root}: expected at least 2 class folders, found {len(classes)}")
    files, labels = [], []
    for i, name in enumerate(classes):
        found = find_images([root / name])
        files += found
        labels += [i] * len(found)
    cached = _cache_file(cache, embedder, root, files) if cache is not None else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return Dataset(classes, files, np.array(labels), z["vectors"], z["views"], embedder.storage)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file: embed again and replace it
    max_side = 2 * max(embedder.model.input_size)
    vectors = np.zeros((len(files), embedder.dim), np.float32)
    views = np.zeros((len(files), VIEWS, embedder.dim), np.float32)
    for j, path in enumerate(files):
        image = load_rgb(path, max_side=max_side)
        vectors[j] = embedder.embed(image)
        views[j] = embedder.embed_views(image)
        if progress:
            progress(j + 1, len(files))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_suffix(".part.npz")
        np.savez(part, vectors=vectors, views=views)
        part.replace(cached)  # atomic: a run stopped halfway leaves no half file behind
    return Dataset(classes, files, np.array(labels), vectors, views, embedder.storage)


def _cache_file(cache: Path, embedder: Embedder, root: Path, files: list[Path]) -> Path:
    """The cache file for these photos embedded by this model (any change to either: another file)."""
    h = hashlib.sha256(f"{embedder.identity}\n{VIEWS}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return Path(cache) / f"{root.name}-{h.hexdigest()[:16]}.npz"


def only(data: Dataset, names: list[str]) -> Dataset:
    """The photos of the classes ``names`` only (``eval --classes``: tune on some, report on others)."""
    missing = [n for n in names if n not in data.classes]
    if missing:
        raise ImageError(f"--classes: no class folder {missing[0]!r} (there are {', '.join(data.classes)})")
    keep = np.isin(data.labels, [data.classes.index(n) for n in names])
    relabel = np.array([names.index(c) if c in names else -1 for c in data.classes])
    files = [f for f, k in zip(data.files, keep, strict=True) if k]
    keep_vectors, keep_views = data.vectors[keep], data.views[keep]
    return Dataset(list(names), files, relabel[data.labels[keep]], keep_vectors, keep_views, data.storage)

"""What every part of the bench measures with: the plan, the setup, random stores and the photos."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeknn import config
from edgeknn.imagefiles import find_images, load_rgb
from edgeknn.model.embedder import Embedder
from edgeknn.store.knn import KnnStore, StoreSettings


class BenchError(Exception):
    """The bench cannot go on (the message says why)."""


@dataclass(frozen=True)
class Plan:
    """How much to measure: ``quick`` is for tests (all keys, fewer repetitions)."""

    rounds: int  # interleaved raw / pipeline blocks
    invokes: int  # raw invokes per block
    frames: int  # pipeline frames per block
    queries: int  # k-NN queries per store size
    adds: int  # timed adds per store size
    photos: int  # real photos embedded for the uint8 agreement
    settle_s: float  # how long the subprocess classifies before its VmHWM is read
    quick: bool

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                rounds=2, invokes=20, frames=40, queries=20, adds=50, photos=200, settle_s=1.5, quick=True
            )
        return cls(
            rounds=20, invokes=30, frames=90, queries=200, adds=300, photos=600, settle_s=3.0, quick=False
        )


@dataclass(frozen=True)
class Setup:
    """What every part of the bench measures with."""

    cfg: config.Config
    model: Path
    threads: int
    frames: Path  # the replay folder
    tmp: Path
    broker: tuple[str, int] | None
    plan: Plan

    def daemon_config(self, name: str, store_path: Path, fps: float, **overrides: Any) -> config.Config:
        """The configured daemon on the bench's model, a store, the replay at ``fps`` and the broker."""
        settings: dict[str, Any] = {
            "state_dir": str(self.tmp / f"{name}-state"),
            "model.path": str(self.model.absolute()),
            "model.threads": self.threads,
            "store.path": str(store_path),
            "store.autosave_s": 86400.0,
            "camera.source": f"replay:{self.frames.absolute()}?fps={fps:g}&loop=1",
            "panel.kind": "none",
            "mqtt.enabled": self.broker is not None,
            "mqtt.device_id": f"{name}{os.getpid()}",
            "web.enabled": False,  # the page's cost is measured on its own (bench/web.py)
            **overrides,
        }
        if self.broker is not None:
            settings["mqtt.host"], settings["mqtt.port"] = self.broker
        return config.replace(self.cfg, **settings)


def random_store(embedder: Embedder, cfg: config.Config, n: int, seed: int, **overrides: Any) -> KnnStore:
    """A store of ``n`` random non-negative unit vectors (as ReLU embeddings are), spread over the classes.

    The configured store settings with ``overrides``; the capacity is at least ``n``.
    """
    settings = dataclasses.replace(cfg.store.settings(), **overrides)
    settings = dataclasses.replace(settings, capacity=max(settings.capacity, n))
    store = KnnStore(embedder.dim, embedder.identity, settings)
    classes = list(cfg.classes)
    for start_row, rows in random_rows(n, embedder.dim, seed):
        for i, row in enumerate(rows, start_row):
            store.add(classes[i % len(classes)], row)
    return store


def unbounded_store(embedder: Embedder, cfg: config.Config, rule: str, storage: str) -> KnnStore:
    """An empty store with the configured k, ``rule`` and ``storage``, and room for any number of rows."""
    settings = StoreSettings(k=cfg.store.k, rule=rule, capacity=10**9, storage=storage)
    return KnnStore(embedder.dim, embedder.identity, settings)


def random_rows(n: int, dim: int, seed: int, chunk: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """(first index, rows) chunks of random non-negative unit vectors, the same for the same seed."""
    rng = np.random.default_rng(seed)
    for start_row in range(0, n, chunk):
        rows = np.abs(rng.standard_normal((min(chunk, n - start_row), dim), dtype=np.float32))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        yield start_row, rows


def median_us(call: Callable[[Any], object], items: Iterable[Any]) -> float:
    """The median time of ``call(item)`` over ``items``, in microseconds."""
    times = []
    for item in items:
        t = time.perf_counter()
        call(item)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def synthetic_frames(folder: Path, count: int = 64) -> Path:
    """Smooth random colour fields as JPEGs, for machines without the photo folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((320, 240), Image.Resampling.BILINEAR)
        (folder / str(i % 3)).mkdir(parents=True, exist_ok=True)
        image.save(folder / str(i % 3) / f"{i:03d}.jpg", quality=90)
    return folder


def decode_frames(folder: Path, size: tuple[int, int], budget: int = 64 << 20) -> list[np.ndarray]:
    """The replay folder's images as ReplaySource reads them (longer side at most twice the model's)."""
    frames: list[np.ndarray] = []
    used = 0
    for path in find_images(folder):
        frame = load_rgb(path, 2 * max(size))
        frames.append(frame)
        used += frame.nbytes
        if used >= budget or len(frames) >= 512:
            break
    return frames

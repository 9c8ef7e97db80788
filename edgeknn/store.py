"""KnnStore: the trained examples and the public operations on them (add, forget, classify, save).

Plain numpy. Rows are L2-normalised embeddings kept in one preallocated matrix that grows when
full (so adding is O(1) amortised), with the class of each row and the example it came from (an
added example may be stored as several augmented views). How a frame is classified against the
rows is the head's job (``head.py``), the file's format is ``storefile.py``'s. The store knows the
model only by its identity string, and refuses a file written for another model.

Every rule answers ``UNKNOWN`` when the store is empty or the frame's ``similarity`` is below
``effective_threshold`` (``threshold``, or calibrated from the examples when it is None:
``scan.py``), and names its nearest examples so that an answer can be explained.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeknn import storefile
from edgeknn.head import DEFAULT_RULE, RULES, VIEW_RULES, Head, fit_sample, rowdot
from edgeknn.scan import ExampleIndex, Space

UNKNOWN = "unrecognized"  # the no-class answer ("unknown" is a reserved state in Home Assistant)
STORAGES = ("float32", "uint8")
PER_ROW = ("rows", "scale", "labels", "example")  # a store file's arrays with one entry per stored row
_WIDEN_ROWS = 512  # uint8 rows widened to float32 at a time (2 MB: stays in cache)
MAX_PICTURE_BYTES = 1 << 20  # an example's JPEG (pictures.encode makes ~15 KB): a bound, not a budget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreSettings:
    """How a store classifies and keeps its rows (``config.StoreConfig.settings`` builds it).

    ``rule`` may be ``"default"``; ``storage`` None is float32 for a new store and, for a
    loaded one, the storage of its file.
    """

    k: int = 3
    rule: str = DEFAULT_RULE
    threshold: float | None = None  # None: calibrated from the examples (``effective_threshold``)
    capacity: int = 1000
    storage: str | None = None
    max_classes: int = 10


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    scores: dict[str, float]
    similarity: float
    neighbours: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class ExampleInfo:
    """One added example as ``KnnStore.examples`` lists it: ``added`` is its time (epoch seconds)."""

    id: int
    class_name: str
    added: float
    has_picture: bool


class KnnStore:
    def __init__(self, dim: int, model_id: str, settings: StoreSettings = StoreSettings()):
        rule = DEFAULT_RULE if settings.rule == "default" else settings.rule
        storage = settings.storage or "float32"
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
        if storage not in STORAGES:
            raise ValueError(f"unknown storage {storage!r}; expected float32 or uint8")
        self.dim, self.model_id, self.storage = dim, model_id, storage
        self.k, self.threshold, self.capacity = settings.k, settings.threshold, settings.capacity
        self.max_classes = settings.max_classes
        self.classes: list[str] = []
        self._n = 0
        self._rows = np.zeros((64, dim), np.float32 if storage == "float32" else np.uint8)
        self._scale = np.zeros(64, np.float32)  # uint8 storage: 1 / norm of each raw row
        self._labels = np.zeros(64, np.int32)
        self._example = np.zeros(64, np.int64)  # which added example a row belongs to (views share it)
        self._next_example = 0  # example ids are never reused (the store file keeps the next one)
        self._examples: dict[str, int] = {}
        self._added: dict[int, float] = {}  # every stored example's time of adding
        # Pictures (JPEG): (size, crc32) of each example that has one; the bytes are in memory until a
        # save writes them (``_unsaved``), then in ``_picture_dir`` (storefile.pictures_dir of the file).
        # The lock makes ``picture`` safe from another thread (a web page) while the loop changes them.
        self._pictures: dict[int, tuple[int, int]] = {}
        self._unsaved: dict[int, bytes] = {}
        self._picture_dir: Path | None = None
        self._lock = threading.Lock()
        self._head = Head(rule, dim)
        self._index = ExampleIndex(Space(rule in VIEW_RULES))  # one row per example: scan.py
        self.full_scan = False  # True: no index (the bench measures the index's answers against it)
        self._widened: np.ndarray | None = None  # uint8 storage: float32 scratch rows for similarities
        self._shared = False  # a save on another thread reads the stored rows: copy them before a rewrite

    @property
    def rule(self) -> str:
        return self._head.rule

    # --- examples -------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def counts(self) -> dict[str, int]:
        """Examples per class, in class order (a class may have none yet)."""
        return {name: self._examples.get(name, 0) for name in self.classes}

    def labels(self) -> np.ndarray:
        """The class index of each row (into ``classes``), a copy."""
        return self._labels[: self._n].copy()

    def example_ids(self) -> np.ndarray:
        """Which added example each row came from (the views of one example share it), a copy."""
        return self._example[: self._n].copy()

    @property
    def nbytes(self) -> int:
        """The memory the stored rows take (a quarter of float32's with uint8 storage)."""
        return self._rows[: self._n].nbytes

    def ensure_class(self, name: str) -> int:
        if name not in self.classes:
            self.classes.append(name)
            self._head.stale = True
        return self.classes.index(name)

    def add_class(self, name: str) -> int:
        """Make an empty class in the next slot (button/LED i is slot i); return its slot.

        ValueError when it exists or the store already has ``max_classes`` classes."""
        if name in self.classes:
            raise ValueError(f"class {name!r} already exists")
        if len(self.classes) >= self.max_classes:
            raise ValueError(
                f"already {len(self.classes)} classes, the most a store keeps (store.max_classes)"
            )
        return self.ensure_class(name)

    def remove_class(self, name: str) -> int:
        """Remove class ``name`` and its examples (returns how many); later classes move down a slot."""
        removed = self.forget(name)  # KeyError when unknown
        slot = self.classes.index(name)
        del self.classes[slot]
        self._unshare()  # labels are rewritten in place below
        labels = self._labels[: self._n]
        labels[labels > slot] -= 1
        self._head.stale = True
        return removed

    def add(
        self,
        name: str,
        views: np.ndarray,
        picture: bytes | None = None,
        *,
        example_id: int | None = None,
        added: float | None = None,
    ) -> int:
        """Store one example of ``name`` (one or more views, rows of ``dim``) with the JPEG of the frame
        it came from, if given (``pictures.encode``); return its class count.

        ``example_id`` and ``added`` keep an example's identity when a store is rebuilt (re-embedding):
        ids only grow, so an id below the next one is refused."""
        views = np.atleast_2d(np.asarray(views, np.float32))
        if views.shape[1] != self.dim:
            raise ValueError(f"expected vectors of {self.dim} values, got {views.shape[1]}")
        if len(views) == 0:
            raise ValueError("expected at least one vector")
        if picture is not None and (not picture.startswith(b"\xff\xd8") or len(picture) > MAX_PICTURE_BYTES):
            raise ValueError(f"a picture is a JPEG of at most {MAX_PICTURE_BYTES} bytes")
        if example_id is not None and example_id < self._next_example:
            raise ValueError(f"example id {example_id} is taken (the next is {self._next_example})")
        if added is not None and not math.isfinite(added):
            raise ValueError(f"added: expected a time in seconds, got {added}")
        scale = None
        if self.storage == "float32":  # convert first: a refused example changes nothing
            values = views / np.maximum(np.linalg.norm(views, axis=1, keepdims=True), 1e-12)
        else:
            values, scale = _to_uint8(views)
        label = self.ensure_class(name)
        rows: slice | np.ndarray | None = None
        if self._examples.get(name, 0) >= self.capacity:
            # A full class: the new example takes the rows of its oldest one when it has as many
            # views (always, from the daemon), so adding never moves the whole matrix.
            oldest = np.flatnonzero(self._oldest_rows(label))
            if len(oldest) == len(views):
                rows = oldest
                self._unshare()
                self._drop_examples([int(self._example[oldest[0]])])
                self._index.replaced(int(oldest[0]))
            else:
                self._drop_oldest(label)
        if rows is None:
            need = self._n + len(views)
            if need > len(self._rows):
                self._grow(max(need, _with_room(len(self._rows))))
            rows = slice(self._n, need)
            self._n = need
            self._examples[name] = self._examples.get(name, 0) + 1
        self._rows[rows] = values
        if scale is not None:
            self._scale[rows] = scale
        self._labels[rows] = label
        example = self._next_example if example_id is None else example_id
        self._example[rows] = example
        self._next_example = example + 1
        self._added[example] = time.time() if added is None else added
        if picture is not None:
            with self._lock:
                self._pictures[example] = (len(picture), zlib.crc32(picture))
                self._unsaved[example] = picture
        self._head.stale = True
        return self._examples[name]

    def examples(self, name: str | None = None) -> list[ExampleInfo]:
        """The stored examples (of class ``name``, KeyError if there is none), oldest first."""
        if name is not None and name not in self.classes:
            raise KeyError(name)
        ids, first = np.unique(self._example[: self._n], return_index=True)
        labels = self._labels[: self._n][first]
        return [
            ExampleInfo(int(i), self.classes[label], self._added[int(i)], int(i) in self._pictures)
            for i, label in zip(ids, labels, strict=True)
            if name is None or self.classes[label] == name
        ]

    def delete_example(self, example_id: int) -> str:
        """Remove one example (all its rows and its picture); return its class. KeyError if there is none."""
        mine = self._example[: self._n] == example_id
        if not mine.any():
            raise KeyError(example_id)
        name = self.classes[int(self._labels[: self._n][mine][0])]
        self._compact(~mine)
        self._examples[name] -= 1
        if not self._examples[name]:
            del self._examples[name]
        return name

    def picture(self, example_id: int) -> bytes | None:
        """The JPEG of an example, None when it has none (or its file is lost or damaged: said once
        in the log, and the example then has no picture). Safe to call from another thread."""
        with self._lock:
            known, data, folder = (
                self._pictures.get(example_id),
                self._unsaved.get(example_id),
                self._picture_dir,
            )
        if known is None or data is not None:
            return data
        path = storefile.picture_path(folder, example_id) if folder is not None else None
        try:
            if path is None:
                raise FileNotFoundError
            data = path.read_bytes()
        except OSError as e:
            problem = f"cannot read it ({e.strerror or 'missing'})"
        else:
            if (len(data), zlib.crc32(data)) == known:
                return data
            problem = "it is damaged (size or checksum differ from the store's)"
        with self._lock:
            if self._pictures.pop(example_id, None) is not None:
                log.warning(
                    "picture of example %d: %s %s; that example has no picture now", example_id, path, problem
                )
        return None

    def has_picture(self, example_id: int) -> bool:
        return example_id in self._pictures

    def pictures_to_write(self, path: Path) -> dict[int, bytes]:
        """The pictures a save to ``path`` must write: those not yet saved, or all of them when the
        store's pictures live elsewhere (a save to another file copies them)."""
        with self._lock:
            home, unsaved = self._picture_dir, dict(self._unsaved)
        if home is None or home == storefile.pictures_dir(Path(path)):
            return unsaved
        out = {}
        for example_id in sorted(self._pictures):
            data = unsaved.get(example_id) or self.picture(example_id)
            if data is not None:
                out[example_id] = data
        return out

    def pictures_saved(self, path: Path, written: dict[int, bytes]) -> None:
        """A save to ``path`` wrote ``written`` (``pictures_to_write``): they are read from there now."""
        with self._lock:
            self._picture_dir = storefile.pictures_dir(Path(path))
            for example_id in written:
                self._unsaved.pop(example_id, None)

    def _drop_examples(self, ids: list[int]) -> None:
        """Forget what is kept per example (time, picture) for examples whose rows are gone."""
        with self._lock:
            for example_id in ids:
                self._added.pop(example_id, None)
                self._pictures.pop(example_id, None)
                self._unsaved.pop(example_id, None)

    def forget(self, name: str) -> int:
        """Remove every example of class ``name`` (the class stays known); return how many went."""
        if name not in self.classes:
            raise KeyError(name)
        keep = self._labels[: self._n] != self.classes.index(name)
        self._compact(keep)
        return self._examples.pop(name, 0)

    def rename(self, old: str, new: str) -> None:
        if old not in self.classes:
            raise KeyError(old)
        if new in self.classes:
            raise ValueError(f"class {new!r} already exists")
        self.classes[self.classes.index(old)] = new
        if old in self._examples:
            self._examples[new] = self._examples.pop(old)
        self._head.stale = True

    def reset(self) -> None:
        """Forget every example; the class names stay."""
        self._compact(np.zeros(self._n, bool))
        self._examples.clear()

    def _oldest_rows(self, label: int) -> np.ndarray:
        """A mask of the rows of the oldest example of class ``label`` (which has examples)."""
        mine = self._labels[: self._n] == label
        oldest = self._example[: self._n][mine].min()
        return mine & (self._example[: self._n] == oldest)

    def _drop_oldest(self, label: int) -> None:
        self._compact(~self._oldest_rows(label))
        self._examples[self.classes[label]] -= 1

    def _compact(self, keep: np.ndarray) -> None:
        self._unshare()
        self._drop_examples(np.unique(self._example[: self._n][~keep]).tolist())
        n = int(keep.sum())
        for a in (self._rows, self._scale, self._labels, self._example):
            a[:n] = a[: self._n][keep]
        self._n = n
        self._head.stale = True
        self._index.clear()

    def _grow(self, size: int) -> None:
        """Reallocate the arrays shorter than ``size`` rows, keeping the stored ones (rows grow by
        half again when full: amortised O(1) adds, and teaching a loaded store needs 2.5x its rows
        for a moment, not 3x)."""
        for name in ("_rows", "_scale", "_labels", "_example"):
            old = getattr(self, name)
            if len(old) < size:
                new = np.zeros((size, *old.shape[1:]), old.dtype)
                new[: self._n] = old[: self._n]
                setattr(self, name, new)

    def rows(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        """A float32 copy of the stored rows (all, or ``index`` into them), uint8 ones scaled back."""
        index = slice(0, self._n) if index is None else index
        if self.storage == "float32":
            return self._rows[: self._n][index].copy() if isinstance(index, slice) else self._rows[index]
        return self._rows[index].astype(np.float32) * self._scale[index, None]

    # --- classification -------------------------------------------------------------------

    def observe(self, vector: np.ndarray) -> None:
        """Fold a seen frame's embedding into the centre of the feature space (the default rule uses it)."""
        self._head.observe(vector)

    def similarities(self, vector: np.ndarray) -> np.ndarray:
        """Cosine similarity of a unit ``vector`` to every stored row (``rowdot``: no BLAS threads)."""
        q = np.asarray(vector, np.float32)
        if self.storage == "float32":
            return rowdot(self._rows[: self._n], q)
        out = np.empty(self._n, np.float32)
        if self._widened is None or len(self._widened) < min(self._n, _WIDEN_ROWS):
            self._widened = np.empty((min(self._n, _WIDEN_ROWS), self.dim), np.float32)
        for start in range(0, self._n, _WIDEN_ROWS):  # uint8 rows widen per chunk, in a reused buffer
            stop = min(start + _WIDEN_ROWS, self._n)
            rows = self._widened[: stop - start]
            np.copyto(rows, self._rows[start:stop], casting="unsafe")
            rowdot(rows, q, out=out[start:stop])
        return out * self._scale[: self._n]

    def classify(self, vector: np.ndarray) -> Prediction:
        """Classify one unit embedding: ``UNKNOWN`` with empty scores when the store has no examples,
        and with this frame's scores when its ``similarity`` is below ``effective_threshold``: for
        the view rules the mean similarity of its k nearest examples (``scan.py``), for the others
        the cosine of the nearest row.

        The view rules take their answer from the fitted head and their nearest examples from the
        index (``scan.py``: one row per example, in the head's space, at a cost that hardly grows
        with the rows); ``tfjs`` and ``nearest`` vote with the k most similar rows of a full scan.
        ``full_scan``: the view rules score every example too (what the index is measured against).
        """
        if self._n == 0:
            return Prediction(UNKNOWN, 0.0, {}, 0.0)
        if self._head.stale:
            self.fit()
        if self.rule in VIEW_RULES:
            nearest, sims = self._index.nearest(vector, self.k, self.rows, self.full_scan)
        else:
            every = self.similarities(vector)
            k = min(self.k, self._n)
            nearest = np.argpartition(every, self._n - k)[self._n - k :]
            nearest = nearest[np.argsort(-every[nearest], kind="stable")]
            sims = every[nearest]
        labels = self._labels[nearest]
        probs, best = self._head.answer(vector, labels, len(self.classes))
        scores = {
            name: float(p) for name, p in zip(self.classes, probs, strict=True) if self._examples.get(name)
        }
        # the view rules: the mean over the k nearest examples (a lone near-duplicate counts less)
        similarity = float(sims.mean() if self.rule in VIEW_RULES else sims[0])
        neighbours = [(self.classes[i], float(s)) for i, s in zip(labels, sims, strict=True)]
        if similarity < self.effective_threshold:
            return Prediction(UNKNOWN, 0.0, scores, similarity, neighbours)
        return Prediction(self.classes[best], float(probs[best]), scores, similarity, neighbours)

    @property
    def effective_threshold(self) -> float:
        """The threshold applied now: ``threshold`` when it is set, else the one calibrated from the
        examples (``scan.ExampleIndex.threshold``; 0.0 until two classes have examples). ``tfjs`` and
        ``nearest`` (kept to compare with TensorFlow.js, which has no unknown answer) are not
        calibrated: 0.0, a raw cosine, never unknown. From the thread that classifies: it may calibrate."""
        if self.threshold is not None:
            return float(self.threshold)
        if self._n == 0 or self.rule not in VIEW_RULES:
            return 0.0
        if self._head.stale:
            self.fit()
        return self._index.threshold(self._labels[: self._n], self.rows, len(self.classes), self.k)

    def fit(self) -> None:
        """Fit the rule's head now if it is due (else the next classify does it).

        The daemon calls this before it reports ready, so its first frame is not held up by the
        fit, and the fit's working memory comes and goes before the camera and MQTT add theirs.
        """
        if not (self._head.stale and self._n):
            return
        view_rule = self.rule in VIEW_RULES
        if view_rule:
            labels = self._labels[: self._n]
            index = fit_sample(labels, self._example[: self._n], len(self.classes))
            present = np.bincount(labels, minlength=len(self.classes)) > 0
            self._head.fit(self.rows(index), labels[index], present)
        center = self._head.fitted.center if view_rule and self._head.fitted is not None else None
        self._index.sync(self._n, self._example[: self._n], self.rows, Space(view_rule, center))

    # --- files ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the store to ``path`` atomically, and the pictures not there yet (``storefile.write``)."""
        pictures = self.pictures_to_write(path)
        storefile.write(Path(path), self.contents(), pictures)
        self.pictures_saved(path, pictures)

    def contents(self, snapshot: bool = False) -> dict[str, np.ndarray]:
        """The arrays a store file holds. With ``snapshot``: arrays that later changes leave alone, for a
        save on another thread. The small ones are copies; the stored rows are shared (a copy of tens
        of MB would stall the loop) until ``snapshot_done``, and a change that rewrites stored rows
        meanwhile copies them first. Adding writes past them; growing moves them to new arrays."""
        n = self._n
        arrays = {
            "model_id": np.array(self.model_id),
            "storage": np.array(self.storage),
            "classes": np.array(self.classes, dtype=str) if self.classes else np.zeros(0, "<U1"),
            "rows": self._rows[:n],
            "scale": self._scale[:n],
            "labels": self._labels[:n],
            "example": self._example[:n],
            "center": self._head.center,
            "seen": np.array(self._head.seen),
            **self._example_arrays(),
        }
        if not snapshot:
            return arrays
        self._shared = True
        return {name: a if name in PER_ROW else a.copy() for name, a in arrays.items()}

    def _example_arrays(self) -> dict[str, np.ndarray]:
        """What a store file keeps per example (new arrays: a snapshot needs no copy of them)."""
        ids = sorted(self._added)
        with self._lock:
            pictures = [self._pictures.get(i, (0, 0)) for i in ids]
        return {
            "next_example": np.array(self._next_example, np.int64),
            "examples": np.array(ids, np.int64),
            "added": np.array([self._added[i] for i in ids], np.float64),
            "picture_size": np.array([size for size, _ in pictures], np.int64),
            "picture_crc": np.array([crc for _, crc in pictures], np.uint32),
        }

    def snapshot_done(self) -> None:
        """The save of the last snapshot is over: stored rows may be rewritten in place again."""
        self._shared = False

    def _unshare(self) -> None:
        """Before rewriting stored rows: give a save in flight its own copy of them."""
        if self._shared:
            self._rows, self._scale = self._rows.copy(), self._scale.copy()
            self._labels, self._example = self._labels.copy(), self._example.copy()
            self._shared = False

    @classmethod
    def load(
        cls, path: Path, model_id: str, settings: StoreSettings = StoreSettings(), dim: int | None = None
    ) -> KnnStore:
        """Load a store made with ``model_id`` (whose rows have ``dim`` values, when given: the
        model's); ``storefile.StoreError`` names the file and says what is wrong with it (every
        array is checked before anything is allocated). A ``settings.storage`` other than the
        file's converts the rows."""
        arrays, matrix = storefile.read(Path(path), model_id, _with_room, dim)
        rows, scale = arrays["rows"], arrays["scale"]
        if settings.storage is None:
            settings = dataclasses.replace(settings, storage=str(arrays["storage"]))
        store = cls(rows.shape[1], model_id, settings)
        store.classes = [str(c) for c in arrays["classes"]]
        n = len(rows)
        if store.storage == str(arrays["storage"]):
            store._rows = matrix  # the rows as read, with their room to grow (no copy of them)
        elif store.storage == "float32":  # converting between storages
            store._rows, scale = rows.astype(np.float32) * scale[:, None], np.zeros(n, np.float32)
        else:
            store._rows, scale = _to_uint8(rows)
        store._scale = scale.astype(np.float32, copy=False)
        store._labels = arrays["labels"].astype(np.int32, copy=False)
        store._example = arrays["example"].astype(np.int64, copy=False)
        store._n = n
        store._grow(max(64, len(store._rows)))  # the per-row arrays get the rows' room
        store._next_example = int(arrays["next_example"])
        store._added = dict(zip(arrays["examples"].tolist(), arrays["added"].tolist(), strict=True))
        store._picture_dir = storefile.pictures_dir(Path(path))
        store._pictures = {
            i: (size, crc)
            for i, size, crc in zip(
                arrays["examples"].tolist(),
                arrays["picture_size"].tolist(),
                arrays["picture_crc"].tolist(),
                strict=True,
            )
            if size
        }
        store._check_pictures()
        first_rows = np.unique(arrays["example"], return_index=True)[1]
        per_class = np.bincount(arrays["labels"][first_rows], minlength=len(store.classes))
        store._examples = {name: int(c) for name, c in zip(store.classes, per_class, strict=True) if c}
        store._head.center, store._head.seen = arrays["center"].astype(np.float32), int(arrays["seen"])
        return store

    def _check_pictures(self) -> None:
        """Drop the pictures whose file is missing or of the wrong size (one log line for all):
        a lost picture loses nothing else. The checksum is checked when one is read."""
        if not self._pictures or self._picture_dir is None:
            return
        sizes = storefile.picture_sizes(self._picture_dir)
        lost = [i for i, (size, _) in self._pictures.items() if sizes.get(i) != size]
        for example_id in lost:
            del self._pictures[example_id]
        if lost:
            log.warning(
                "%s: %d of %d pictures are missing or damaged (examples %s); those examples have no picture",
                self._picture_dir,
                len(lost),
                len(lost) + len(self._pictures),
                ", ".join(map(str, lost[:10])) + (", ..." if len(lost) > 10 else ""),
            )


def _with_room(rows: int) -> int:
    """How many rows to allocate for ``rows``: half as many again."""
    return rows + rows // 2


def _to_uint8(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative vectors as uint8 rows scaled to 0..255 plus 1/norm of each row.

    The extractor's output is uint8 with zero point 0, so its cosine is kept (up to rounding).
    """
    if (views < 0).any():
        raise ValueError("uint8 storage needs non-negative embeddings (ReLU outputs); use float32")
    peak = np.maximum(views.max(axis=1, keepdims=True), 1e-12)
    q = np.round(views * (255.0 / peak)).astype(np.uint8)
    norms = np.linalg.norm(q.astype(np.float32), axis=1)
    return q, (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)

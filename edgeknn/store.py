"""KnnStore: the trained examples and the public operations on them (add, forget, classify, save).

Plain numpy. Rows are L2-normalised embeddings kept in one preallocated matrix that grows when
full (so adding is O(1) amortised), with the class of each row and the example it came from (an
added example may be stored as several augmented views). How a frame is classified against the
rows is the head's job (``head.py``), the file's format is ``storefile.py``'s. The store knows the
model only by its identity string, and refuses a file written for another model.

Every rule answers ``unknown`` when the store is empty or the best cosine similarity to any row is
below ``threshold``, and names its nearest rows so that an answer can be explained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeknn import storefile
from edgeknn.head import DEFAULT_RULE, RULES, VIEW_RULES, Head, fit_sample, rowdot

UNKNOWN = "unknown"
STORAGES = ("float32", "uint8")
PER_ROW = ("rows", "scale", "labels", "example")  # a store file's arrays with one entry per stored row
_WIDEN_ROWS = 512  # uint8 rows widened to float32 at a time (2 MB: stays in cache)


@dataclass(frozen=True)
class StoreSettings:
    """How a store classifies and keeps its rows (``config.StoreConfig.settings`` builds it).

    ``rule`` may be ``"default"``; ``storage`` None is float32 for a new store and, for a
    loaded one, the storage of its file.
    """

    k: int = 3
    rule: str = DEFAULT_RULE
    threshold: float = 0.0
    capacity: int = 1000
    storage: str | None = None


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    scores: dict[str, float]
    similarity: float
    neighbours: list[tuple[str, float]] = field(default_factory=list)


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
        self.classes: list[str] = []
        self._n = 0
        self._rows = np.zeros((64, dim), np.float32 if storage == "float32" else np.uint8)
        self._scale = np.zeros(64, np.float32)  # uint8 storage: 1 / norm of each raw row
        self._labels = np.zeros(64, np.int32)
        self._example = np.zeros(64, np.int64)  # which added example a row belongs to (views share it)
        self._next_example = 0
        self._examples: dict[str, int] = {}
        self._head = Head(rule, dim)
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

    def add(self, name: str, views: np.ndarray) -> int:
        """Store one example of ``name`` (one or more views, rows of ``dim``); return its class count."""
        views = np.atleast_2d(np.asarray(views, np.float32))
        if views.shape[1] != self.dim:
            raise ValueError(f"expected vectors of {self.dim} values, got {views.shape[1]}")
        if len(views) == 0:
            raise ValueError("expected at least one vector")
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
        self._example[rows] = self._next_example
        self._next_example += 1
        self._head.stale = True
        return self._examples[name]

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
        n = int(keep.sum())
        for a in (self._rows, self._scale, self._labels, self._example):
            a[:n] = a[: self._n][keep]
        self._n = n
        self._head.stale = True

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
        """Classify one unit embedding; ``unknown`` with empty scores when the store has no examples."""
        if self._n == 0:
            return Prediction(UNKNOWN, 0.0, {}, 0.0)
        sims = self.similarities(vector)
        k = min(self.k, self._n)
        nearest = np.argpartition(sims, self._n - k)[self._n - k :]
        nearest = nearest[np.argsort(-sims[nearest], kind="stable")]
        labels = self._labels[nearest]
        if self._head.stale:
            self.fit()
        probs, best = self._head.answer(vector, labels, len(self.classes))
        scores = {
            name: float(p) for name, p in zip(self.classes, probs, strict=True) if self._examples.get(name)
        }
        similarity = float(sims[nearest[0]])
        neighbours = [(self.classes[i], float(s)) for i, s in zip(labels, sims[nearest], strict=True)]
        if similarity < self.threshold:
            return Prediction(UNKNOWN, 0.0, scores, similarity, neighbours)
        return Prediction(self.classes[best], float(probs[best]), scores, similarity, neighbours)

    def fit(self) -> None:
        """Fit the rule's head now if it is due (else the next classify does it).

        The daemon calls this before it reports ready, so its first frame is not held up by the
        fit, and the fit's working memory comes and goes before the camera and MQTT add theirs.
        """
        if not (self._head.stale and self._n and self.rule in VIEW_RULES):
            return
        labels = self._labels[: self._n]
        index = fit_sample(labels, self._example[: self._n], len(self.classes))
        present = np.bincount(labels, minlength=len(self.classes)) > 0
        self._head.fit(self.rows(index), labels[index], present)

    # --- files ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the store to ``path`` atomically (see ``storefile.write``)."""
        storefile.write(Path(path), self.contents())

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
        }
        if not snapshot:
            return arrays
        self._shared = True
        return {name: a if name in PER_ROW else a.copy() for name, a in arrays.items()}

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
        store._next_example = int(arrays["example"].max()) + 1 if n else 0
        first_rows = np.unique(arrays["example"], return_index=True)[1]
        per_class = np.bincount(arrays["labels"][first_rows], minlength=len(store.classes))
        store._examples = {name: int(c) for name, c in zip(store.classes, per_class, strict=True) if c}
        store._head.center, store._head.seen = arrays["center"].astype(np.float32), int(arrays["seen"])
        return store


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

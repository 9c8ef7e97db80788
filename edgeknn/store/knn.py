"""KnnStore: the trained examples and the public operations on them (add, forget, classify, save).

Plain numpy. Rows are L2-normalised embeddings kept in one preallocated matrix that grows when
full (``rows.py``), with the class of each row and the example it came from (an added example
may be stored as several augmented views; its id and time: ``examples.py``, its picture:
``pictures.py``). How a frame is classified against the rows is the matcher's job (``matcher.py``,
with the head and the scan index; the store's ``classify``, ``observe``, ``fit`` and
``effective_threshold`` hand it the rows), the file's format is ``file.py``'s. The store knows the
model only by its identity string, and refuses a file written for another model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeknn.store import file as storefile
from edgeknn.store import pictures as storepictures
from edgeknn.store.examples import ExampleBook, ExampleInfo
from edgeknn.store.head import DEFAULT_RULE, RULES
from edgeknn.store.matcher import Matcher, Prediction
from edgeknn.store.pictures import Pictures
from edgeknn.store.rows import PER_ROW, Block, Picked, Rows, with_room

STORAGES = ("float32", "uint8")
AUTO = "auto"  # the storage that loses nothing measurable for the model's embeddings (``storage_for``)


@dataclass(frozen=True)
class StoreSettings:
    """How a store classifies and keeps its rows (``config.StoreConfig.settings`` builds it).

    ``rule`` may be ``"default"``; ``storage`` None is float32 for a new store and, for a
    loaded one, the storage of its file; ``"auto"`` is ``embedding`` for a new store (``storage_for``
    for a loaded one). ``embedding``: what the model's embeddings are (``Embedder.storage``):
    ``"uint8"`` for a quantized extractor's ReLU output with zero point 0, which uint8 rows keep up to
    rounding, else ``"float32"`` (a float model, or one whose output can be negative).
    """

    k: int = 3
    rule: str = DEFAULT_RULE
    threshold: float | None = None  # None: calibrated from the examples (``effective_threshold``)
    capacity: int = 1000
    storage: str | None = None
    max_classes: int = 10
    embedding: str = "float32"


def storage_for(settings: StoreSettings, stored: str | None = None, rows: np.ndarray | None = None) -> str:
    """The storage a store with ``settings`` keeps its rows in: for a store file, ``stored`` is its
    storage and ``rows`` its rows. ``auto`` keeps a file's storage, except that float32 rows of a
    model whose embeddings are uint8 (and the rows non-negative) become uint8: a quarter of the
    memory, the same answers (docs/classifying.md); a float model's store stays float32."""
    if settings.storage is None:
        return stored or "float32"
    if settings.storage != AUTO:
        return settings.storage
    if stored is None:
        return settings.embedding
    if stored == "float32" and settings.embedding == "uint8" and rows is not None and not (rows < 0).any():
        return "uint8"
    return stored


class KnnStore:
    def __init__(self, dim: int, model_id: str, settings: StoreSettings = StoreSettings()):
        rule = DEFAULT_RULE if settings.rule == "default" else settings.rule
        storage = storage_for(settings)
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
        if storage not in STORAGES:
            raise ValueError(f"unknown storage {storage!r}; expected float32 or uint8")
        self.dim, self.model_id, self.storage = dim, model_id, storage
        self.k, self.threshold, self.capacity = settings.k, settings.threshold, settings.capacity
        self.max_classes = settings.max_classes
        self.classes: list[str] = []
        self._rows = Rows(dim, storage)
        self._examples: dict[str, int] = {}  # examples per class
        self._book = ExampleBook()  # each stored example's id and time of adding
        self._pictures = Pictures()  # and its picture (safe to read from another thread)
        self.full_scan = False  # True: no index (the bench measures the index's answers against it)
        self._matcher = Matcher(self, rule, dim)  # classifies (matcher.py) with its head and index:
        self._head, self._index = self._matcher.head, self._matcher.index  # stale, cleared on a change

    @property
    def rule(self) -> str:
        return self._matcher.rule

    # --- examples -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def counts(self) -> dict[str, int]:
        """Examples per class, in class order (a class may have none yet)."""
        return {name: self._examples.get(name, 0) for name in self.classes}

    def labels(self) -> np.ndarray:
        """The class index of each row (into ``classes``), a copy."""
        return self._rows.labels.copy()

    def example_ids(self) -> np.ndarray:
        """Which added example each row came from (the views of one example share it), a copy."""
        return self._rows.examples.copy()

    @property
    def nbytes(self) -> int:
        """The memory the stored rows take (a quarter of float32's with uint8 storage)."""
        return self._rows.nbytes

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
        self._rows.remove_label(slot)
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
        if picture is not None:
            storepictures.check(picture)
        self._book.check(example_id, added)
        encoded = self._rows.encode(views)  # convert first: a refused example changes nothing
        label = self.ensure_class(name)
        at: np.ndarray | None = None
        if self._examples.get(name, 0) >= self.capacity:
            # A full class: the new example takes the rows of its oldest one when it has as many
            # views (always, from the daemon), so adding never moves the whole matrix.
            oldest = np.flatnonzero(self._rows.oldest(label))
            if len(oldest) == len(views):
                at = oldest
                self._drop_examples([int(self._rows.examples[oldest[0]])])
                self._index.replaced(int(oldest[0]))
            else:
                self._drop_oldest(label)
        example = self._book.next_id if example_id is None else example_id
        self._rows.put(encoded, label, example, at)
        if at is None:
            self._examples[name] = self._examples.get(name, 0) + 1
        self._book.add(example, added)
        if picture is not None:
            self._pictures.add(example, picture)
        self._head.stale = True
        return self._examples[name]

    def examples(self, name: str | None = None) -> list[ExampleInfo]:
        """The stored examples (of class ``name``, KeyError if there is none), oldest first."""
        if name is not None and name not in self.classes:
            raise KeyError(name)
        ids, first = np.unique(self._rows.examples, return_index=True)
        labels = self._rows.labels[first]
        return [
            ExampleInfo(int(i), self.classes[label], self._book.added(int(i)), int(i) in self._pictures)
            for i, label in zip(ids, labels, strict=True)
            if name is None or self.classes[label] == name
        ]

    def delete_example(self, example_id: int) -> str:
        """Remove one example (all its rows and its picture); return its class. KeyError if there is none."""
        mine = self._rows.examples == example_id
        if not mine.any():
            raise KeyError(example_id)
        name = self.classes[int(self._rows.labels[mine][0])]
        self._compact(~mine)
        self._examples[name] -= 1
        if not self._examples[name]:
            del self._examples[name]
        return name

    def picture(self, example_id: int) -> bytes | None:
        """The JPEG of an example, None when it has none (or its file is lost or damaged: said once
        in the log, and the example then has no picture). Safe to call from another thread."""
        return self._pictures.get(example_id)

    def has_picture(self, example_id: int) -> bool:
        return example_id in self._pictures

    def pictures_to_write(self, path: Path) -> Mapping[int, bytes]:
        """The pictures a save to ``path`` must write: those not yet saved, or all of them when the
        store's pictures live elsewhere (a save to another file copies them)."""
        return self._pictures.to_write(path)

    def pictures_saved(self, path: Path, written: Mapping[int, bytes]) -> None:
        """A save to ``path`` wrote ``written`` (``pictures_to_write``): they are read from there now."""
        self._pictures.saved(path, written)

    def _drop_examples(self, ids: list[int]) -> None:
        """Forget what is kept per example (time, picture) for examples whose rows are gone."""
        self._book.drop(ids)
        self._pictures.drop(ids)

    def forget(self, name: str) -> int:
        """Remove every example of class ``name`` (the class stays known); return how many went."""
        if name not in self.classes:
            raise KeyError(name)
        keep = self._rows.labels != self.classes.index(name)
        self._compact(keep)
        return self._examples.pop(name, 0)

    def rename(self, old: str, new: str) -> None:
        if old not in self.classes:
            raise KeyError(old)
        if new in self.classes:
            raise ValueError(f"class {new!r} already exists")
        self.classes[self.classes.index(old)] = new
        self._matcher.renamed(old, new)
        if old in self._examples:
            self._examples[new] = self._examples.pop(old)
        self._head.stale = True

    def reset(self) -> None:
        """Forget every example; the class names stay."""
        self._compact(np.zeros(len(self._rows), bool))
        self._examples.clear()

    def _drop_oldest(self, label: int) -> None:
        self._compact(~self._rows.oldest(label))
        self._examples[self.classes[label]] -= 1

    def _compact(self, keep: np.ndarray) -> None:
        self._drop_examples(np.unique(self._rows.examples[~keep]).tolist())
        self._rows.compact(keep)
        self._head.stale = True
        self._index.compacted(keep)

    def rows(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        """A float32 copy of the stored rows (all, or ``index`` into them), uint8 ones scaled back."""
        return self._rows.get(index)

    # --- classification: the matcher's (matcher.py) -------------------------------------

    def observe(self, vector: np.ndarray) -> None:
        self._matcher.observe(vector)

    def similarities(self, vector: np.ndarray) -> np.ndarray:
        """Cosine similarity of a unit ``vector`` to every stored row (``rowdot``: no BLAS threads)."""
        return self._rows.similarities(vector)

    def classify(self, vector: np.ndarray) -> Prediction:
        return self._matcher.classify(vector, self._rows, self.classes, self._examples)

    @property
    def effective_threshold(self) -> float:
        return self._matcher.effective_threshold(self._rows, self.classes)

    def fit(self) -> None:
        self._matcher.fit(self._rows, self.classes)

    # --- files ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the store to ``path`` atomically, and the pictures not there yet (``storefile.write``)."""
        pictures = self.pictures_to_write(path)
        storefile.write(Path(path), self.contents(), pictures)
        self.pictures_saved(path, pictures)

    def contents(self, snapshot: bool = False) -> dict[str, np.ndarray | Picked]:
        """The arrays a store file holds. With ``snapshot``: arrays that later changes leave alone, for a
        save on another thread. The small ones are copies; the stored rows are shared (a copy of tens
        of MB would stall the loop) until ``snapshot_done``, and a change that rewrites stored rows
        meanwhile copies them first. Adding writes past them; growing moves them to new arrays."""
        arrays: dict[str, np.ndarray | Picked] = {
            "model_id": np.array(self.model_id),
            "storage": np.array(self.storage),
            "classes": np.array(self.classes, dtype=str) if self.classes else np.zeros(0, "<U1"),
            **self._rows.arrays(),
            "center": self._head.center,
            "seen": np.array(self._head.seen),
            **self._example_arrays(),
        }
        if not snapshot:
            return arrays
        self._rows.shared = True
        return {n: a if isinstance(a, Picked) or n in PER_ROW else a.copy() for n, a in arrays.items()}

    def _example_arrays(self) -> dict[str, np.ndarray]:
        """What a store file keeps per example (new arrays: a snapshot needs no copy of them)."""
        book = self._book.arrays()
        return {**book, **self._pictures.arrays(book["examples"].tolist())}

    def snapshot_done(self) -> None:
        """The save of the last snapshot is over: stored rows may be rewritten in place again."""
        self._rows.shared = False

    @classmethod
    def load(
        cls, path: Path, model_id: str, settings: StoreSettings = StoreSettings(), dim: int | None = None
    ) -> KnnStore:
        """Load a store made with ``model_id`` (whose rows have ``dim`` values, when given: the
        model's); ``storefile.StoreError`` names the file and says what is wrong with it (every
        array is checked before anything is allocated). A ``settings.storage`` other than the
        file's converts the rows."""
        arrays, matrix = storefile.read(Path(path), model_id, with_room, dim)
        storage = storage_for(settings, str(arrays["storage"]), arrays["rows"])
        settings = dataclasses.replace(settings, storage=storage)
        store = cls(arrays["rows"].shape[1], model_id, settings)
        store.classes = [str(c) for c in arrays["classes"]]
        store._rows = Rows.load(arrays, matrix, store.storage)
        store._book = ExampleBook.load(arrays)
        store._pictures = Pictures.load(
            Path(path), arrays["examples"], arrays["picture_size"], arrays["picture_crc"]
        )
        first_rows = np.unique(arrays["example"], return_index=True)[1]
        per_class = np.bincount(arrays["labels"][first_rows], minlength=len(store.classes))
        store._examples = {name: int(c) for name, c in zip(store.classes, per_class, strict=True) if c}
        store._head.center, store._head.seen = arrays["center"].astype(np.float32), int(arrays["seen"])
        return store


def threshold_calibration(store: KnnStore) -> str:
    """What ``store.effective_threshold`` comes from now (``Matcher.calibration``): ``set``, ``own
    class``, ``near misses`` or ``none``; the state publishes it beside the threshold. Outside the
    class, which is at its size limit."""
    return store._matcher.calibration(store._rows, store.classes)


@dataclass(frozen=True)
class Lent:
    """A store's examples as they were when ``lend`` took them, for an export on another thread: the
    stored rows themselves (no copy: a change that would rewrite them copies them first), each
    example's rows (``order[start : start + count]``), times and pictures. ``give_back`` ends it."""

    model_id: str
    dim: int
    storage: str
    classes: list[str]
    examples: list[ExampleInfo]  # in id order
    rows: dict[str, np.ndarray]  # Rows.lend(): rows, scale, labels, example (dead rows too)
    order: np.ndarray  # the live rows' indices in them, grouped by example in id order
    starts: np.ndarray
    counts: np.ndarray
    pictures: storepictures.PictureLoan
    token: int


def lend(store: KnnStore) -> Lent:
    """``store``'s examples for an export (on the loop thread: a few ms at 3 000 examples)."""
    token, arrays, live = store._rows.lend()
    order = live[np.argsort(arrays["example"][live], kind="stable")]
    _, starts, counts = np.unique(arrays["example"][order], return_index=True, return_counts=True)
    pictures = store._pictures.lend()
    examples = store.examples()
    return Lent(
        store.model_id, store.dim, store.storage, list(store.classes), examples, arrays,
        order, starts, counts, pictures, token,
    )  # fmt: skip


def fitted_center(store: KnnStore) -> tuple[np.ndarray, int] | None:
    """What a fleet's leader shares beside its examples (``Head.fitted_center``), on the loop thread."""
    return store._head.fitted_center()


def adopt_center(store: KnnStore, center: np.ndarray, seen: int) -> None:
    """A follower on its leader's model takes its centre (``Head.adopt_center``), on the loop thread."""
    store._head.adopt_center(center, seen)


def give_back(store: KnnStore, lent: Lent) -> None:
    """The export of ``lent`` is over (from any thread)."""
    store._rows.give_back(lent.token)


def next_example_id(store: KnnStore) -> int:
    """The id the store's next example gets (ids only grow)."""
    return store._book.next_id


def picture_keys(store: KnnStore) -> dict[int, tuple[int, int] | None]:
    """Each example's picture as (size, crc32), None when it has none: what tells one JPEG from another
    without reading it (an import's de-duplication)."""
    ids = [e.id for e in store.examples()]
    arrays = store._pictures.arrays(ids)
    pairs = zip(arrays["picture_size"].tolist(), arrays["picture_crc"].tolist(), strict=True)
    return {i: (size, crc) if size else None for i, (size, crc) in zip(ids, pairs, strict=True)}


def reserve(store: KnnStore, rows: int) -> None:
    """Room for ``rows`` more rows in one allocation (an import: not a copy of the matrix per growth);
    none when they fit after the rows already there (dead ones included: no copy to drop those)."""
    if store._rows.n + rows > len(store._rows.matrix):
        store._rows._grow(len(store) + rows)


def swap_in(
    store: KnnStore,
    classes: list[str],
    counts: dict[str, int],
    book: ExampleBook,
    pictures: Pictures,
    blocks: list[Block],
) -> int:
    """Make these ``classes`` (their examples per class), examples' ids and times, pictures and rows
    (``blocks``, used up) ``store``'s, on the loop, in one step (``staged.py`` gathered and checked them
    beside it: nothing here can fail half way). The rows are copied into the stored matrix in place
    (``Rows.refill``); a save or an export in flight keeps what it reads. Ids keep growing past the old
    ones. Returns how many examples ``store`` had."""
    removed = sum(store.counts().values())
    book.next_id = max(book.next_id, store._book.next_id)
    store._rows.refill(blocks)
    store.classes, store._examples = list(classes), {name: n for name, n in counts.items() if n}
    store._book, store._pictures = book, pictures
    store._head.stale = True
    store._index.clear()
    return removed

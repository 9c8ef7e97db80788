"""The rows of a store: L2-normalised embeddings in one preallocated matrix, float32 or uint8 (a quarter
of the memory), with per row its scale (uint8: 1 / its norm), its class and the example it came from.

The arrays grow by half again when full, so adding is O(1) amortised. A save on another thread may
read them (``shared``): a change that rewrites stored rows in place copies them first (``unshare``);
adding writes past them, growing moves them to new arrays.

Removing rows (a delete, a forget) moves nothing (issue 20: moving 18 000 rows took the loop 0.3 s):
the removed rows stay where they are, dead, and ``_live`` lists where the live ones are. Every
position this class takes or gives is a live row's (0 .. len - 1, in the order they were stored), so
the index, the head's sample and the examples never see the dead ones; they leave memory the next
time the arrays are copied anyway (growing, or ``unshare``), and a save or an export reads the live
rows only (``Picked``, ``lend``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgeknn.store.head import rowdot

PER_ROW = ("rows", "scale", "labels", "example")  # a store file's arrays with one entry per stored row
_WIDEN_ROWS = 512  # uint8 rows widened to float32 at a time (2 MB: stays in cache)


@dataclass(frozen=True)
class Picked:
    """The rows ``index`` of ``array``, for a save to write without a copy of them (``chunks``)."""

    array: np.ndarray
    index: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def chunks(self, rows: int = 4096) -> Iterator[np.ndarray]:
        """The picked rows in order, a few MB at a time."""
        for start in range(0, len(self.index), rows):
            yield self.array[self.index[start : start + rows]]


class Rows:
    def __init__(self, dim: int, storage: str):
        self.dim, self.storage, self.n = dim, storage, 0  # n: rows in the arrays, live or dead
        self._live: np.ndarray | None = None  # where the live rows are, ascending; None: all n
        self._live_label: np.ndarray | None = None  # label[_live] and example[_live], kept until a change
        self._live_example: np.ndarray | None = None
        self.matrix = np.zeros((64, dim), np.float32 if storage == "float32" else np.uint8)
        self.scale = np.zeros(64, np.float32)  # uint8 storage: 1 / norm of each raw row
        self.label = np.zeros(64, np.int32)
        self.example = np.zeros(64, np.int64)  # which added example a row belongs to (views share it)
        self.shared = False  # a save on another thread reads the stored rows: copy them before a rewrite
        self._loans, self._epoch = 0, 0  # exports reading them (``lend``); the arrays' generation
        self._widened: np.ndarray | None = None  # uint8 storage: float32 scratch rows for similarities

    @classmethod
    def load(cls, arrays: dict[str, np.ndarray], matrix: np.ndarray, storage: str) -> Rows:
        """The rows of a store file (``storefile.read``: ``matrix`` holds them with room to grow, in
        the file's storage); another ``storage`` converts them."""
        rows, scale = arrays["rows"], arrays["scale"]
        out = cls(rows.shape[1], storage)
        n = len(rows)
        if storage == str(arrays["storage"]):
            out.matrix = matrix  # the rows as read, with their room to grow (no copy of them)
        elif storage == "float32":  # converting between storages
            out.matrix, scale = rows.astype(np.float32) * scale[:, None], np.zeros(n, np.float32)
        else:
            out.matrix, scale = to_uint8(rows)
        out.scale = scale.astype(np.float32, copy=False)
        out.label = arrays["labels"].astype(np.int32, copy=False)
        out.example = arrays["example"].astype(np.int64, copy=False)
        out.n = n
        out._grow(max(64, len(out.matrix)))  # the per-row arrays get the rows' room
        return out

    def __len__(self) -> int:
        return self.n if self._live is None else len(self._live)

    @property
    def labels(self) -> np.ndarray:
        """The class of each stored row (not to be written to)."""
        if self._live is None:
            return self.label[: self.n]
        if self._live_label is None:
            self._live_label = self.label[self._live]
        return self._live_label

    @property
    def examples(self) -> np.ndarray:
        """The example of each stored row (not to be written to)."""
        if self._live is None:
            return self.example[: self.n]
        if self._live_example is None:
            self._live_example = self.example[self._live]
        return self._live_example

    @property
    def dead(self) -> int:
        """Removed rows still in the arrays (they go at the next copy: growing, ``unshare``)."""
        return self.n - len(self)

    @property
    def nbytes(self) -> int:
        return len(self) * self.matrix[:1].nbytes

    def physical(self, index: np.ndarray | slice | None = None) -> np.ndarray | slice:
        """Where the stored rows ``index`` (all of them for None; positions or a mask) are in the arrays."""
        if isinstance(index, np.ndarray) and index.dtype == bool:
            index = np.flatnonzero(index)
        if self._live is None:
            return slice(0, self.n) if index is None else index
        return self._live if index is None else self._live[index]

    def encode(self, views: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``views`` as rows of this storage, and their scales (None for float32): ValueError before
        anything changes when they cannot be stored."""
        if self.storage == "float32":
            norms = np.linalg.norm(views, axis=1, keepdims=True)
            if np.all(np.abs(norms - 1) < 1e-6):  # unit already (an imported row): kept bit for bit
                return views.copy(), None
            return views / np.maximum(norms, 1e-12), None
        return to_uint8(views)

    def put(
        self,
        encoded: tuple[np.ndarray, np.ndarray | None],
        label: int,
        example: int,
        at: np.ndarray | None = None,
    ) -> None:
        """Store rows (``encode``'s) of class ``label`` and example ``example``: after the stored ones,
        or in place of the rows at positions ``at``."""
        values, scale = encoded
        where: slice | np.ndarray
        if at is None:
            if self.n + len(values) > len(self.matrix) and self._live is not None:
                self._grow(with_room(len(self) + len(values)))  # the dead rows go with this copy
            need = self.n + len(values)
            if need > len(self.matrix):
                self._grow(max(need, with_room(len(self.matrix))))
            where = slice(self.n, need)
            if self._live is not None:
                self._live = np.concatenate([self._live, np.arange(self.n, need)])
            self.n = need
        else:
            self.unshare()
            where = self.physical(at)
        self._changed()
        self.matrix[where] = values
        if scale is not None:
            self.scale[where] = scale
        self.label[where] = label
        self.example[where] = example

    def oldest(self, label: int) -> np.ndarray:
        """A mask of the rows of the oldest example of class ``label`` (which has examples)."""
        mine = self.labels == label
        oldest = self.examples[mine].min()
        return mine & (self.examples == oldest)

    def compact(self, keep: np.ndarray) -> None:
        """Keep only the rows where ``keep`` (a mask of the stored rows) is True, in order: the others
        become dead, nothing moves (O(rows) of bookkeeping, no row copied)."""
        live = np.arange(self.n) if self._live is None else self._live
        kept = live[keep]
        moving = self.shared or self._loans > 0  # a reader holds the arrays: never write over its rows
        if not moving and (len(kept) == 0 or kept[-1] == len(kept) - 1):
            self.n, self._live = len(kept), None  # only the last rows went: they are simply free again
        else:
            self._live = kept
        self._changed()

    def remove_label(self, slot: int) -> None:
        """Class ``slot`` is gone (it has no rows): the classes after it move down one."""
        if self.shared or self._loans > 0:
            self.label = self.label.copy()  # the reader keeps its labels; the rows are not rewritten
        labels = self.label[: self.n]
        labels[labels > slot] -= 1
        self._changed()

    def _changed(self) -> None:
        self._live_label = self._live_example = None

    def refill(self, blocks: list[Block]) -> None:
        """Replace every stored row with those of ``blocks`` (``Block``: in this storage, or raw float16
        rows that a float32 store normalises here), in place when they fit, so that a store and its
        replacement's rows are never both whole in memory; each block is let go once copied. Rows a
        save or an export still reads are left to it: new arrays then."""
        total = sum(len(b.values) for b in blocks)
        if self.shared or self._loans > 0 or len(self.matrix) < total:
            size = max(total, 64)
            self.matrix = np.zeros((size, self.dim), self.matrix.dtype)
            self.scale, self.label = np.zeros(size, np.float32), np.zeros(size, np.int32)
            self.example = np.zeros(size, np.int64)
            self.shared, self._loans, self._epoch = False, 0, self._epoch + 1
        self.n = 0
        while blocks:
            block = blocks.pop(0)
            values, scale = block.values, block.scale
            if values.dtype == np.float16:
                values, scale = self.encode(values.astype(np.float32))
            where = slice(self.n, self.n + len(values))
            self.matrix[where] = values
            self.scale[where] = 0 if scale is None else scale
            self.label[where], self.example[where] = block.labels, block.examples
            self.n = where.stop
            del block, values, scale
        self._live = None  # every row is a new live one
        self._changed()

    def _grow(self, size: int) -> None:
        """Reallocate the arrays shorter than ``size`` rows, keeping the stored ones (rows grow by
        half again when full: amortised O(1) adds, and teaching a loaded store needs 2.5x its rows
        for a moment, not 3x). With dead rows, new arrays of ``size`` rows (at least the live
        ones) take the live rows only."""
        if self._live is not None:
            live, size = self._live, max(size, len(self._live), 64)
            for name in ("matrix", "scale", "label", "example"):
                old = getattr(self, name)
                new = np.zeros((size, *old.shape[1:]), old.dtype)
                new[: len(live)] = old[live]
                setattr(self, name, new)
            self.n, self._live = len(live), None
            self._changed()
            return
        for name in ("matrix", "scale", "label", "example"):
            old = getattr(self, name)
            if len(old) < size:
                new = np.zeros((size, *old.shape[1:]), old.dtype)
                new[: self.n] = old[: self.n]
                setattr(self, name, new)

    def get(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        """A float32 copy of the stored rows (all, or ``index`` into them), uint8 ones scaled back."""
        if isinstance(index, slice) and self._live is None:
            within = range(self.n)[index]  # a slice of the stored rows
            index = slice(within.start, within.stop, within.step)
        where = self.physical(index)
        if self.storage == "float32":
            return self.matrix[where].copy() if isinstance(where, slice) else self.matrix[where]
        return self.matrix[where].astype(np.float32) * self.scale[where, None]

    def similarities(self, vector: np.ndarray) -> np.ndarray:
        """Cosine similarity of a unit ``vector`` to every stored row (``rowdot``: no BLAS threads)."""
        q = np.asarray(vector, np.float32)
        if self.storage == "float32":
            sims = rowdot(self.matrix[: self.n], q)
            return sims if self._live is None else sims[self._live]
        out = np.empty(self.n, np.float32)
        if self._widened is None or len(self._widened) < min(self.n, _WIDEN_ROWS):
            self._widened = np.empty((min(self.n, _WIDEN_ROWS), self.dim), np.float32)
        for start in range(0, self.n, _WIDEN_ROWS):  # uint8 rows widen per chunk, in a reused buffer
            stop = min(start + _WIDEN_ROWS, self.n)
            rows = self._widened[: stop - start]
            np.copyto(rows, self.matrix[start:stop], casting="unsafe")
            rowdot(rows, q, out=out[start:stop])
        out *= self.scale[: self.n]
        return out if self._live is None else out[self._live]

    def arrays(self) -> dict[str, np.ndarray | Picked]:
        """The store file's per-row arrays (``PER_ROW``): views of the stored rows, not copies; with
        dead rows, the live ones picked (``Picked``: the rows themselves are still not copied)."""
        if self._live is None:
            n = self.n
            return {
                "rows": self.matrix[:n],
                "scale": self.scale[:n],
                "labels": self.label[:n],
                "example": self.example[:n],
            }
        live = self._live
        return {
            "rows": Picked(self.matrix, live),
            "scale": self.scale[live],
            "labels": self.label[live],
            "example": self.example[live],
        }

    def unshare(self) -> None:
        """Before rewriting stored rows: give a save or an export in flight its own copy of them (of
        the live ones only: the dead rows stay behind with the reader)."""
        if self.shared or self._loans > 0:
            if self._live is not None:
                self._grow(len(self.matrix))
            else:
                self.matrix, self.scale = self.matrix.copy(), self.scale.copy()
                self.label, self.example = self.label.copy(), self.example.copy()
            self.shared, self._loans, self._epoch = False, 0, self._epoch + 1

    def lend(self) -> tuple[int, dict[str, np.ndarray], np.ndarray]:
        """The arrays for a reader on another thread (an export), until ``give_back(token)``: views of
        every row in them, which a change that would rewrite them in place copies first (as for a
        save's snapshot), and where the live rows are in them."""
        self._loans += 1
        n = self.n
        arrays = {"rows": self.matrix[:n], "scale": self.scale[:n], "labels": self.label[:n]}
        live = np.arange(n) if self._live is None else self._live
        return self._epoch, {**arrays, "example": self.example[:n]}, live

    def give_back(self, token: int) -> None:
        """The export of ``lend``'s token is over (any thread: at worst a later change copies once more)."""
        if token == self._epoch and self._loans > 0:
            self._loans -= 1


@dataclass
class Block:
    """Rows gathered for ``Rows.refill`` (``staged.py``): ``values`` in the store's storage (with
    ``scale`` for uint8), or raw float16 rows for a float32 store; each row's class and example."""

    values: np.ndarray
    scale: np.ndarray | None
    labels: np.ndarray
    examples: np.ndarray


def with_room(rows: int) -> int:
    """How many rows to allocate for ``rows``: half as many again."""
    return rows + rows // 2


def to_uint8(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative vectors as uint8 rows scaled to 0..255 plus 1/norm of each row.

    The extractor's output is uint8 with zero point 0, so its cosine is kept (up to rounding).
    """
    if (views < 0).any():
        raise ValueError("uint8 storage needs non-negative embeddings (ReLU outputs); use float32")
    peak = np.maximum(views.max(axis=1, keepdims=True), 1e-12)
    q = np.round(views * (255.0 / peak)).astype(np.uint8)
    norms = np.linalg.norm(q.astype(np.float32), axis=1)
    return q, (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)

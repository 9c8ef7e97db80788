"""The rows of a store: L2-normalised embeddings in one preallocated matrix, float32 or uint8 (a quarter
of the memory), with per row its scale (uint8: 1 / its norm), its class and the example it came from.

The arrays grow by half again when full, so adding is O(1) amortised. A save on another thread may
read them (``shared``): a change that rewrites stored rows in place copies them first (``unshare``);
adding writes past them, growing moves them to new arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeknn.store.head import rowdot

PER_ROW = ("rows", "scale", "labels", "example")  # a store file's arrays with one entry per stored row
_WIDEN_ROWS = 512  # uint8 rows widened to float32 at a time (2 MB: stays in cache)


class Rows:
    def __init__(self, dim: int, storage: str):
        self.dim, self.storage, self.n = dim, storage, 0
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
        return self.n

    @property
    def labels(self) -> np.ndarray:
        """The class of each stored row (a view)."""
        return self.label[: self.n]

    @property
    def examples(self) -> np.ndarray:
        """The example of each stored row (a view)."""
        return self.example[: self.n]

    @property
    def nbytes(self) -> int:
        return self.matrix[: self.n].nbytes

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
            need = self.n + len(values)
            if need > len(self.matrix):
                self._grow(max(need, with_room(len(self.matrix))))
            where, self.n = slice(self.n, need), need
        else:
            self.unshare()
            where = at
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
        """Keep only the rows where ``keep`` (a mask of the stored rows) is True, in order."""
        self.unshare()
        n = int(keep.sum())
        for a in (self.matrix, self.scale, self.label, self.example):
            a[:n] = a[: self.n][keep]
        self.n = n

    def remove_label(self, slot: int) -> None:
        """Class ``slot`` is gone (it has no rows): the classes after it move down one."""
        self.unshare()
        labels = self.labels
        labels[labels > slot] -= 1

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

    def _grow(self, size: int) -> None:
        """Reallocate the arrays shorter than ``size`` rows, keeping the stored ones (rows grow by
        half again when full: amortised O(1) adds, and teaching a loaded store needs 2.5x its rows
        for a moment, not 3x)."""
        for name in ("matrix", "scale", "label", "example"):
            old = getattr(self, name)
            if len(old) < size:
                new = np.zeros((size, *old.shape[1:]), old.dtype)
                new[: self.n] = old[: self.n]
                setattr(self, name, new)

    def get(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        """A float32 copy of the stored rows (all, or ``index`` into them), uint8 ones scaled back."""
        index = slice(0, self.n) if index is None else index
        if self.storage == "float32":
            return self.matrix[: self.n][index].copy() if isinstance(index, slice) else self.matrix[index]
        return self.matrix[index].astype(np.float32) * self.scale[index, None]

    def similarities(self, vector: np.ndarray) -> np.ndarray:
        """Cosine similarity of a unit ``vector`` to every stored row (``rowdot``: no BLAS threads)."""
        q = np.asarray(vector, np.float32)
        if self.storage == "float32":
            return rowdot(self.matrix[: self.n], q)
        out = np.empty(self.n, np.float32)
        if self._widened is None or len(self._widened) < min(self.n, _WIDEN_ROWS):
            self._widened = np.empty((min(self.n, _WIDEN_ROWS), self.dim), np.float32)
        for start in range(0, self.n, _WIDEN_ROWS):  # uint8 rows widen per chunk, in a reused buffer
            stop = min(start + _WIDEN_ROWS, self.n)
            rows = self._widened[: stop - start]
            np.copyto(rows, self.matrix[start:stop], casting="unsafe")
            rowdot(rows, q, out=out[start:stop])
        return out * self.scale[: self.n]

    def arrays(self) -> dict[str, np.ndarray]:
        """The store file's per-row arrays (``PER_ROW``): views of the stored rows, not copies."""
        n = self.n
        return {
            "rows": self.matrix[:n],
            "scale": self.scale[:n],
            "labels": self.label[:n],
            "example": self.example[:n],
        }

    def unshare(self) -> None:
        """Before rewriting stored rows: give a save or an export in flight its own copy of them."""
        if self.shared or self._loans > 0:
            self.matrix, self.scale = self.matrix.copy(), self.scale.copy()
            self.label, self.example = self.label.copy(), self.example.copy()
            self.shared, self._loans, self._epoch = False, 0, self._epoch + 1

    def lend(self) -> tuple[int, dict[str, np.ndarray]]:
        """The stored rows for a reader on another thread (an export), until ``give_back(token)``: views,
        which a change that would rewrite them in place copies first (as for a save's snapshot)."""
        self._loans += 1
        return self._epoch, self.arrays()

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

"""A replacement for the live store's examples, gathered beside it from a streamed archive (a fleet's pack)
and swapped in on the loop in one step: the live store keeps classifying with its own examples until then.

Memory: one example of the archive at a time while it is read; its rows gathered in blocks
(``rows.Block``, ``BLOCK_ROWS`` each) in the store's storage, or as the archive's own float16 rows for a
float32 store (half the bytes); its pictures written to a staging folder as they come
(``pictures.Staging``; the first save copies them beside the store file), never held. On the loop
(``apply``), the blocks are copied into the stored matrix in place, each let go once copied
(``Rows.refill``): a float32 store of 3 000 examples of 6 rows of 1 024 values (74 MB) takes a pack with
37 MB beside it, never a second 74 MB.

``build`` reads the archive (``archive.Reader``: every check an upload gets) and checks everything the
swap needs (classes and examples per class within the store's limits, ids, times, pictures, rows a uint8
store can take), re-embedding each example from its picture (``reembed``) when the archive was made with
another model. Anything wrong raises, and what was gathered goes with the staging folder: the live store
never changed (all or nothing). ``apply`` checks that it still fits the live store and swaps it in
(``knn.swap_in``), which cannot fail half way.
"""

from __future__ import annotations

import mmap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from edgeknn.store import archive
from edgeknn.store.archive import ArchiveError
from edgeknn.store.examples import ExampleBook
from edgeknn.store.knn import KnnStore, StoreSettings, storage_for, swap_in
from edgeknn.store.pictures import Pictures, check
from edgeknn.store.rows import Block, Rows

BLOCK_ROWS = 1024  # rows per gathered block: 2 MB of float16 rows of 1 024 values, let go one at a time


@dataclass
class Built:
    """Examples gathered off the loop, waiting to replace the live store's (``apply``)."""

    model_id: str
    dim: int
    storage: str
    classes: list[str]
    counts: dict[str, int]
    book: ExampleBook
    pictures: Pictures
    blocks: list[Block]
    reembedded: bool

    @property
    def examples(self) -> int:
        return sum(self.counts.values())

    def discard(self) -> None:
        """It will not be swapped in (refused, given up): its staging folder goes now."""
        self.blocks.clear()
        self.pictures.discard()


class _Gather:
    """Rows appended example by example into blocks of ``BLOCK_ROWS`` (no per-example arrays left
    behind in the heap, and the blocks can be let go one by one)."""

    def __init__(self, dim: int, dtype: np.dtype, scaled: bool):
        self.blocks: list[Block] = []
        self._dim, self._dtype, self._scaled = dim, dtype, scaled
        self._fill = BLOCK_ROWS

    def add(self, values: np.ndarray, scale: np.ndarray | None, label: int, example: int) -> None:
        at = 0
        while at < len(values):
            if self._fill == BLOCK_ROWS:
                self.blocks.append(self._block())
                self._fill = 0
            block, take = self.blocks[-1], min(len(values) - at, BLOCK_ROWS - self._fill)
            into = slice(self._fill, self._fill + take)
            block.values[into] = values[at : at + take]
            if block.scale is not None and scale is not None:
                block.scale[into] = scale[at : at + take]
            block.labels[into], block.examples[into] = label, example
            self._fill, at = self._fill + take, at + take

    def _block(self) -> Block:
        """A new block; its rows in memory mapped on their own, which the system takes back the moment
        the block is let go (from malloc's heap, freed blocks could stay in the process)."""
        scale = np.empty(BLOCK_ROWS, np.float32) if self._scaled else None
        size = BLOCK_ROWS * self._dim * self._dtype.itemsize
        values = np.frombuffer(mmap.mmap(-1, size), self._dtype).reshape(BLOCK_ROWS, self._dim)
        return Block(values, scale, np.empty(BLOCK_ROWS, np.int32), np.empty(BLOCK_ROWS, np.int64))

    def done(self) -> list[Block]:
        """The blocks, the last one cut to its rows."""
        if self.blocks and self._fill < BLOCK_ROWS:
            last, n = self.blocks[-1], self._fill
            scale = None if last.scale is None else last.scale[:n].copy()
            cut = (last.values[:n].copy(), scale, last.labels[:n].copy(), last.examples[:n].copy())
            self.blocks[-1] = Block(*cut)
        return self.blocks


def build(
    source: IO[bytes],
    model_id: str,
    dim: int,
    settings: StoreSettings,
    staging: Path,
    *,
    reembed: Callable[[bytes], np.ndarray] | None = None,
    max_examples: int = archive.MAX_EXAMPLES,
) -> Built:
    """The archive in ``source`` gathered for a store of ``model_id`` rows of ``dim`` (``settings``'s
    storage, capacity and classes), its pictures in a new folder in ``staging``. ``reembed(jpeg)``: the
    rows of a picture by this device's model, for an archive of another model (without it, such an archive
    is refused). ArchiveError (one line) on the first problem."""
    reader = archive.Reader(source, max_examples=max_examples)
    m = reader.manifest
    other = m.model_id != model_id or m.dim != dim
    if other:
        missing = sum(1 for e in m.examples if e.picture is None)
        if reembed is None or missing:
            raise ArchiveError(
                f"made with another model ({m.dim} values per row) and {missing} examples have no picture "
                "to re-embed: refused"
            )
    if len(m.classes) > settings.max_classes:
        raise ArchiveError(
            f"{len(m.classes)} classes would be more than store.max_classes ({settings.max_classes})"
        )
    counts = Counter(e.class_name for e in m.examples)
    over = [(name, n) for name, n in counts.items() if n > settings.capacity]
    if over:
        raise ArchiveError(f"class {over[0][0]!r} would have {over[0][1]} examples, more than store.capacity "
                           f"({settings.capacity})")  # fmt: skip
    storage = storage_for(settings)  # the follower passes the live store's own
    encoder = Rows(dim, storage)  # only its encode: the rows as the store keeps them
    raw = storage == "float32" and m.dtype == "float16" and not other  # kept as float16 until the swap
    dtype = np.dtype(np.float16 if raw else np.float32 if storage == "float32" else np.uint8)
    gather = _Gather(dim, dtype, scaled=storage == "uint8")
    ids = [e.id for e in m.examples]
    keep_ids = ids == sorted(ids)
    slots = {name: i for i, name in enumerate(m.classes)}
    book, pictures = ExampleBook(), Pictures.staged(staging)
    try:
        for example in reader.examples():
            entry = example.entry
            example_id = entry.id if keep_ids else book.next_id
            try:
                book.check(example_id, entry.added)
                if example.picture is not None:
                    check(example.picture)
                if raw:
                    values, scale = example.values, None
                else:
                    rows = reembed(example.picture or b"") if other and reembed else example.vectors()
                    if rows.ndim != 2 or rows.shape[1] != dim or not len(rows):
                        raise ValueError(f"rows of shape {rows.shape}, expected (views, {dim})")
                    values, scale = encoder.encode(rows)
            except ValueError as e:
                raise ArchiveError(f"example {entry.id}: {e}") from None
            gather.add(values, scale, slots[entry.class_name], example_id)
            book.add(example_id, entry.added)
            if example.picture is not None:
                pictures.add(example_id, example.picture)
    except BaseException:
        pictures.discard()  # its pictures so far: now, not when the collector gets to them
        raise
    return Built(model_id, dim, storage, list(m.classes), {name: counts.get(name, 0) for name in m.classes},
                 book, pictures, gather.done(), other)  # fmt: skip


def apply(store: KnnStore, built: Built) -> dict:
    """Swap ``built`` in as ``store``'s examples (on the loop); ValueError, changing nothing, when it no
    longer fits (the configuration changed meanwhile). The reply's detail, as ``exchange.apply``'s."""
    if (built.model_id, built.dim, built.storage) != (store.model_id, store.dim, store.storage):
        raise ValueError("the store's model or storage changed while the examples were read: try again")
    if len(built.classes) > store.max_classes or max(built.counts.values(), default=0) > store.capacity:
        raise ValueError("more classes or examples per class than the store keeps now (store.*)")
    added = built.examples
    removed = swap_in(store, built.classes, built.counts, built.book, built.pictures, built.blocks)
    return {"mode": "replace", "added": added, "skipped": 0, "removed": removed, "classes": store.counts()}

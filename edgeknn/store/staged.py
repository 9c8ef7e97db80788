"""A replacement for the live store, built beside it from a streamed archive (a fleet's pack) and swapped
in on the loop in one step: the live store keeps classifying with its own examples until then, and memory
holds one example of the archive at a time, the new rows once, and no picture (they stream into a staging
folder: ``pictures.Staging``; the first save copies them beside the store file).

``build`` reads the archive (``archive.Reader``: every check an upload gets) straight into a new
``KnnStore`` of the live one's model, width and settings, re-embedding each example from its picture
(``reembed``) when the archive was made with another model. Anything wrong — a damaged archive, more classes
or examples per class than the store keeps, rows a uint8 store cannot take, a picture that does not
decode — raises, and the new store goes with its folder: the live one is untouched (all or nothing).
``apply``, on the loop, checks that it still fits the live store and swaps it in (``knn.swap_in``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from edgeknn.store import archive
from edgeknn.store.archive import ArchiveError
from edgeknn.store.knn import KnnStore, StoreSettings, discard, reserve, staged, swap_in


@dataclass
class Built:
    """A store filled off the loop, waiting to replace the live one (``apply``); letting it go removes
    its staging folder."""

    store: KnnStore
    examples: int
    reembedded: bool

    def discard(self) -> None:
        """It will not be swapped in (refused, given up): its staging folder goes now."""
        discard(self.store)


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
    """The archive in ``source`` as a new store of ``model_id`` rows of ``dim`` (``settings``'s storage,
    capacity, classes), its pictures in a new folder in ``staging``. ``reembed(jpeg)``: the rows of a
    picture by this device's model, for an archive of another model (without it, such an archive is
    refused). ArchiveError (one line) on the first problem."""
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
    ids = [e.id for e in m.examples]
    keep_ids = ids == sorted(ids)
    store = staged(dim, model_id, settings, staging)
    try:
        for name in m.classes:
            store.add_class(name)
        reserve(store, sum(e.views for e in m.examples))
        for example in reader.examples():
            entry = example.entry
            rows = reembed(example.picture or b"") if other and reembed else example.vectors()
            try:
                store.add(entry.class_name, rows, example.picture, example_id=entry.id if keep_ids else None,
                          added=entry.added)  # fmt: skip
            except ValueError as e:
                raise ArchiveError(f"example {entry.id}: {e}") from None
    except BaseException:
        discard(store)  # its pictures so far: now, not when the collector gets to it
        raise
    return Built(store, len(m.examples), other)


def apply(store: KnnStore, built: Built) -> dict:
    """Swap ``built`` in as ``store``'s examples (on the loop: O(1)); ValueError, changing nothing, when
    it no longer fits (the configuration changed meanwhile). The reply's detail, as ``exchange.apply``'s."""
    new = built.store
    if (new.model_id, new.dim, new.storage) != (store.model_id, store.dim, store.storage):
        raise ValueError("the store's model or storage changed while the examples were read: try again")
    counts = new.counts()
    if len(new.classes) > store.max_classes or max(counts.values(), default=0) > store.capacity:
        raise ValueError("more classes or examples per class than the store keeps now (store.*)")
    removed = swap_in(store, new)
    return {"mode": "replace", "added": built.examples, "skipped": 0, "removed": removed,
            "classes": store.counts()}  # fmt: skip

"""A store's examples in and out as an archive (``archive.py``): `edgeknn store export|import`, the page's
download and upload, and what a fleet's pack is made from.

Out: ``lend`` (knn.py) takes the store's examples on the loop thread in a few ms without copying the
rows; ``write_lent`` streams them on another thread; ``give_back`` ends the loan.

In: ``read_import`` reads a whole archive (or an old JSON export) off the loop and checks every value,
``plan`` decides on the loop what an import would do to the store (``mode`` ``add``: the examples the
store does not have yet; ``replace``: the store's classes and examples become the archive's) and refuses
it, changing nothing, when it would evict any of the store's examples or pass a limit; ``apply`` then
carries the plan out, all of it. The same example twice is the same time of adding and the same picture
(size and CRC-32): ids are per device, and a device's own download brought back adds nothing.

A fleet's pack (issue 25) is the same: the ``LendExamples`` command lends the store on the loop;
``archive.size(manifest_of(lent, dtype))`` is the pack's exact size before a byte is written (how many
chunks); ``write_lent(sink, lent, dtype)`` on another thread writes it into any ``archive.Sink`` (one
that publishes fixed-size chunks), ``float16`` rows for half the bytes; then ``give_back``. A follower
writes the chunks to a temporary file, streams it into a store built beside the live one
(``staged.build``: the same checks as the page's upload, one example in memory at a time) and sends
``ImportExamples(export=built, mode="replace")``, which ``apply`` swaps in.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edgeknn.store import archive, staged
from edgeknn.store.archive import ArchiveError, Entry, Manifest
from edgeknn.store.knn import KnnStore, Lent, next_example_id, picture_keys, reserve

MODES = ("add", "replace")
LEGACY_MAX_BYTES = 64 << 20  # an old JSON export is read whole: at most this much


@dataclass(frozen=True)
class Bundle:
    """An archive read whole and checked: what ``plan`` and ``apply`` take."""

    manifest: Manifest
    examples: list[archive.Example]
    nonnegative: bool  # every row >= 0 (a uint8 store can take them)
    source: str = "archive"  # or "json": an old export


@dataclass
class Plan:
    """What an import will do: the examples it adds (in order), how many of the archive's are already
    there, and for ``replace`` how many of the store's go (``removed``)."""

    mode: str
    adding: list[archive.Example]
    skipped: int
    removed: int
    keep_ids: bool
    classes: list[str]  # the store's classes afterwards, in slot order


# --- out --------------------------------------------------------------------------------------------


def manifest_of(lent: Lent, dtype: str | None = None) -> Manifest:
    """The manifest of lent examples; ``dtype`` None is the store's own (an exact round trip)."""
    dtype = dtype or lent.storage
    if dtype == "uint8" and lent.storage != "uint8":
        raise ArchiveError("uint8 rows come from a uint8 store; use float32 or float16")
    entries = [
        Entry(e.id, e.class_name, e.added, int(count), lent.pictures.known.get(e.id))
        for e, count in zip(lent.examples, lent.counts.tolist(), strict=True)
    ]
    return Manifest(lent.model_id, lent.dim, dtype, list(lent.classes), entries)


def write_lent(out: archive.Sink, lent: Lent, dtype: str | None = None) -> Manifest:
    """Stream the archive of ``lent`` to ``out``, one example at a time (ArchiveError: an example's
    picture went meanwhile, the stream is cut short and a reader refuses it)."""
    manifest = manifest_of(lent, dtype)
    rows, scale = lent.rows["rows"], lent.rows["scale"]

    def payloads():
        for entry, start, count in zip(manifest.examples, lent.starts, lent.counts, strict=True):
            index = lent.order[start : start + count]
            values = rows[index]
            keep_scale = scale[index] if lent.storage == "uint8" else None
            yield archive.encode_rows(values, keep_scale, manifest.dtype), lent.pictures.get(entry.id)

    archive.write(out, manifest, payloads())
    return manifest


# --- in ---------------------------------------------------------------------------------------------


def read_import(
    source: Path | IO[bytes], *, dim: int | None = None, max_examples: int = archive.MAX_EXAMPLES
) -> Bundle:
    """An archive (or an old JSON export) read whole from ``source`` (a path, or a seekable binary file)
    and checked; ArchiveError naming what is wrong. Runs off the loop: it costs the rows and pictures
    of the examples, nothing more."""
    if isinstance(source, Path):
        with open(source, "rb") as f:
            return read_import(f, dim=dim, max_examples=max_examples)
    first = source.read(1)
    source.seek(0)
    if first in (b"{", b" ", b"\n"):
        return _legacy(source.read(LEGACY_MAX_BYTES + 1), dim)
    reader = archive.Reader(source, dim=dim, max_examples=max_examples)
    examples = list(reader.examples())
    nonnegative = all(bool((e.values >= 0).all()) for e in examples)
    return Bundle(reader.manifest, examples, nonnegative)


def _legacy(raw: bytes, dim: int | None) -> Bundle:
    """An export of `store export` before the archive (JSON, rows as text), as a Bundle."""
    from edgeknn.store.legacy import parse_export

    if len(raw) > LEGACY_MAX_BYTES:
        raise ArchiveError(f"an old JSON export of more than {LEGACY_MAX_BYTES} bytes")
    try:
        export = parse_export(raw)
    except ValueError as e:
        raise ArchiveError(str(e)) from None
    now, examples = time.time(), []
    width = export.examples[0].views.shape[1] if export.examples else (dim or 1)
    for i, old in enumerate(export.examples):
        if old.views.shape[1] != width or (dim is not None and width != dim):
            raise ArchiveError(f"rows of {old.views.shape[1]} values, expected {dim or width}")
        picture = None if old.picture is None else (len(old.picture), zlib.crc32(old.picture))
        entry = Entry(i, old.class_name, now if old.added is None else old.added, len(old.views), picture)
        examples.append(archive.Example(entry, old.views, None, old.picture))
    manifest = Manifest(export.model_id, width, "float32", export.classes, [x.entry for x in examples])
    return Bundle(manifest, examples, all(bool((x.values >= 0).all()) for x in examples), "json")


# --- applying: on the loop --------------------------------------------------------------------------


def plan(store: KnnStore, bundle: Bundle, mode: str) -> Plan:
    """What importing ``bundle`` in ``mode`` does to ``store``; ValueError (one line) when it cannot, or
    when it would evict examples the store keeps (a class over ``store.capacity``). Changes nothing."""
    m = bundle.manifest
    if mode not in MODES:
        raise ValueError(f"mode: expected add or replace, got {str(mode)[:20]!r}")
    if m.model_id != store.model_id:
        theirs, ours = m.model_id[:12], store.model_id[:12]
        raise ValueError(f"made with another model ({theirs}…, this device's is {ours}…)")
    if m.dim != store.dim:
        raise ValueError(f"rows of {m.dim} values, this device's are {store.dim}")
    if store.storage == "uint8" and not bundle.nonnegative:
        raise ValueError("rows with negative values: this device keeps uint8 rows (store.storage)")
    if mode == "replace":
        adding, skipped, classes = list(bundle.examples), 0, list(m.classes)
        counts = Counter(e.entry.class_name for e in adding)
        removed = sum(store.counts().values())
    else:
        have = {(info.added, picture) for info, picture in _keyed(store)}
        adding = [e for e in bundle.examples if (e.entry.added, e.entry.picture) not in have]
        skipped, removed = len(bundle.examples) - len(adding), 0
        classes = list(dict.fromkeys([*store.classes, *m.classes]))
        counts = Counter(store.counts()) + Counter(e.entry.class_name for e in adding)
    if len(classes) > store.max_classes:
        raise ValueError(f"{len(classes)} classes would be more than store.max_classes ({store.max_classes})")
    over = {name: n for name, n in counts.items() if n > store.capacity}
    if over:
        name, n = next(iter(over.items()))
        evicted = "" if mode == "replace" else f": {n - store.capacity} of the device's examples would go"
        raise ValueError(
            f"class {name!r} would have {n} examples, more than store.capacity ({store.capacity}){evicted}; "
            "nothing was imported (delete some examples, raise store.capacity, or import with mode replace)"
        )
    ids = [e.entry.id for e in adding]
    start = next_example_id(store)  # (ids only grow: one a deleted example had is never given again)
    keep_ids = bundle.source == "archive" and ids == sorted(ids) and (not ids or ids[0] >= start)
    return Plan(mode, adding, skipped, removed, keep_ids, classes)


def _keyed(store: KnnStore):
    keys = picture_keys(store)
    for info in store.examples():
        yield info, keys.get(info.id)


def apply(store: KnnStore, bundle: Bundle | staged.Built, mode: str) -> dict:
    """Import ``bundle`` into ``store`` (``plan`` first: ValueError changes nothing); the reply's detail:
    mode, added, skipped (already there), removed (replace: the store's examples that went), classes.
    The bundle is used up: its examples are let go as they are stored, so memory holds each once.
    A store built beside (``staged.Built``, mode ``replace`` only) is swapped in instead."""
    if isinstance(bundle, staged.Built):
        if mode != "replace":
            raise ValueError(f"a store built beside replaces, it does not {str(mode)[:20]}")
        return staged.apply(store, bundle)
    p = plan(store, bundle, mode)
    adding, p.adding = p.adding[::-1], []  # the bundle is used up: each example goes once it is stored
    bundle.examples.clear()
    count = len(adding)
    if p.mode == "replace":
        store.reset()
        for name in list(store.classes):
            store.remove_class(name)
    for name in p.classes:
        if name not in store.classes:
            store.add_class(name)
    reserve(store, sum(len(e.values) for e in adding))
    while adding:
        e = adding.pop()
        store.add(
            e.entry.class_name,
            e.vectors(),
            e.picture,
            example_id=e.entry.id if p.keep_ids else None,
            added=e.entry.added,
        )
    return {
        "mode": p.mode,
        "added": count,
        "skipped": p.skipped,
        "removed": p.removed,
        "classes": store.counts(),
    }


def export_store(store: KnnStore, out: archive.Sink, dtype: str | None = None) -> Manifest:
    """Write ``store``'s archive to ``out`` on this thread (`edgeknn store export`)."""
    from edgeknn.store.knn import give_back, lend

    lent = lend(store)
    try:
        return write_lent(out, lent, dtype)
    finally:
        give_back(store, lent)

"""Removing examples moves no rows (issue 20, finding 3): a delete on a 3 000-example store of six
views each costs the loop bookkeeping, not a move of its 18 000 rows (0.3 s under load) nor a copy
of them while a save is in flight. The removed rows stay in memory, dead, until the arrays are
copied anyway (growing, ``unshare``); saves, exports, the index and the head see the live ones only.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from edgeknn.store import exchange
from edgeknn.store.knn import KnnStore, StoreSettings, lend

MODEL = "a" * 64
DIM = 32
VIEWS = 6


def views(seed: int) -> np.ndarray:
    v = np.abs(np.random.default_rng(seed).standard_normal((VIEWS, DIM), dtype=np.float32))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def big(storage: str = "float32", examples: int = 3000) -> KnnStore:
    store = KnnStore(DIM, MODEL, StoreSettings(storage=storage, capacity=examples))
    for i in range(examples):
        store.add("abcde"[i % 5], views(i), added=1.7e9 + 10 * i)
    return store


def rebuilt(store: KnnStore, kept: list[int]) -> KnnStore:
    """The store as if only the examples ``kept`` (their seeds) had ever been added (same ids, times)."""
    ids = {e.id: e for e in store.examples()}
    fresh = KnnStore(DIM, MODEL, StoreSettings(storage=store.storage, capacity=store.capacity))
    for name in store.classes:
        fresh.ensure_class(name)
    for seed in kept:
        fresh.add("abcde"[seed % 5], views(seed), example_id=seed, added=ids[seed].added)
    return fresh


def same(a: KnnStore, b: KnnStore) -> None:
    assert a.classes == b.classes and a.counts() == b.counts() and len(a) == len(b)
    assert [(e.id, e.class_name, e.added) for e in a.examples()] == [
        (e.id, e.class_name, e.added) for e in b.examples()
    ]
    assert np.array_equal(a.labels(), b.labels()) and np.array_equal(a.example_ids(), b.example_ids())
    assert np.array_equal(a.rows(), b.rows())
    assert np.array_equal(a.rows(np.arange(3, len(a), 7)), b.rows(np.arange(3, len(b), 7)))
    assert np.array_equal(a.rows(slice(5, 50)), b.rows(slice(5, 50)))
    q = views(10**6)[0]
    assert np.array_equal(a.similarities(q), b.similarities(q))


@pytest.mark.parametrize("storage", ["float32", "uint8"])
def test_a_delete_on_a_large_store_moves_no_row(storage):
    store = big(storage)
    assert len(store) == 18_000
    rows = store._rows
    matrix, first = rows.matrix, rows.matrix[:VIEWS].copy()
    assert store.delete_example(0) == "a"  # the oldest: every other row would move
    assert rows.matrix is matrix and np.array_equal(matrix[:VIEWS], first), "no row moved"
    assert len(store) == 17_994 and store.counts()["a"] == 599 and 0 not in [e.id for e in store.examples()]
    store.contents(snapshot=True)  # a save in flight reads the arrays
    store.delete_example(1)
    assert rows.matrix is matrix, "and no copy of them for the save's sake"
    store.snapshot_done()
    same(store, rebuilt(store, list(range(2, 3000))))


@pytest.mark.parametrize("storage", ["float32", "uint8"])
def test_deletes_forgets_and_adds_stay_consistent(storage, tmp_path: Path):
    store = big(storage, examples=300)
    kept = list(range(300))
    rng = np.random.default_rng(7)
    for seed in rng.choice(300, 40, replace=False).tolist():
        store.delete_example(seed)
        kept.remove(seed)
    same(store, rebuilt(store, kept))
    assert store.classify(views(5)[0]).label in store.classes  # the index and the head: live rows only
    for seed in range(300, 330):  # adds after deletes go after the live rows
        store.add("abcde"[seed % 5], views(seed), added=1.7e9 + 10 * seed)
        kept.append(seed)
    same(store, rebuilt(store, kept))
    path = tmp_path / "store.npz"
    store.save(path)  # a save writes the live rows only
    loaded = KnnStore.load(path, MODEL)
    same(loaded, store)
    assert loaded._rows.dead == 0
    store.forget("c")
    kept = [s for s in kept if s % 5 != 2]
    same(store, rebuilt(store, kept))
    assert store.counts()["c"] == 0 and all(e.class_name != "c" for e in store.examples())
    store.save(path)
    same(KnnStore.load(path, MODEL), store)


def test_an_export_after_deletes_carries_the_live_examples(tmp_path: Path):
    store = big(examples=60)
    for example in (0, 7, 30, 59):
        store.delete_example(example)
    lent = lend(store)
    out = io.BytesIO()
    exchange.write_lent(out, lent)
    (tmp_path / "x.tar").write_bytes(out.getvalue())
    fresh = KnnStore(DIM, MODEL, StoreSettings(capacity=60))
    exchange.apply(fresh, exchange.read_import(tmp_path / "x.tar"), "replace")
    same(fresh, store)


def test_the_dead_rows_go_when_the_arrays_grow_or_are_copied():
    store = big(examples=100)
    for example in range(40):
        store.delete_example(example)
    rows = store._rows
    assert rows.dead == 240 and len(store) == 360
    kept = list(range(40, 100))
    seed = 100
    while rows.dead:  # adding fills the arrays, then one copy takes the live rows only
        store.add("abcde"[seed % 5], views(seed), added=1.7e9 + 10 * seed)
        kept.append(seed)
        seed += 1
    same(store, rebuilt(store, kept))
    store.delete_example(kept[0])
    store.contents(snapshot=True)
    store.add("a", views(0), added=1.8e9)  # a full class? no: appends past the save's rows
    assert rows.dead == VIEWS
    store.remove_class("b")  # relabels without copying the rows
    assert store.classes == ["a", "c", "d", "e"] and rows.dead > 0
    store.snapshot_done()
    store.reset()
    assert len(store) == 0 and rows.dead == 0


def test_a_full_class_replacing_its_oldest_after_deletes():
    store = KnnStore(DIM, MODEL, StoreSettings(capacity=10))
    for i in range(30):
        store.add("abc"[i % 3], views(i), added=1.7e9 + 10 * i)
    store.delete_example(4)  # class "b", not its oldest
    store.add("a", views(100), added=1.8e9)  # "a" is full: its oldest (0) is overwritten in place
    assert store.counts() == {"a": 10, "b": 9, "c": 10}
    ids = [e.id for e in store.examples()]
    assert 0 not in ids and 4 not in ids and 30 in ids
    np.testing.assert_array_equal(store.rows(store.example_ids() == 30), views(100))


def test_the_checksum_of_a_store_file_is_the_one_earlier_versions_wrote():
    """Saves hash picked rows piece by piece; every file written before must still check out (0-d
    arrays hash as numpy's ascontiguousarray gives them, 1-d)."""
    from edgeknn.store.file import _checksum
    from edgeknn.store.rows import Picked

    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    arrays = {
        "model_id": np.array("a" * 64),
        "seen": np.array(3),
        "rows": rows,
        "classes": np.array(["x", "yy"]),
    }
    golden = (
        "b25279bd057be1ececb004fe4fa4a88899774ec3a2611b569ae26f870f0f1dee"  # main before issue 20's change
    )
    assert _checksum(arrays) == golden
    picked = np.concatenate([rows[:2], np.full((3, 3), 7, np.float32), rows[2:]])
    assert _checksum({**arrays, "rows": Picked(picked, np.array([0, 1, 5, 6]))}) == golden

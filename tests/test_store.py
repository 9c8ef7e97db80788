"""KnnStore: examples, the classification rules, capacity, storage and its file."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, TINY, needs_data

from edgeknn.imagefiles import find_images, load_rgb
from edgeknn.model.embedder import Embedder
from edgeknn.store.file import FORMAT_VERSION, StoreError, _checksum
from edgeknn.store.head import RULES, VIEW_RULES
from edgeknn.store.knn import KnnStore, StoreSettings
from edgeknn.store.names import UNKNOWN

MODEL = "a" * 64
OTHER = "b" * 64


def unit(*values: float) -> np.ndarray:
    v = np.array(values, np.float32)
    return v / np.linalg.norm(v)


def basis(dim: int, i: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    v = np.full(dim, 0.01, np.float32)
    v[i] = 1.0
    v += noise * np.random.default_rng(seed).random(dim, dtype=np.float32)
    return v / np.linalg.norm(v)


def clustered(rule: str = "softmax", storage: str = "float32", **kw) -> KnnStore:
    """Three classes of four examples each around three basis directions in 16-d (non-negative)."""
    store = KnnStore(16, MODEL, StoreSettings(rule=rule, storage=storage, **kw))
    for c, name in enumerate(("cup", "pen", "key")):
        for j in range(4):
            store.add(name, basis(16, c, 0.3, seed=10 * c + j))
    return store


# --- real embeddings of sign-digit photos (the tiny model's 256-d penultimate) --------------------------


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    embedder = Embedder(TINY)
    out = {}
    for name in ("0", "3", "5", "7"):
        files = [p for p in find_images(DIGITS / name) if p.stat().st_size < 100_000][:10]
        out[name] = np.stack([embedder.embed(load_rgb(p, max_side=256)) for p in files])
    return out


def digit_store(digits, rule: str, storage: str, shots: int = 4, threshold: float | None = -1.0) -> KnnStore:
    """Never unknown by default: the classifier's own answers (the unknown answer has its own tests)."""
    store = KnnStore(256, MODEL, StoreSettings(rule=rule, storage=storage, threshold=threshold))
    for name, vectors in digits.items():
        for v in vectors[:shots]:
            store.add(name, v)
    return store


def queries(digits, shots: int = 4) -> list[np.ndarray]:
    return [v for vectors in digits.values() for v in vectors[shots:]]


# --- examples ----------------------------------------------------------------------------------------------


def test_add_counts_and_classes():
    store = KnnStore(4, MODEL)
    assert len(store) == 0 and store.counts() == {}
    assert store.add("cup", unit(1, 0, 0, 0)) == 1
    assert store.add("cup", np.stack([unit(1, 0.1, 0, 0), unit(1, 0, 0.1, 0)])) == 2
    assert store.add("pen", unit(0, 1, 0, 0)) == 1
    assert store.classes == ["cup", "pen"]
    assert store.counts() == {"cup": 2, "pen": 1}
    assert len(store) == 4, "an example may be several views (rows)"
    store.ensure_class("key")
    assert store.counts() == {"cup": 2, "pen": 1, "key": 0}


def test_add_normalises_rows():
    store = KnnStore(3, MODEL)
    store.add("a", np.array([3.0, 4.0, 0.0]))
    assert store.similarities(unit(3, 4, 0))[0] == pytest.approx(1.0)


def test_add_of_a_wrong_dimension():
    store = KnnStore(4, MODEL)
    with pytest.raises(ValueError, match="expected vectors of 4 values, got 3"):
        store.add("a", np.ones(3))
    assert len(store) == 0 and store.counts() == {}


def test_add_of_no_rows_is_refused():
    """An example without a row would be counted but never stored (and lost by save/load)."""
    store = KnnStore(4, MODEL)
    with pytest.raises(ValueError):
        store.add("a", np.zeros((0, 4), np.float32))
    assert len(store) == 0 and store.counts().get("a", 0) == 0


def test_uint8_storage_refuses_negative_vectors():
    store = KnnStore(3, MODEL, StoreSettings(storage="uint8"))
    with pytest.raises(ValueError, match="non-negative"):
        store.add("a", np.array([1.0, -0.5, 0.0]))
    assert len(store) == 0


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown rule"):
        KnnStore(4, MODEL, StoreSettings(rule="vote"))
    with pytest.raises(ValueError, match="unknown storage"):
        KnnStore(4, MODEL, StoreSettings(storage="float16"))
    assert KnnStore(4, MODEL, StoreSettings(rule="default")).rule == "softmax"


def test_forget_rename_reset():
    store = clustered(rule="tfjs")
    assert store.forget("pen") == 4
    assert store.counts() == {"cup": 4, "pen": 0, "key": 4}
    assert "pen" in store.classes and len(store) == 8
    assert store.classify(basis(16, 1)).label != "pen"
    store.rename("cup", "mug")
    assert store.counts() == {"mug": 4, "pen": 0, "key": 4}
    assert store.classify(basis(16, 0)).label == "mug"
    with pytest.raises(ValueError, match="already exists"):
        store.rename("mug", "key")
    with pytest.raises(KeyError):
        store.rename("nope", "x")
    with pytest.raises(KeyError):
        store.forget("nope")
    store.reset()
    assert len(store) == 0 and store.counts() == {"mug": 0, "pen": 0, "key": 0}
    assert store.classify(basis(16, 0)).label == UNKNOWN


def test_forget_then_add_again():
    store = clustered(rule="softmax")
    store.classify(basis(16, 0))
    store.forget("cup")
    assert store.classify(basis(16, 0)).label != "cup"
    store.add("cup", basis(16, 0, 0.3, seed=99))
    assert store.counts()["cup"] == 1
    assert store.classify(basis(16, 0)).label == "cup"


def test_capacity_drops_the_oldest_example_with_all_its_views():
    store = KnnStore(8, MODEL, StoreSettings(capacity=2, rule="tfjs"))
    examples = [np.stack([basis(8, i, 0.5, seed=10 * i + v) for v in range(3)]) for i in range(3)]
    for e in examples:
        store.add("a", e)
    store.add("b", basis(8, 7))
    assert store.counts() == {"a": 2, "b": 1}
    assert len(store) == 2 * 3 + 1
    for view in examples[0]:
        assert store.similarities(view).max() < 0.999, "every view of the oldest example went"
    for e in examples[1:]:
        for view in e:
            assert store.similarities(view).max() == pytest.approx(1.0, abs=1e-6)


def test_growth_past_the_preallocated_size_keeps_the_data():
    rng = np.random.default_rng(1)
    vectors = rng.random((300, 8), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for storage in ("float32", "uint8"):
        store = KnnStore(8, MODEL, StoreSettings(storage=storage, rule="nearest", k=1))
        for i, v in enumerate(vectors):
            store.add(f"c{i % 5}", v)
        assert len(store) == 300 and sum(store.counts().values()) == 300
        sims = np.stack([store.similarities(v) for v in vectors])
        np.testing.assert_allclose(np.diag(sims), 1.0, atol=0.01)
        assert (sims.argmax(axis=1) == np.arange(300)).mean() > 0.95


# --- classification ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_unknown_when_empty(rule):
    p = KnnStore(4, MODEL, StoreSettings(rule=rule)).classify(unit(1, 0, 0, 0))
    assert (p.label, p.confidence, p.scores, p.similarity, p.neighbours) == (UNKNOWN, 0.0, {}, 0.0, [])


@pytest.mark.parametrize("rule", RULES)
def test_unknown_below_the_threshold(rule):
    store = KnnStore(4, MODEL, StoreSettings(rule=rule, threshold=0.9, k=1))  # the nearest alone
    store.add("a", unit(1, 0, 0, 0))
    store.add("b", unit(0, 1, 0, 0))
    far = store.classify(unit(1, 1, 1, 1))
    assert far.label == UNKNOWN and far.confidence == 0.0
    # tfjs/nearest: the raw cosine; the view rules: square-rooted and centred on the rows' mean
    # (0.5, 0.5, 0, 0), where the query's offset (0, 0, .5, .5) is orthogonal to both examples'
    assert far.similarity == pytest.approx(0.5 if rule in ("tfjs", "nearest") else 0.0, abs=1e-5)
    assert far.neighbours and set(far.scores) == {"a", "b"}
    near = store.classify(unit(1, 0.1, 0, 0))
    assert near.label == "a" and near.similarity > 0.9


def tie_store(rule: str) -> KnnStore:
    """One row in each of three classes: k=3 gives each one vote; 'c' (the last class) is nearest."""
    store = KnnStore(4, MODEL, StoreSettings(rule=rule, k=3))
    store.add("a", unit(1, 0, 0, 0))
    store.add("b", unit(0, 1, 0, 0))
    store.add("c", unit(0, 0, 1, 0))
    return store


TIE_QUERY = unit(0.5, 0.6, 0.7, 0)


def test_tfjs_rule_gives_a_tie_to_the_lowest_class_index():
    p = tie_store("tfjs").classify(TIE_QUERY)
    assert p.label == "a"
    assert p.scores == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert p.confidence == pytest.approx(1 / 3)


def test_nearest_rule_gives_a_tie_to_the_nearest_row():
    p = tie_store("nearest").classify(TIE_QUERY)
    assert p.label == "c"
    assert [name for name, _ in p.neighbours] == ["c", "b", "a"]
    assert p.similarity == pytest.approx(float(TIE_QUERY[2]))


def test_nearest_rule_never_picks_a_class_with_fewer_votes():
    """k=5 votes a:2, b:2, c:1 with c's single row the nearest: the tie is between a and b only."""
    store = KnnStore(4, MODEL, StoreSettings(rule="nearest", k=5))
    store.add("a", unit(1, 0, 0, 0.1))
    store.add("a", unit(1, 0.1, 0, 0))
    store.add("b", unit(0, 1, 0, 0.1))
    store.add("b", unit(0, 1, 0.1, 0))
    store.add("c", unit(0, 0, 1, 0))
    p = store.classify(unit(0.3, 0.32, 1, 0))
    assert p.neighbours[0][0] == "c"
    assert p.scores == pytest.approx({"a": 0.4, "b": 0.4, "c": 0.2})
    assert p.label == "b", "b's rows are nearer than a's; c has one vote of five"
    assert p.confidence == pytest.approx(0.4)


def test_majority_beats_the_nearest_row():
    store = KnnStore(4, MODEL, StoreSettings(rule="nearest", k=3))
    store.add("a", unit(1, 0, 0, 0))
    store.add("b", unit(0.7, 0.7, 0, 0))
    store.add("b", unit(0.6, 0.8, 0, 0))
    p = store.classify(unit(1, 0.3, 0, 0))
    assert p.neighbours[0][0] == "a" and p.label == "b"
    assert p.scores == pytest.approx({"a": 1 / 3, "b": 2 / 3})


@pytest.mark.parametrize("rule", ["tfjs", "nearest"])
def test_k_is_clipped_to_the_number_of_rows(rule):
    store = KnnStore(4, MODEL, StoreSettings(rule=rule, k=10))
    store.add("a", unit(1, 0, 0, 0))
    store.add("b", unit(0, 1, 0, 0))
    p = store.classify(unit(1, 0.2, 0, 0))
    assert p.scores == pytest.approx({"a": 0.5, "b": 0.5})
    assert len(p.neighbours) == 2
    assert p.neighbours[0][0] == "a" and p.neighbours[0][1] > p.neighbours[1][1]


@pytest.mark.parametrize("rule", RULES)
def test_scores_sum_to_one_over_classes_with_examples(rule):
    store = clustered(rule=rule)
    store.ensure_class("empty")
    for c, name in enumerate(("cup", "pen", "key")):
        p = store.classify(basis(16, c, 0.3, seed=500 + c))
        assert p.label == name
        assert set(p.scores) == {"cup", "pen", "key"}
        assert sum(p.scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.confidence == pytest.approx(p.scores[name]) and p.confidence == max(p.scores.values())
        assert len(p.neighbours) == 3 and p.neighbours[0][0] == name
        assert [s for _, s in p.neighbours] == sorted((s for _, s in p.neighbours), reverse=True)
        sims = [s for _, s in p.neighbours]  # the view rules: the k nearest examples' mean
        assert p.similarity == pytest.approx(np.mean(sims) if rule in VIEW_RULES else sims[0], abs=1e-6)


@pytest.mark.parametrize("rule", ["softmax", "prototype"])
def test_a_class_added_after_classifying_does_not_break_the_fitted_rules(rule):
    store = clustered(rule=rule)
    assert store.classify(basis(16, 0)).label == "cup"
    store.ensure_class("new")
    p = store.classify(basis(16, 1))
    assert p.label == "pen" and "new" not in p.scores


def test_observe_moves_the_centre_but_keeps_answers():
    store = clustered(rule="softmax")
    before = [store.classify(basis(16, c)).label for c in range(3)]
    for i in range(50):
        store.observe(basis(16, i % 16, 0.5, seed=i))
    assert [store.classify(basis(16, c)).label for c in range(3)] == before == ["cup", "pen", "key"]


@needs_data
@pytest.mark.parametrize("rule", ["tfjs", "nearest", "softmax", "prototype"])
def test_real_embeddings_uint8_storage_gives_the_float32_answers(digits, rule):
    f32, u8 = digit_store(digits, rule, "float32"), digit_store(digits, rule, "uint8")
    qs = queries(digits)
    a, b = [f32.classify(q) for q in qs], [u8.classify(q) for q in qs]
    assert [p.label for p in a] == [p.label for p in b]
    np.testing.assert_allclose([p.similarity for p in a], [p.similarity for p in b], atol=0.01)
    accuracy = np.mean(
        [p.label == name for p, name in zip(a, [n for n in digits for _ in range(6)], strict=True)]
    )
    assert accuracy > 0.4, "better than chance (0.25) on real photos"


@needs_data
def test_uint8_rows_are_four_times_smaller(digits):
    f32, u8 = digit_store(digits, "tfjs", "float32"), digit_store(digits, "tfjs", "uint8")
    assert u8._rows.matrix.dtype == np.uint8 and f32._rows.matrix.dtype == np.float32
    assert f32.nbytes == 4 * u8.nbytes
    np.testing.assert_allclose(u8.rows(), f32.rows(), atol=0.01)


# --- files -------------------------------------------------------------------------------------------------


def answers(store: KnnStore, qs) -> list[tuple[str, dict]]:
    return [(p.label, p.scores) for p in map(store.classify, qs)]


@needs_data
@pytest.mark.parametrize("storage", ["float32", "uint8"])
@pytest.mark.parametrize("rule", ["tfjs", "softmax"])
def test_round_trip_keeps_everything(tmp_path, digits, storage, rule):
    store = digit_store(digits, rule, storage, threshold=None)  # the calibrated unknown answer too
    store.ensure_class("empty")
    store.observe(digits["0"][9])
    path = tmp_path / "store.npz"
    store.save(path)
    loaded = KnnStore.load(path, MODEL, StoreSettings(rule=rule))
    assert loaded.storage == storage and loaded.dim == 256 and loaded.model_id == MODEL
    assert loaded.classes == store.classes == ["0", "3", "5", "7", "empty"]
    assert loaded.counts() == store.counts()
    assert len(loaded) == len(store) == 16
    np.testing.assert_array_equal(loaded._rows.matrix[: len(loaded)], store._rows.matrix[: len(store)])
    fresh = [KnnStore.load(path, MODEL, StoreSettings(rule=rule)) for _ in range(2)]
    qs = queries(digits)
    assert answers(fresh[0], qs) == answers(fresh[1], qs)
    a, b = answers(store, qs), answers(loaded, qs)
    assert [x[0] for x in a] == [x[0] for x in b]
    if rule == "tfjs":
        assert a == b
    loaded.add("7", digits["7"][9])
    assert loaded.counts()["7"] == 5


def test_round_trip_of_an_empty_store(tmp_path):
    store = KnnStore(8, MODEL)
    path = tmp_path / "s.npz"
    store.save(path)
    loaded = KnnStore.load(path, MODEL)
    assert len(loaded) == 0 and loaded.classes == [] and loaded.dim == 8
    assert loaded.classify(basis(8, 0)).label == UNKNOWN


@needs_data
def test_load_may_convert_the_storage(tmp_path, digits):
    path = tmp_path / "s.npz"
    digit_store(digits, "tfjs", "float32").save(path)
    as_u8 = KnnStore.load(path, MODEL, StoreSettings(rule="tfjs", storage="uint8"))
    assert as_u8.storage == "uint8" and as_u8._rows.matrix.dtype == np.uint8
    qs = queries(digits)
    assert [p.label for p in map(as_u8.classify, qs)] == [
        p.label for p in map(KnnStore.load(path, MODEL, StoreSettings(rule="tfjs")).classify, qs)
    ]


def test_save_leaves_no_temporary_file_and_creates_the_folder(tmp_path):
    path = tmp_path / "state" / "store.npz"
    clustered().save(path)
    clustered(rule="tfjs").save(path)  # over an existing file
    assert os.listdir(path.parent) == ["store.npz"]


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    from edgeknn.store import file as storefile

    path = tmp_path / "store.npz"
    old = clustered(rule="tfjs")
    old.save(path)
    before = path.read_bytes()

    def broken_write(file, arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storefile, "_write_npz", broken_write)
    bigger = clustered(rule="tfjs")
    bigger.add("new", basis(16, 9))
    with pytest.raises(OSError, match="No space left"):
        bigger.save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["store.npz"], "no temporary file left behind"
    assert path.read_bytes() == before
    assert KnnStore.load(path, MODEL).counts() == old.counts()


def corrupt_error(path: Path) -> StoreError:
    with pytest.raises(StoreError) as info:
        KnnStore.load(path, MODEL)
    assert info.value.corrupt is True
    assert str(path) in str(info.value)
    return info.value


def test_random_bytes(tmp_path):
    path = tmp_path / "store.npz"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    corrupt_error(path)


def test_empty_file(tmp_path):
    path = tmp_path / "store.npz"
    path.write_bytes(b"")
    corrupt_error(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "store.npz"
    clustered().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    corrupt_error(path)


def resave(path: Path, arrays: dict, checksum: bool = True) -> None:
    arrays = dict(arrays)
    if checksum:
        arrays.pop("checksum", None)
        arrays["checksum"] = np.array(_checksum(arrays))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def arrays_of(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def test_edited_array_fails_the_checksum(tmp_path):
    path = tmp_path / "store.npz"
    clustered().save(path)
    arrays = arrays_of(path)
    arrays["rows"] = arrays["rows"].copy()
    arrays["rows"][0, 0] += 0.5
    resave(path, arrays, checksum=False)
    assert "checksum mismatch" in str(corrupt_error(path))


def test_edited_labels_fail_the_checksum(tmp_path):
    path = tmp_path / "store.npz"
    clustered().save(path)
    arrays = arrays_of(path)
    arrays["classes"] = np.array(["cup", "pen", "car"])
    resave(path, arrays, checksum=False)
    assert "checksum mismatch" in str(corrupt_error(path))


@pytest.mark.parametrize("missing", ["rows", "checksum", "model_id"])
def test_missing_arrays(tmp_path, missing):
    path = tmp_path / "store.npz"
    clustered().save(path)
    arrays = arrays_of(path)
    del arrays[missing]
    resave(path, arrays, checksum=False)
    assert "not an edgeknn store" in str(corrupt_error(path))


def test_a_plain_npz_is_not_a_store(tmp_path):
    path = tmp_path / "store.npz"
    np.savez(path, x=np.arange(3))
    assert "not an edgeknn store" in str(corrupt_error(path))


def test_another_model_is_refused_naming_both(tmp_path):
    path = tmp_path / "store.npz"
    clustered().save(path)
    with pytest.raises(StoreError) as info:
        KnnStore.load(path, OTHER)
    message = str(info.value)
    assert info.value.corrupt is False
    assert str(path) in message and MODEL[:12] in message and OTHER[:12] in message


class Bomb:
    """Unpickling this creates a file: the proof that a store was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickled_object_array_is_refused_and_never_unpickled(tmp_path):
    path = tmp_path / "store.npz"
    marker = tmp_path / "unpickled"
    clustered().save(path)
    arrays = arrays_of(path)
    arrays["classes"] = np.array([Bomb(marker)], dtype=object)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    np.load(path, allow_pickle=True)["classes"]  # the bomb works when unpickled ...
    assert marker.exists()
    marker.unlink()
    error = corrupt_error(path)  # ... and the store never unpickles it
    assert "pickle" in str(error)
    assert not marker.exists()


def test_format_version_mismatch(tmp_path):
    path = tmp_path / "store.npz"
    clustered().save(path)
    arrays = arrays_of(path)
    arrays["format_version"] = np.array(FORMAT_VERSION + 1)
    resave(path, arrays)
    with pytest.raises(StoreError) as info:
        KnnStore.load(path, MODEL)
    assert str(info.value) == f"{path}: store format {FORMAT_VERSION + 1}, expected {FORMAT_VERSION}"


def test_missing_store_file(tmp_path):
    path = tmp_path / "store.npz"
    with pytest.raises(StoreError) as info:
        KnnStore.load(path, MODEL)
    assert str(info.value) == f"{path}: store file not found"
    assert info.value.corrupt is False


def test_a_loaded_store_grows_when_taught_more(tmp_path):
    store = KnnStore(16, MODEL, StoreSettings(capacity=1000))
    for j in range(100):
        store.add(("cup", "pen")[j % 2], basis(16, j % 2, 0.3, seed=j))
    store.save(tmp_path / "s.npz")
    loaded = KnnStore.load(tmp_path / "s.npz", MODEL, StoreSettings(capacity=1000))
    for j in range(100, 400):
        loaded.add(("cup", "pen")[j % 2], basis(16, j % 2, 0.3, seed=j))
        store.add(("cup", "pen")[j % 2], basis(16, j % 2, 0.3, seed=j))
    assert loaded.counts() == store.counts() == {"cup": 200, "pen": 200}
    np.testing.assert_array_equal(loaded.rows(), store.rows())


def test_the_file_is_a_plain_npz_that_numpy_reads_and_an_np_savez_file_loads(tmp_path):
    store = clustered(rule="tfjs")
    store.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    assert arrays["seen"].shape == () and arrays["rows"].shape == (12, 16)
    np.testing.assert_array_equal(arrays["rows"], store.rows())
    np.savez(tmp_path / "by-numpy.npz", **arrays)  # as stores were written before
    again = KnnStore.load(tmp_path / "by-numpy.npz", MODEL)
    assert again.counts() == store.counts()
    np.testing.assert_array_equal(again.rows(), store.rows())


def test_fit_now_fits_a_due_head_once_and_leaves_the_rest_alone():
    store = clustered()
    store.fit()
    head = store._head.fitted
    assert head is not None and not store._head.stale
    store.fit()
    store.classify(basis(16, 0, 0.3, seed=77))
    assert store._head.fitted is head, "nothing was due: no refit"
    empty, votes = KnnStore(16, MODEL), clustered(rule="tfjs")
    empty.fit()
    votes.fit()
    assert empty._head.fitted is None and votes._head.fitted is None

"""Issue 20, finding 3: a change's refit runs beside the frame loop, which goes on classifying meanwhile.

The head's fit is held on an event here, so that what the loop does during a refit is seen for
certain (no timing): classify answers at once with the previous fit and the current index, and
changes meanwhile coalesce into one more fit.
"""

from __future__ import annotations

import threading

import numpy as np
from rig import Running, Scene, digit_folders, wait_for
from test_daemon import make_config

from edgeknn.commands import AddExample, DeleteExample, Result
from edgeknn.device.build import build
from edgeknn.store import head as head_module
from edgeknn.store.knn import KnnStore, StoreSettings

DIM = 32


def taught(examples: int = 40) -> KnnStore:
    """A store of three classes, ``examples`` examples each (two views), fitted."""
    rng = np.random.default_rng(5)
    store = KnnStore(DIM, "test-model", StoreSettings(capacity=1000))
    for i in range(3 * examples):
        centre = np.zeros(DIM, np.float32)
        centre[i % 3] = 3.0
        store.add(f"c{i % 3}", np.abs(centre + rng.standard_normal((2, DIM))), added=1000.0 + i)
    store.fit()
    return store


class HeldFits:
    """``_fit_softmax`` as is, but a fit beside the loop waits for ``release`` first; records threads."""

    def __init__(self, monkeypatch):
        self.release = threading.Event()
        self.threads: list[str] = []
        real = head_module._fit_softmax

        def fit(*args):
            self.threads.append(threading.current_thread().name)
            if threading.current_thread() is not threading.main_thread():
                assert self.release.wait(60), "the test never released the fit"
            return real(*args)

        monkeypatch.setattr(head_module, "_fit_softmax", fit)


def test_classify_during_a_refit_answers_at_once_without_the_deleted_example(monkeypatch):
    from edgeknn.store import refit

    store = taught()
    refitter = refit.beside(store)
    held = HeldFits(monkeypatch)
    before = store._head.fitted
    gone = store.examples("c1")[0].id
    query = store.rows(np.flatnonzero(store.example_ids() == gone)[:1])[0]
    store.delete_example(gone)
    prediction = store.classify(query)  # returns although the fit it started is held
    assert refitter.running and wait_for(lambda: held.threads == ["edgeknn-refit"])
    assert store._head.fitted is not None and store._head.fitted.weights is before.weights  # the previous fit
    assert prediction.neighbours and gone not in store.example_ids()[store._index.first]
    assert len(store._index) == len(store.examples())  # the index is current: one row per example
    held.release.set()
    assert wait_for(lambda: (store.classify(query), refitter.fits == 1)[1], 30)
    assert store._head.fitted.weights is not before.weights
    assert "MainThread" not in held.threads  # nothing was fitted on the classifying thread


def test_changes_during_a_refit_coalesce_into_one_more(monkeypatch):
    from edgeknn.store import refit

    store = taught()
    refitter = refit.beside(store)
    held = HeldFits(monkeypatch)
    query = store.rows(slice(0, 1))[0]
    for example in store.examples("c0")[:3]:  # three deletes while the first refit is held
        store.delete_example(example.id)
        store.classify(query)
    assert wait_for(lambda: held.threads == ["edgeknn-refit"])
    held.release.set()
    assert wait_for(lambda: (store.classify(query), refitter.fits == 2)[1], 30)
    assert wait_for(lambda: (store.classify(query), not refitter.running)[1], 30)
    assert refitter.fits == 2 and held.threads == ["edgeknn-refit"] * 2 and not store._head.stale


def test_a_class_left_without_examples_never_wins_during_a_refit(monkeypatch):
    from edgeknn.store import refit

    store = taught(10)
    refit.beside(store)
    held = HeldFits(monkeypatch)
    query = store.rows(np.flatnonzero(store.labels() == 2)[:1])[0]
    assert store.classify(query).label == "c2"
    store.forget("c2")
    prediction = store.classify(query)
    assert prediction.label != "c2" and "c2" not in prediction.scores
    assert all(name != "c2" for name, _ in prediction.neighbours)
    held.release.set()


def test_the_index_after_removals_is_the_one_built_anew():
    """A removal drops its examples from the index (``ExampleIndex.compacted``): the same nearest
    examples as an index built from scratch on the rows left."""
    store = taught(80)
    for example in store.examples()[5:200:7]:
        store.delete_example(example.id)
    store.forget("c1")
    query = store.rows(slice(3, 4))[0]
    kept = store.classify(query)
    first = np.unique(store.example_ids(), return_index=True)[1]
    assert np.array_equal(store._index.first, first)
    store._index.clear()
    store._head.stale = True  # the next classify indexes every example again
    anew = store.classify(query)
    assert kept.neighbours and [n for n, _ in kept.neighbours] == [n for n, _ in anew.neighbours]
    np.testing.assert_allclose([s for _, s in kept.neighbours], [s for _, s in anew.neighbours], atol=1e-5)


def test_the_loop_fits_no_head_after_a_delete(tmp_path, monkeypatch):
    """The daemon's loop thread never fits the head for a delete: it runs beside (today: on the loop,
    0.2 s of CPU per delete at 3 000 examples, tens of seconds under load: no prediction, no WATCHDOG)."""
    cfg = make_config(tmp_path, **{"panel.kind": "none"})
    run = Running(build(cfg, opener=Scene(digit_folders()).opener))
    results: list[Result] = []
    try:
        d = run.daemon
        assert wait_for(lambda: d.frames_classified > 2)
        for name in ("1", "2"):
            d.submit(AddExample(class_name=name, count=3, source="test", reply=results.append))
        assert wait_for(lambda: len(results) == 2, 120) and all(r.ok for r in results)
        assert run.classified(3)
        threads: list[str] = []
        real = head_module._fit_softmax

        def fit(*args):
            threads.append(threading.current_thread().name)
            return real(*args)

        monkeypatch.setattr(head_module, "_fit_softmax", fit)
        example = d.store.examples("1")[0].id
        d.submit(DeleteExample(example=example, source="test", reply=results.append))
        assert wait_for(lambda: len(results) == 3, 60) and results[2].ok, results
        assert wait_for(lambda: threads, 60), "no refit after the delete"
        assert run.classified(3)
        assert threads and run.thread.name not in threads, threads
    finally:
        run.stop()


def test_a_class_removed_and_one_added_during_a_refit_keep_the_columns_by_name(monkeypatch):
    """The slots moved: the fit's columns follow the classes' names (a new class has none and cannot
    win until a fit of its own), so nothing is fitted on the classifying thread; the refit running
    for the old classes is taken in the same way, then one more fits the new classes beside it."""
    from edgeknn.store import refit

    store = taught(10)
    refitter = refit.beside(store)
    held = HeldFits(monkeypatch)
    query = store.rows(np.flatnonzero(store.labels() == 2)[:1])[0]
    store.delete_example(store.examples("c0")[0].id)
    store.classify(query)  # a refit starts, held, for c0 c1 c2
    store.remove_class("c1")
    store.add_class("c9")  # as many classes, other slots: c2 is slot 1 now
    store.rename("c0", "zero")
    prediction = store.classify(query)
    assert prediction.label == "c2" and set(prediction.scores) == {"zero", "c2"}  # at once
    assert store._head.fitted is not None and store._head.fitted.weights.shape == (DIM, 3)
    assert wait_for(lambda: held.threads == ["edgeknn-refit"]), "nothing fitted here"
    store.add("c9", store.rows(np.flatnonzero(store.labels() == 1)[:2]) + 0.01)
    assert store.classify(query).label == "c2"
    held.release.set()
    assert wait_for(lambda: (store.classify(query), refitter.fits == 2)[1], 30)
    assert held.threads == ["edgeknn-refit"] * 2 and "MainThread" not in held.threads
    assert store._matcher._fitted_for == ("zero", "c2", "c9") and store._head.fitted.present.all()


def test_the_first_fit_of_a_large_import_runs_beside(monkeypatch):
    """An import into an empty store (here: 600 rows added at once): the nearest examples vote until
    the first fit, which runs beside the loop, is in."""
    from edgeknn.store import refit

    source = taught(100)
    store = KnnStore(DIM, "test-model", StoreSettings(capacity=1000))
    refitter = refit.beside(store)
    held = HeldFits(monkeypatch)
    for example in source.examples():
        store.add(example.class_name, source.rows(source.example_ids() == example.id), added=example.added)
    query = source.rows(np.flatnonzero(source.labels() == 1)[:1])[0]
    prediction = store.classify(query)
    assert prediction.label == "c1" and prediction.scores["c1"] == 1.0  # the three nearest examples' vote
    assert store._head.fitted is None and refitter.running and wait_for(lambda: held.threads)
    held.release.set()
    assert wait_for(lambda: (store.classify(query), refitter.fits == 1)[1], 30)
    assert store._head.fitted is not None and store.classify(query).label == "c1"
    assert "MainThread" not in held.threads


def test_a_refit_that_fails_is_said_and_the_change_fitted_here(monkeypatch, caplog):
    from edgeknn.store import refit

    store = taught(10)
    refitter = refit.beside(store)
    before = store._head.fitted
    real = head_module.fit_head

    def broken(*args):
        if threading.current_thread() is not threading.main_thread():
            raise MemoryError("no room for the fit")
        return real(*args)

    monkeypatch.setattr(head_module, "fit_head", broken)
    query = store.rows(slice(0, 1))[0]
    store.delete_example(store.examples("c0")[0].id)
    store.classify(query)
    assert refitter.wait(30) and refitter.failed
    assert store.classify(query).label == "c0"
    assert store._head.fitted is not None and store._head.fitted.weights is not before.weights  # fitted here
    assert "refitting the head beside the loop failed" in caplog.text


def test_classes_taught_one_after_another_are_each_answered_as_themselves():
    """A device's classes exist before they have examples (``classes`` in its config). The first fit
    then had one class with examples, which pushed the others' weights down; later fits started
    from it (30 steps), and the classes taught second and third stayed under the first: their own
    examples were answered as another class (a device at 60-70 % on photos its followers, fitted
    once on the same examples, answered at 90-95 %). A fit now starts afresh when a class gains or
    loses its examples, and a class without examples is left out of the fit."""
    from edgeknn.store import refit

    rng = np.random.default_rng(3)
    store = KnnStore(DIM, "test-model", StoreSettings(capacity=1000))
    for name in ("c0", "c1", "c2"):
        store.add_class(name)
    refitter = refit.beside(store)

    def frame(c: int) -> np.ndarray:
        centre = np.full(DIM, 0.5, np.float32)
        centre[8 * c : 8 * c + 8] = 2.0
        return np.abs(centre + 0.3 * rng.standard_normal(DIM)).astype(np.float32)

    def head_answer(c: int) -> str:
        scores = store.classify(frame(c)).scores  # the head's, whatever the unknown answer
        return max(scores, key=scores.__getitem__)

    for c in range(3):
        for _ in range(5):
            store.classify(frame(c))  # the frames between, as the loop: refits start and are taken
            store.add(f"c{c}", np.stack([frame(c), frame(c)]), added=1000.0 + c)
            assert refitter.wait(30)
    store.classify(frame(0))
    assert refitter.wait(30)
    store.classify(frame(0))  # the last refit taken
    answers = [[head_answer(c) for _ in range(20)] for c in range(3)]
    assert all(a == [f"c{c}"] * 20 for c, a in enumerate(answers)), answers

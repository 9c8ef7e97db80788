"""The classifier head on its own: the closed-form per-frame probabilities and the bounded fit sample."""

from __future__ import annotations

import numpy as np
import pytest
from test_store import MODEL, basis

from edgeknn.store import head as head_module
from edgeknn.store.head import Head, fit_sample
from edgeknn.store.knn import KnnStore, StoreSettings


def test_the_per_frame_head_equals_the_features_written_out():
    """The closed form of ``Head.probabilities`` gives the head's softmax over q = unit(s - c)."""
    head = Head("softmax", 16)
    for i in range(20):
        head.observe(basis(16, i % 3, 0.5, seed=100 + i))
    rows = np.stack([basis(16, c, 0.3, seed=10 * c + j) for c in range(3) for j in range(4)])
    head.fit(rows, np.repeat(np.arange(3), 4), np.ones(3, bool))
    query = basis(16, 1, 0.4, seed=7)
    probs = head.probabilities(query)
    fit = head.fitted
    assert fit is not None
    s = np.sqrt(query) / np.linalg.norm(np.sqrt(query))
    q = (s - fit.center) / np.linalg.norm(s - fit.center)
    logits = 10.0 * (q @ fit.weights) + fit.bias
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_a_big_store_fits_its_head_on_a_bounded_sample_of_every_class_and_the_newest(monkeypatch):
    monkeypatch.setattr(head_module, "_FIT_ROWS", 60)
    store = KnnStore(16, MODEL, StoreSettings(capacity=1000))
    for j in range(90):  # class "cup" holds 90 examples, "pen" 10
        store.add("cup", basis(16, 0, 0.3, seed=j))
    for j in range(10):
        store.add("pen", basis(16, 1, 0.3, seed=500 + j))
    store.add("cup", basis(16, 0, 0.3, seed=999))  # the newest example, in the last row
    rows = fit_sample(store.labels(), store.example_ids(), len(store.classes))
    labels = store.labels()[rows]
    assert len(labels) <= 60
    assert np.count_nonzero(labels == 1) == 10  # a small class keeps all its rows
    assert np.count_nonzero(labels == 0) == 30  # a big one its share
    assert len(store) - 1 in rows
    assert store.classify(basis(16, 1, 0.3, seed=1234)).label == "pen"
    assert store.classify(basis(16, 0, 0.3, seed=1235)).label == "cup"


def test_an_unfitted_head_says_so():
    with pytest.raises(RuntimeError, match="not been fitted"):
        Head("softmax", 4).probabilities(np.ones(4, np.float32))


@pytest.mark.parametrize("numpy_has_vecdot", [True, False])
def test_row_dots_on_numpy_with_and_without_vecdot(monkeypatch, numpy_has_vecdot):
    """Bookworm's numpy 1.24 has no ``np.vecdot``: the einsum path must give the same dots, for one
    query against every row and for each row against itself (its norm). The second crashed there."""
    if not numpy_has_vecdot:
        monkeypatch.setattr(head_module, "_vecdot", None)
    elif head_module._vecdot is None:
        pytest.skip("this numpy has no vecdot (the other case covers it)")
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 16)).astype(np.float32)
    q = rng.standard_normal(16).astype(np.float32)
    np.testing.assert_allclose(head_module.rowdot(rows, q), rows @ q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head_module.rowdot(rows, rows), (rows * rows).sum(axis=1), rtol=1e-5)
    out = np.empty(50, np.float32)
    head_module.rowdot(rows, q, out=out)
    np.testing.assert_allclose(out, rows @ q, rtol=1e-5, atol=1e-5)


def test_a_store_with_examples_classifies_without_vecdot(monkeypatch):
    """The crash seen on Bookworm: the first taught example, then a prediction."""
    monkeypatch.setattr(head_module, "_vecdot", None)
    store = KnnStore(16, MODEL, StoreSettings(rule="softmax"))
    for c in range(3):
        store.add(f"c{c}", np.stack([basis(16, c, 0.3, seed=10 * c + j) for j in range(6)]))
    store.fit()
    assert store.classify(basis(16, 1, 0.3, seed=99)).label == "c1"

"""What the k-NN store costs: classify and add at 1 000 to 100 000 rows, the head's fit, uint8 vs
float32, and how often the per-frame scan (``scan.py``) answers as a full scan does."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgeknn import config
from edgeknn.bench.inputs import Plan, median_us, random_rows, random_store, unbounded_store
from edgeknn.imagefiles import find_images, load_rgb
from edgeknn.model.embedder import Embedder
from edgeknn.store.head import DEFAULT_RULE, VIEW_RULES
from edgeknn.store.knn import KnnStore
from edgeknn.store.names import UNKNOWN

KNN_SIZES = (1000, 10_000, 100_000)
ADD_SIZES = (1000, 10_000)


VIEWS = 6  # rows per example the view rules store (the frame, its mirror, four corners)


def knn(embedder: Embedder, cfg: config.Config, plan: Plan, results: dict[str, float]) -> None:
    """Classify over 1 000 / 10 000 / 100 000 rows for each storage; add at 1 000 and 10 000."""
    for storage in ("float32", "uint8"):
        knn_storage(embedder, cfg, plan, storage, results)
    results["add_us"] = results["add_us_10000"]


def knn_storage(
    embedder: Embedder, cfg: config.Config, plan: Plan, storage: str, results: dict[str, float]
) -> None:
    """One storage: ``knn_us``: the configured rule's classify, what a frame costs the loop (the
    default rule: its head, plus the nearest examples from ``scan.py``'s index), on a store of
    examples of six views each for the view rules (a nearby random row per view); ``knn_full_us``:
    one pass over every row, which the k-NN vote (tfjs, nearest) makes and the index avoids."""
    queries = next(random_rows(plan.queries, embedder.dim, seed=99))[1]
    rule = DEFAULT_RULE if cfg.store.rule == "default" else cfg.store.rule
    store = unbounded_store(embedder, cfg, rule, storage)
    views = VIEWS if rule in VIEW_RULES else 1
    classes = list(cfg.classes)
    suffix = "" if storage == "float32" else "_uint8"
    for size in KNN_SIZES:
        for _, rows in random_rows((size - len(store)) // views, embedder.dim, seed=size):
            for row in rows:
                store.add(classes[len(store) % len(classes)], _views_of(row, views))
        store.classify(queries[0])  # the fit and the index's update after the adds: not per frame
        results[f"knn_us{suffix}_{size}"] = median_us(store.classify, queries)
        results[f"knn_full_us{suffix}_{size}"] = median_us(store.similarities, queries)
        if size in ADD_SIZES:  # after the k-NN timing: these adds grow the store a little
            extra = [
                _views_of(row, views) for row in next(random_rows(plan.adds, embedder.dim, seed=size + 1))[1]
            ]
            results[f"add_us{suffix}_{size}"] = median_us(lambda row: store.add(classes[0], row), extra)
            if storage == "float32":  # a full class: each add replaces the class's oldest example
                store.capacity = min(store.counts().values())
                results[f"add_full_us_{size}"] = median_us(lambda row: store.add(classes[1], row), extra)
                store.capacity = 10**9
    results[f"store_mb{suffix}_{max(KNN_SIZES)}"] = store.nbytes / 2**20


def _views_of(row: np.ndarray, views: int) -> np.ndarray:
    """``views`` rows near ``row`` (the views of one example are alike), non-negative and unit."""
    if views == 1:
        return row
    noise = np.random.default_rng(int(row[0] * 1e6)).random((views, len(row)), dtype=np.float32)
    out = row + 0.5 * noise / np.sqrt(len(row))
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def fit(embedder: Embedder, cfg: config.Config, plan: Plan, results: dict[str, float]) -> None:
    """The configured rule's head (softmax, prototype): its fit at the first frame and its refit
    after an added example, both inside ``classify``; the rules without a head have neither."""
    if cfg.store.rule not in ("default", *VIEW_RULES):
        return
    for size in ADD_SIZES if not plan.quick else ADD_SIZES[:1]:
        store = random_store(embedder, cfg, size, seed=5)
        vector = next(random_rows(1, embedder.dim, seed=6))[1][0]
        store.observe(vector)
        t = time.perf_counter()
        store.classify(vector)
        results[f"fit_ms_{size}"] = (time.perf_counter() - t) * 1000
        store.add(cfg.classes[0], vector)
        t = time.perf_counter()
        store.classify(vector)
        results[f"refit_ms_{size}"] = (time.perf_counter() - t) * 1000


def agreement(
    embedder: Embedder, cfg: config.Config, frames: Path, plan: Plan, results: dict[str, float]
) -> None:
    """Real photos: about half are examples (class = folder), the rest are asked; uint8 vs float32.

    ``uint8_agreement``: answers of the configured rule alike; ``uint8_agreement_knn``: of the k-NN
    vote. ``scan_agreement`` / ``scan_unknown_agreement`` (``_uint8``): answers, and unknown or not,
    of the configured rule alike with its per-frame index and with a scan of every example.
    """
    files = find_images(frames)
    rng = np.random.default_rng(3)
    chosen = [files[i] for i in sorted(rng.choice(len(files), min(plan.photos, len(files)), replace=False))]
    vectors = np.stack([embedder.embed(load_rgb(f, 2 * max(embedder.model.input_size))) for f in chosen])
    labels = [f.parent.name for f in chosen]
    teach = rng.random(len(chosen)) < 0.5
    for key, rule in (("uint8_agreement", cfg.store.rule), ("uint8_agreement_knn", "tfjs")):
        answers = {}
        for storage in ("float32", "uint8"):
            store = unbounded_store(embedder, cfg, rule, storage)
            for vector, label in zip(vectors[teach], np.array(labels)[teach], strict=True):
                store.add(str(label), vector)
            answers[storage] = [store.classify(v).label for v in vectors[~teach]]
            if key == "uint8_agreement":
                scan_agreement(store, vectors[~teach], answers[storage], results)
        same = [a == b for a, b in zip(answers["float32"], answers["uint8"], strict=True)]
        results[key] = sum(same) / max(1, len(same))
    results["agreement_photos"] = int((~teach).sum())


def scan_agreement(
    store: KnnStore, queries: np.ndarray, answers: list[str], results: dict[str, float]
) -> None:
    """How often the store's answers (``answers``, with its index) are those of a scan of every example."""
    store.full_scan = True
    full = [store.classify(v).label for v in queries]
    store.full_scan = False
    suffix = "" if store.storage == "float32" else "_uint8"
    n = max(1, len(full))
    results[f"scan_agreement{suffix}"] = sum(a == b for a, b in zip(answers, full, strict=True)) / n
    unknown = [(a == UNKNOWN) == (b == UNKNOWN) for a, b in zip(answers, full, strict=True)]
    results[f"scan_unknown_agreement{suffix}"] = sum(unknown) / n

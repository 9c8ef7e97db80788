#!/usr/bin/env python3
"""Issue 22: other unknown scores on the device's own embeddings, against its `similarity`.

The draws, the taught classes and the store are `edgeknn eval --open-set`'s (same seeds, same
`teach`), and the photos come from its embedding cache (run `edgeknn eval` on the model first, or
this embeds them). Per seed and scenario each score is computed in the device's space (square-rooted,
centred on the centre the store holds) and compared on the queries of taught and untaught classes:

- its AUROC (taught against untaught photos), and its difference to `similarity`'s on the same
  draw (mean [min, max], and on how many draws it is higher);
- `rej`/`kept` with the device's own calibration for that score (scan.py's rule: each example
  scored against its class's others, 20th percentile less 0.5 / examples, floored by the near
  misses), i.e. what a device would get;
- `rej@kept`: the share of untaught photos turned away when every draw's calibrated threshold is
  moved by the one offset that keeps `--kept` (0.93) of the right answers on average: the scores
  compared at one operating point (as the second round's table in docs/classifying.md).

`--own` / `--near`: other quantiles for that calibration (every score but the device's own
`similarity` row, so `similarity (own calibration)` shows what they do to the device's score).

A right answer is the store's head's answer to the query's single frame (what changes here is the
unknown score, not the head), so `kept` is the share of those still answered.

The scores:

- `similarity`: the device's (mean cosine to the 3 nearest examples' frames); checked against
  `KnnStore.classify` on every query;
- `ex-views`: the same, each example represented by the mean of its six stored views (no extra
  invoke on the device);
- `tta-2` / `tta-3` / `tta-6`: every frame (seen, example, query) embedded as the mean of 2 views
  (it and its mirror), of 3 (it and two opposite corners at 80 %) or of all six (it, the mirror and
  the four corners): 2x / 3x / 6x the invokes per frame;
- `rel-B`: `similarity` - B x the mean cosine to the 3 nearest frames the device has seen (the seen
  photos and the examples' frames), in two settings: `seen` (as eval: the seen photos include
  photos of the untaught classes, the place the device works in) and `novel` (a query's untaught
  class was never seen: its seen photos are left out of the frames it is compared with).

`--also M2`: every score on the two models' features side by side (two invokes per frame), with
`--model alone` (the first model's `similarity` on the same draw), which the paired differences
are then taken against.

    python scripts/measure_openscore.py --classes 0,1,2,3,4 --seeds 20 [--model M] [--also M2] [--shots 5,10]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeknn.cli.evaluate import auroc, default_cache, draw, taught_counts, teach  # noqa: E402
from edgeknn.cli.photoset import Dataset, load_dataset, only  # noqa: E402
from edgeknn.model.embedder import Embedder  # noqa: E402
from edgeknn.store.names import UNKNOWN  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sign_language_digits"
MODEL = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "mobilenet_v1_0.75_192_quant.tflite"
)
K = 3
OWN, NEAR = [0.2], [0.55]  # scan.py's quantiles (own class, near misses); --own / --near for the other scores


def feats(x: np.ndarray) -> np.ndarray:
    """The head's features before centring: square-rooted, unit rows."""
    s = np.sqrt(np.maximum(np.asarray(x, np.float64), 0))
    return s / np.maximum(np.linalg.norm(s, axis=-1, keepdims=True), 1e-12)


def centred(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    y = feats(x) - c
    return y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)


def mean_top(sims: np.ndarray, k: int = K) -> np.ndarray:
    k = min(k, sims.shape[1])
    return -np.sort(-sims, axis=1)[:, :k].mean(axis=1)


def calibrated(ex: np.ndarray, labels: np.ndarray, less: np.ndarray | float = 0.0) -> float:
    """scan.py's threshold, every example a moment of its own (as eval teaches them); ``less``: what
    each example's score loses (a relative score's second term, measured for the example)."""
    sims = ex @ ex.T
    np.fill_diagonal(sims, -np.inf)
    same = labels[:, None] == labels[None, :]
    alike = mean_top(np.where(same, sims, -np.inf)) - less
    measured = alike[np.isfinite(alike)]
    value = float(np.quantile(measured, OWN[0])) - 0.5 / len(measured)
    if len(np.unique(labels)) >= 2:
        value = max(value, float(np.quantile(mean_top(np.where(same, -np.inf, sims)) - less, NEAR[0])))
    return value


def rates(runs: list[tuple], offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per run, the untaught photos turned away and the taught ones answered right that are kept,
    with each run's calibrated threshold moved by ``offset``."""
    rej, kept = [], []
    for score, taught, right, thr in runs:
        rej.append(float((score < thr + offset)[~taught].mean()))
        kept.append(float((right & (score >= thr + offset))[taught].sum() / max(right[taught].sum(), 1)))
    return np.array(rej), np.array(kept)


def at_kept(runs: list[tuple], kept: float) -> float:
    """The mean share of untaught photos turned away at the one offset of the calibrated thresholds
    that keeps ``kept`` of the right answers on average (bisection: kept falls as the offset rises)."""
    lo, hi = -2.0, 2.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rates(runs, mid)[1].mean() >= kept else (lo, mid)
    return float(rates(runs, lo)[0].mean())


def joined(first: Dataset, second: Dataset) -> Dataset:
    """Two models' embeddings of the same photos as one: each model's head features (square-rooted,
    unit) side by side, scaled so the store's own square root and unit length give exactly them."""

    def part(x: np.ndarray) -> np.ndarray:
        return feats(x) ** 2 / 2  # sqrt of this: the model's unit features / sqrt(2)

    return Dataset(
        first.classes,
        first.files,
        first.labels,
        np.concatenate([part(first.vectors), part(second.vectors)], -1).astype(np.float32),
        np.concatenate([part(first.views), part(second.views)], -1).astype(np.float32),
    )


def taught_stores(data: Dataset, shots: int, seeds: int) -> Iterator[tuple]:
    """eval --open-set's draws: per seed and scenario (1, 2, half taught) ``(seed, scenario, draw,
    taught classes, the store taught them, its predictions for the queries, and their closed-set
    labels: an unknown answer's best score)``, the same for every issue-22 measurement."""
    n_classes = len(data.classes)
    for seed in range(seeds):
        d = draw(data.labels, n_classes, shots, 10, np.random.default_rng(seed))
        for name, count in taught_counts(n_classes).items():
            chosen = np.random.default_rng([seed, count]).permutation(n_classes)[:count]
            taught = sorted(int(c) for c in chosen)
            store = teach(data, d, taught, "softmax", K)
            preds = [store.classify(data.vectors[i]) for i in d.query]
            closed = np.array(
                [p.label if p.label != UNKNOWN else max(p.scores, key=p.scores.__getitem__) for p in preds]
            )
            yield seed, name, d, taught, store, preds, closed


def run(
    data, shots: int, seeds: int, betas: list[float], alone: Dataset | None = None
) -> dict[str, dict[str, list]]:
    n_classes = len(data.classes)
    out: dict[str, dict[str, list]] = {}
    v = data.views.astype(np.float64)
    frames = {
        "similarity": v[:, 0],
        "ex-views": v[:, 0],
        "tta-2": v[:, :2].mean(1),
        "tta-3": v[:, [0, 2, 5]].mean(1),
        "tta-6": v.mean(1),
    }
    for _, name, d, taught, store, preds, closed in taught_stores(data, shots, seeds):
        truth = data.labels[d.query]
        is_taught = np.isin(truth, taught)
        right = closed == np.array(data.classes)[truth]
        support = np.concatenate([d.support[c] for c in taught])
        ex_labels = data.labels[support]
        seen_idx = np.concatenate([d.seen[c] for c in range(n_classes)])
        observed = np.concatenate([seen_idx, support])
        res = out.setdefault(name, {})

        def record(key: str, score: np.ndarray, thr: float, res=res, taught=is_taught, right=right) -> None:
            res.setdefault(key, []).append((score, taught, right, thr))

        if alone is not None:  # --model by itself, on the same draw
            a = alone.views[:, 0].astype(np.float64)
            c = feats(a[observed]).mean(axis=0)
            ex = centred(a[support], c)
            score = mean_top(centred(a[d.query], c) @ ex.T)
            record("--model alone", score, calibrated(ex, ex_labels))
        for key, f in frames.items():
            c = feats(f[observed]).mean(axis=0)  # the running mean of what the device observed
            q = centred(f[d.query], c)
            ex = centred(v[support].mean(1) if key == "ex-views" else f[support], c)
            score = mean_top(q @ ex.T)
            if key == "similarity":
                device = np.array([p.similarity for p in preds])
                assert np.allclose(score, device, atol=2e-3), np.abs(score - device).max()
                base, base_c = score, c
                base_thr = store.effective_threshold
                record(key, score, base_thr)
                record("similarity (own calibration)", score, calibrated(ex, ex_labels))
            else:
                record(key, score, calibrated(ex, ex_labels))
        q = centred(v[d.query, 0], base_c)
        seen_f = centred(v[observed, 0], base_c)
        seen_labels = data.labels[observed]
        seen_sims = q @ seen_f.T
        novel = np.where((~is_taught)[:, None] & (seen_labels[None, :] == truth[:, None]), -np.inf, seen_sims)
        ex0 = centred(v[support, 0], base_c)
        ex_seen = ex0 @ seen_f.T
        ex_seen[np.arange(len(support)), len(seen_idx) + np.arange(len(support))] = -np.inf  # itself
        for b in betas:
            thr = calibrated(ex0, ex_labels, b * mean_top(ex_seen))
            record(f"rel-{b} seen", base - b * mean_top(seen_sims), thr)
            record(f"rel-{b} novel", base - b * mean_top(novel), thr)
    return out


def parser(doc: str) -> argparse.ArgumentParser:
    """The photos, model, classes, shots and seeds every issue-22 measurement takes."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--classes", default="0,1,2,3,4")
    p.add_argument("--shots", default="5,10")
    p.add_argument("--seeds", type=int, default=20)
    return p


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--kept", type=float, default=0.93)
    p.add_argument("--betas", default="0.25,0.5,1.0")
    p.add_argument(
        "--own", type=float, default=0.2, help="own-class quantile of the other scores' calibration"
    )
    p.add_argument(
        "--near", type=float, default=0.55, help="near-miss quantile of the other scores' calibration"
    )
    p.add_argument("--also", type=Path, help="a second model: every score on both models' features joined")
    a = p.parse_args()
    OWN[0], NEAR[0] = a.own, a.near
    data = only(load_dataset(a.data, Embedder(a.model), cache=default_cache()), a.classes.split(","))
    alone = None
    if a.also:
        alone = data
        second = only(load_dataset(a.data, Embedder(a.also), cache=default_cache()), a.classes.split(","))
        data = joined(data, second)
    betas = [float(b) for b in a.betas.split(",")]
    also = f" + {a.also.name}" if a.also else ""
    print(f"{a.model.name}{also}, classes {a.classes}, {a.seeds} seeds, rej@kept at kept {a.kept}")
    for shots in [int(s) for s in a.shots.split(",")]:
        for scenario, scores in run(data, shots, a.seeds, betas, alone).items():
            print(f"taught {scenario}, {shots} shots")
            first = scores.get("--model alone", scores["similarity"])  # what the others are paired with
            base = np.array([auroc(score, taught) for score, taught, _, _ in first])
            for key, runs in scores.items():
                au = np.array([auroc(score, taught) for score, taught, _, _ in runs])
                rej, kept = rates(runs)
                diff = au - base  # paired: the same draw, taught classes and queries
                print(
                    f"  {key:<28} auroc {au.mean():.3f} ± {au.std():.3f} (paired {diff.mean():+.3f}"
                    f" [{diff.min():+.3f}, {diff.max():+.3f}], higher in {(diff > 0).sum()}/{len(diff)})"
                    f"  rej@kept {at_kept(runs, a.kept):.3f}"
                    f"  rej {rej.mean():.3f} ± {rej.std():.3f}  kept {kept.mean():.3f} ± {kept.std():.3f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

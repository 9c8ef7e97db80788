"""Few-shot evaluation on a folder of labelled photos, with the same Embedder and KnnStore the daemon uses.

Per seed, N examples per class are drawn at random into a store and every other photo is
classified. Each photo is embedded once and reused across shots, seeds and rules. Before
classifying, the store observes every query's embedding, as the device observes every frame it
sees (the default rule centres its features on that running mean).

``eval_command`` is `edgeknn eval`: it checks the arguments, runs the evaluation and prints its table
(or one JSON object); ``main`` builds the parser and maps its errors to exit codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeknn.cli.errors import UsageError
from edgeknn.cli.options import load_config, model_path, print_json
from edgeknn.cli.progress import Progress
from edgeknn.imagefiles import ImageError, find_images, load_rgb
from edgeknn.model.embedder import Embedder
from edgeknn.store.head import VIEW_RULES
from edgeknn.store.knn import KnnStore, StoreSettings
from edgeknn.store.names import UNKNOWN


@dataclass
class Dataset:
    classes: list[str]
    files: list[Path]
    labels: np.ndarray
    vectors: np.ndarray


def load_dataset(
    root: Path, embedder: Embedder, progress: Callable[[int, int], None] | None = None
) -> Dataset:
    """Embed every photo of ``root/<class>/<image>`` once."""
    root = Path(root)
    if not root.is_dir():
        raise ImageError(f"{root}: not a folder of <class>/<image> folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ImageError(f"{root}: expected at least 2 class folders, found {len(classes)}")
    files, labels = [], []
    for i, name in enumerate(classes):
        found = find_images([root / name])
        files += found
        labels += [i] * len(found)
    max_side = 2 * max(embedder.model.input_size)
    vectors = np.zeros((len(files), embedder.dim), np.float32)
    for j, path in enumerate(files):
        vectors[j] = embedder.embed(load_rgb(path, max_side=max_side))
        if progress:
            progress(j + 1, len(files))
    return Dataset(classes, files, np.array(labels), vectors)


def evaluate(
    data: Dataset,
    embedder: Embedder,
    rules: list[str],
    shots: list[int],
    seeds: int,
    k: int = 3,
    open_set: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Mean and std accuracy per rule and shot count; with ``open_set``, per rule and shot count
    also what ``open_set_run`` measures (means over the seeds), under "open_set".

    Accuracy is the classifier's own answer, never rejected as unknown (so it stays comparable
    between models and with the open-set figures). ``progress(done, total)`` is called after each
    of the shots x rules x seeds runs.
    """
    views: dict[int, np.ndarray] = {}
    max_side = 2 * max(embedder.model.input_size)

    def views_of(i: int) -> np.ndarray:
        if i not in views:
            views[i] = embedder.embed_views(load_rgb(data.files[i], max_side=max_side))
        return views[i]

    results: dict[str, dict[str, dict[str, float | list[float]]]] = {rule: {} for rule in rules}
    opens: dict[str, dict[str, dict[str, float]]] = {rule: {} for rule in rules}
    n_classes = len(data.classes)
    runs, done = len(shots) * len(rules) * seeds, 0
    for n in shots:
        for rule in rules:
            accs, runs_open = [], []
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                picks = [
                    rng.choice(np.flatnonzero(data.labels == c), n, replace=False) for c in range(n_classes)
                ]
                train = np.concatenate(picks)
                test = np.setdiff1d(np.arange(len(data.labels)), train)
                known = np.arange(n_classes) if not open_set else rng.permutation(n_classes)[: n_classes // 2]
                store = KnnStore(embedder.dim, embedder.identity, StoreSettings(k=k, rule=rule))
                for i in train:
                    if data.labels[i] in known:
                        store.add(
                            data.classes[data.labels[i]],
                            views_of(i) if rule in VIEW_RULES else data.vectors[i],
                        )
                for i in test:
                    store.observe(data.vectors[i])
                store.threshold = float("-inf")  # the classifier's own answer, never unknown
                preds = [store.classify(data.vectors[i]) for i in test]
                is_known = np.isin(data.labels[test], known)
                right = [p.label == data.classes[c] for p, c in zip(preds, data.labels[test], strict=True)]
                accs.append(float(np.mean(np.array(right)[is_known])))
                if open_set:
                    truth = [data.classes[c] for c in data.labels[test]]
                    runs_open.append(open_set_run(store, data.vectors[test], truth, is_known))
                done += 1
                if progress:
                    progress(done, runs)
            results[rule][str(n)] = {
                "mean": float(np.mean(accs)),
                "std": float(np.std(accs)),
                "per_seed": [round(a, 4) for a in accs],  # seed i draws the same photos for any model
            }
            if open_set:
                opens[rule][str(n)] = {
                    key: float(np.mean([r[key] for r in runs_open])) for key in runs_open[0]
                }
    out: dict[str, dict] = {"rules": results}
    if open_set:
        out["open_set"] = opens
    return out


def open_set_run(
    store: KnnStore, vectors: np.ndarray, truth: list[str], taught: np.ndarray
) -> dict[str, float]:
    """One store against photos of taught and untaught classes (``taught`` says which).

    ``auroc``: of the unknown score (``Prediction.similarity``: high = taught); then, with the
    calibrated threshold (``store.threshold`` None, the default), with ``store.threshold = 0`` and
    with no rejection at all (the closed-set answer): the share of untaught photos answered
    ``UNKNOWN`` and of taught ones answered right. ``kept``: the calibrated right / the closed-set
    right. ``threshold``: the calibrated one. The store's threshold is left at None.
    """
    taught = np.asarray(taught, bool)
    out: dict[str, float] = {}
    for name, threshold in (("closed", float("-inf")), ("zero", 0.0), ("auto", None)):
        store.threshold = threshold
        preds = [store.classify(v) for v in vectors]
        unknown = np.array([p.label == UNKNOWN for p in preds])
        right = np.array([p.label == t for p, t in zip(preds, truth, strict=True)])
        out[f"unseen_unknown_{name}"] = float(unknown[~taught].mean())
        out[f"taught_right_{name}"] = float(right[taught].mean())
        if name == "auto":
            out["auroc"] = auroc(np.array([p.similarity for p in preds]), taught)
    out["kept"] = out["taught_right_auto"] / max(out["taught_right_closed"], 1e-12)
    out["threshold"] = store.effective_threshold
    return out


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive scores above a negative (ties count half)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


def eval_command(args) -> int:
    cfg = load_config(args)
    try:
        shots = [int(s) for s in args.shots.split(",")]
    except ValueError:
        raise UsageError(f"--shots: expected comma-separated integers, got {args.shots!r}") from None
    if min(shots) < 1 or args.seeds < 1:
        raise UsageError("--shots and --seeds: expected integers >= 1")
    rules = [args.rule] if args.rule else ["softmax", "tfjs"]
    start = time.perf_counter()
    embedder = Embedder(model_path(args, cfg), cfg.model.threads)
    with Progress("eval: embedding photos", 0) as progress:
        data = load_dataset(args.dataset, embedder, progress)
    smallest = min(int((data.labels == c).sum()) for c in range(len(data.classes)))
    if max(shots) >= smallest:
        raise UsageError(f"--shots: the smallest class has {smallest} photos; use fewer than that")
    with Progress("eval: shots x rules x seeds", 0) as progress:
        result = evaluate(
            data, embedder, rules, shots, args.seeds, k=args.k, open_set=args.open_set, progress=progress
        )
    seconds = time.perf_counter() - start
    result = {
        "model": str(model_path(args, cfg)),
        "default_rule": "softmax",
        **result,
        "seconds": round(seconds, 1),
    }
    if args.json:
        print_json(result)
        return 0
    print(
        f"{args.dataset}: {len(data.files)} photos, {len(data.classes)} classes, "
        f"{args.seeds} seeds, k={args.k}"
    )
    header = "".join(f"{n:>4} shot{'s' if n > 1 else ' '}" + " " * 5 for n in shots)
    print("rule        " + header)
    for rule, per_shot in result["rules"].items():
        cells = "".join(f"{v['mean']:.3f} ± {v['std']:.3f}  " for v in per_shot.values())
        print(f"{rule:<12}{cells}")
    for rule, per_shot in result.get("open_set", {}).items():
        print(f"open set ({rule}): half the classes untaught; unknown = {UNKNOWN!r}")
        print("  shots  AUROC  threshold  untaught->unknown (auto / 0)  taught right (auto / 0 / none)  kept")
        for n, r in per_shot.items():
            print(
                f"  {n:>5}  {r['auroc']:.3f}  {r['threshold']:9.3f}  "
                f"{r['unseen_unknown_auto']:.3f} / {r['unseen_unknown_zero']:.3f}{'':15}"
                f"{r['taught_right_auto']:.3f} / {r['taught_right_zero']:.3f} / "
                f"{r['taught_right_closed']:.3f}{'':9}{r['kept']:.3f}"
            )
    print(f"took {seconds:.1f} s")
    return 0

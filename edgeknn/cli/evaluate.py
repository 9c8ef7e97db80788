"""Few-shot evaluation on a folder of labelled photos, as a device would meet them.

Per seed, each class's photos are shuffled into the ``shots`` it is taught with, ``seen`` photos
the device sees around that teaching, and the queries (the rest). The store is taught as the
device is: for each taught class it observes that class's seen photos, then each example's frame
as the example is added, so its centre (the running mean of the frames seen, ``head.py``) is what
a just-taught device holds; the queries are then classified with that centre and never observed
(a device cannot know its next frames). ``protocol="queries"`` is the old evaluation, kept to
compare with: the store observed every photo it was not taught with, queries included.

Closed set: every class taught, the classifier's own answer (never unknown). Open set
(``open_set``): 1, 2 and half the classes taught, the others never; per seed, the AUROC of the
unknown score, the share of untaught photos answered ``UNKNOWN`` and of taught ones answered right
with the calibrated threshold, beside the closed-set answer. Photos are embedded once
(``photoset.py``) and reused for every shot count, seed, rule and scenario.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeknn.cli.errors import UsageError
from edgeknn.cli.options import load_config, model_path, print_json
from edgeknn.cli.photoset import Dataset, load_dataset, only
from edgeknn.cli.progress import Progress
from edgeknn.model.embedder import Embedder
from edgeknn.store.head import VIEW_RULES
from edgeknn.store.knn import KnnStore, StoreSettings
from edgeknn.store.names import UNKNOWN

PROTOCOLS = ("device", "queries")
SEEN_FROM = ("all", "taught")
SEEN = 10  # photos of each taught class the device sees while it is taught (about a second of frames)
OPEN_METRICS = ("auroc", "rejected", "right", "right_closed", "kept", "threshold")


@dataclass(frozen=True)
class Draw:
    """One seed's photos (indices into the dataset): per class, its examples and the photos the
    device sees meanwhile; the queries of every class."""

    support: dict[int, np.ndarray]
    seen: dict[int, np.ndarray]
    query: np.ndarray


def draw(labels: np.ndarray, classes: int, shots: int, seen: int, rng: np.random.Generator) -> Draw:
    support, around, query = {}, {}, []
    for c in range(classes):
        mine = rng.permutation(np.flatnonzero(labels == c))
        support[c], around[c] = mine[:shots], mine[shots : shots + seen]
        query.append(mine[shots + seen :])
    return Draw(support, around, np.sort(np.concatenate(query)))


def teach(
    data: Dataset,
    d: Draw,
    taught: list[int],
    rule: str,
    k: int,
    protocol: str = "device",
    seen_from: str = "all",
    storage: str = "float32",
) -> KnnStore:
    """A store taught the classes ``taught`` of the draw ``d``, having observed what the protocol
    says: ``device``, the seen photos of every class (``seen_from="all"``: the room it works in,
    untaught things included, never the queries) or of the taught classes only (``"taught"``: a
    device that has seen nothing but what it was taught), then each example's frame as it is added;
    ``queries`` (the old evaluation), every photo it was not taught with, the queries included.
    ``storage``: the store's rows (``store.storage``, the model's for ``auto``: ``Dataset.storage``)."""
    settings = StoreSettings(k=k, rule=rule, storage=storage, embedding=data.storage)
    store = KnnStore(data.vectors.shape[1], "eval", settings)
    device = protocol == "device"
    if device:
        for c in range(len(data.classes)) if seen_from == "all" else taught:
            for i in d.seen[c]:
                store.observe(data.vectors[i])
    for c in taught:
        for i in d.support[c]:
            if device:
                store.observe(data.vectors[i])  # the device classifies the frame it adds an example from
            rows = data.views[i] if rule in VIEW_RULES else data.vectors[i]
            store.add(data.classes[c], rows, added=60.0 * len(store.examples()))  # each a moment of its own
    if not device:
        taught_photos = np.concatenate([d.support[c] for c in range(len(data.classes))])
        for i in np.setdiff1d(np.arange(len(data.labels)), taught_photos):
            store.observe(data.vectors[i])
    return store


def answers(store: KnnStore, data: Dataset, query: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, as the store answers it with its threshold: the label, the label it would give
    with no unknown answer (its scores' best), and the unknown score (``similarity``)."""
    labels, closed, similarity = [], [], []
    for i in query:
        p = store.classify(data.vectors[i])
        labels.append(p.label)
        # the rule's own answer; under an unknown answer, its scores' best (the same but for a tie)
        closed.append(
            p.label if p.label != UNKNOWN or not p.scores else max(p.scores, key=p.scores.__getitem__)
        )
        similarity.append(p.similarity)
    return np.array(labels), np.array(closed), np.array(similarity)


def open_set_run(store: KnnStore, data: Dataset, query: np.ndarray, taught: list[int]) -> dict[str, float]:
    """One taught store against the queries of taught and untaught classes: the AUROC of the
    unknown score (taught against untaught), ``rejected`` (untaught answered ``UNKNOWN``),
    ``right`` (taught answered with their class), ``right_closed`` (the same with no unknown answer),
    ``kept`` (right / right_closed) and the calibrated ``threshold``."""
    label, closed, similarity = answers(store, data, query)
    truth = np.array(data.classes)[data.labels[query]]
    is_taught = np.isin(data.labels[query], taught)
    right = float((label == truth)[is_taught].mean())
    right_closed = float((closed == truth)[is_taught].mean())
    return {
        "auroc": auroc(similarity, is_taught),
        "rejected": float((label == UNKNOWN)[~is_taught].mean()),
        "right": right,
        "right_closed": right_closed,
        "kept": right / max(right_closed, 1e-12),
        "threshold": store.effective_threshold,
    }


def taught_counts(classes: int) -> dict[str, int]:
    """The open-set scenarios: 1, 2 and half the classes (rounded up) taught; a count that leaves no
    class untaught, or repeats an earlier one, is left out."""
    counts: dict[str, int] = {}
    for name, n in (("1", 1), ("2", 2), ("half", (classes + 1) // 2)):
        if n < classes and n not in counts.values():
            counts[name] = n
    return counts


def evaluate(
    data: Dataset,
    rules: list[str],
    shots: list[int],
    seeds: int,
    k: int = 3,
    open_set: bool = False,
    protocol: str = "device",
    seen: int = SEEN,
    seen_from: str = "all",
    progress: Callable[[int, int], None] | None = None,
    storage: str = "float32",
) -> dict:
    """Closed-set accuracy per rule and shot count (mean, std, per seed); with ``open_set``, per
    rule, scenario (``taught_counts``) and shot count the mean and std over seeds of ``open_set_run``.

    Seed i draws the same photos for every rule, model and scenario; the taught classes of a
    scenario are drawn from their own generator, so they too are the same for every rule and model.
    """
    n_classes = len(data.classes)
    scenarios = taught_counts(n_classes) if open_set else {}
    runs, done = len(shots) * len(rules) * seeds * (1 + len(scenarios)), 0
    closed: dict[str, dict[str, dict]] = {rule: {} for rule in rules}
    opens: dict[str, dict[str, dict[str, dict]]] = {rule: {name: {} for name in scenarios} for rule in rules}
    for n in shots:
        draws = [draw(data.labels, n_classes, n, seen, np.random.default_rng(seed)) for seed in range(seeds)]
        for rule in rules:
            accs = []
            per_scenario: dict[str, list[dict[str, float]]] = {name: [] for name in scenarios}
            for seed, d in enumerate(draws):
                store = teach(data, d, list(range(n_classes)), rule, k, protocol, seen_from, storage)
                _, answer, _ = answers(store, data, d.query)
                accs.append(float(np.mean(answer == np.array(data.classes)[data.labels[d.query]])))
                done += 1
                for name, count in scenarios.items():
                    chosen = np.random.default_rng([seed, count]).permutation(n_classes)[:count]
                    taught = sorted(int(c) for c in chosen)
                    store = teach(data, d, taught, rule, k, protocol, seen_from, storage)
                    per_scenario[name].append(open_set_run(store, data, d.query, taught))
                    done += 1
                if progress:
                    progress(done, runs)
            closed[rule][str(n)] = {
                "mean": float(np.mean(accs)),
                "std": float(np.std(accs)),
                "per_seed": [round(a, 4) for a in accs],  # seed i draws the same photos for any model
            }
            for name, results in per_scenario.items():
                opens[rule][name][str(n)] = {
                    key: {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v))}
                    for key in OPEN_METRICS
                    for v in [[r[key] for r in results]]
                }
    out: dict = {"protocol": protocol, "seen": seen, "seen_from": seen_from, "storage": storage}
    out["rules"] = closed
    if open_set:
        out["taught"] = scenarios
        out["open_set"] = opens
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
    """`edgeknn eval`: check the arguments, embed the photos (or read them from the cache), run
    ``evaluate`` and print its tables, or one JSON object."""
    cfg = load_config(args)
    try:
        shots = [int(s) for s in args.shots.split(",")]
    except ValueError:
        raise UsageError(f"--shots: expected comma-separated integers, got {args.shots!r}") from None
    if min(shots) < 1 or args.seeds < 1 or (args.seen is not None and args.seen < 0):
        raise UsageError("--shots and --seeds: expected integers >= 1; --seen: >= 0")
    rules = [args.rule] if args.rule else ["softmax", "tfjs"]
    start = time.perf_counter()
    embedder = Embedder(model_path(args, cfg), cfg.model.threads)
    cache = None if args.no_cache else args.cache or default_cache()
    with Progress("eval: embedding photos", 0) as progress:
        data = load_dataset(args.dataset, embedder, progress, cache=cache)
    if args.classes:
        data = only(data, [c.strip() for c in args.classes.split(",") if c.strip()])
        if len(data.classes) < 2:
            raise UsageError("--classes: expected at least 2 classes")
    smallest = min(int((data.labels == c).sum()) for c in range(len(data.classes)))
    seen = min(SEEN, (smallest - max(shots)) // 2) if args.seen is None else args.seen
    if max(shots) + seen >= smallest:
        raise UsageError(
            f"--shots/--seen: the smallest class has {smallest} photos; shots + seen must leave queries"
        )
    with Progress("eval: shots x rules x seeds", 0) as progress:
        result = evaluate(
            data,
            rules,
            shots,
            args.seeds,
            k=args.k,
            open_set=args.open_set,
            protocol=args.protocol,
            seen=seen,
            seen_from=args.seen_from,
            progress=progress,
            storage=args.storage,
        )
    seconds = time.perf_counter() - start
    result = {
        "model": str(model_path(args, cfg)),
        "default_rule": "softmax",
        "classes": data.classes,
        "seeds": args.seeds,
        **result,
        "seconds": round(seconds, 1),
    }
    if args.json:
        print_json(result)
        return 0
    print_tables(result, args.dataset, len(data.files), shots)
    print(f"took {seconds:.1f} s")
    return 0


def print_tables(result: dict, dataset: Path, photos: int, shots: list[int]) -> None:
    """The closed-set table, then per rule the open-set one: mean ± spread (std) over the seeds."""
    seen = (
        "the queries"
        if result["protocol"] == "queries"
        else f"{result['seen']} photos of {result['seen_from']} classes"
    )
    print(
        f"{dataset}: {photos} photos, {len(result['classes'])} classes, {result['seeds']} seeds; "
        f"the centre: {seen}; {result['storage']} rows"
    )
    print("rule        " + "".join(f"{n:>4} shot{'s' if n > 1 else ' '}" + " " * 9 for n in shots))
    for rule, per_shot in result["rules"].items():
        print(f"{rule:<12}" + "".join(f"{v['mean']:.3f} ± {v['std']:.3f}    " for v in per_shot.values()))
    for rule, scenarios in result.get("open_set", {}).items():
        print(f"open set ({rule}), threshold auto; untaught answered {UNKNOWN!r}, taught answered right:")
        print("  taught  shots  AUROC          threshold       rejected        right (closed)   kept")
        for name, per_shot in scenarios.items():
            for n, r in per_shot.items():
                cell = {key: f"{r[key]['mean']:.3f} ± {r[key]['std']:.3f}" for key in OPEN_METRICS}
                print(
                    f"  {name:<6}  {n:>5}  {cell['auroc']}  {cell['threshold']}  {cell['rejected']}  "
                    f"{r['right']['mean']:.3f} ({r['right_closed']['mean']:.3f})    {cell['kept']}"
                )


def default_cache() -> Path:
    """Where embedded photos are kept between runs: $XDG_CACHE_HOME/edgeknn/eval (~/.cache/…)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "edgeknn" / "eval"

"""`edgeknn classify | teach | predict`: the commands that run a model on image files.

``classify`` asks a pretrained classifier (or, with ``--source``, ``classifylive`` on a camera);
``teach`` embeds images into a store as examples of a class, holding the store's lock;
``predict`` asks a taught store. ``main`` builds the parser and maps their errors to exit codes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeknn import config
from edgeknn import jpeg as pictures
from edgeknn.cli.errors import UsageError
from edgeknn.cli.options import load_config, model_path, print_json
from edgeknn.cli.progress import Progress
from edgeknn.imagefiles import ImageError, find_images, load_rgb
from edgeknn.model.classifier import Classifier
from edgeknn.model.embedder import Embedder
from edgeknn.store import lock as storelock
from edgeknn.store.head import VIEW_RULES
from edgeknn.store.knn import KnnStore
from edgeknn.store.names import class_name_error


def _open_store(path: Path, embedder: Embedder, cfg: config.Config, create: bool) -> KnnStore:
    if create and not Path(path).exists():
        return KnnStore(embedder.dim, embedder.identity, cfg.store.settings(embedder.storage))
    return KnnStore.load(path, embedder.identity, cfg.store.settings(embedder.storage), embedder.dim)


def each_image(paths: list[Path], skipped: list[str]) -> Iterator[tuple[Path, np.ndarray]]:
    """Every image the paths name (folders searched), loaded; what cannot be read is skipped with one
    line on stderr and counted in ``skipped``, and the rest still comes (a README among photos)."""
    for given in paths:
        try:
            files = find_images([given])
        except ImageError as e:
            skipped.append(str(e))
            print(f"edgeknn: skipped {e}", file=sys.stderr)
            continue
        for path in files:
            try:
                image = load_rgb(path, max_side=1024)
            except ImageError as e:
                skipped.append(str(e))
                print(f"edgeknn: skipped {e}", file=sys.stderr)
                continue
            yield path, image


def threshold_option(text: str) -> float | str:
    """``--threshold``: a similarity -1..1 below which the answer is unrecognized, or "auto"."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'expected a number -1.0..1.0 or "auto", got {text!r}')
    return value


def classify(args) -> int:
    cfg = load_config(args)
    if args.top < 1:
        raise UsageError("--top: expected an integer >= 1")
    if bool(args.images) == bool(args.source):
        raise UsageError("classify: expected image files or --source URI (one of them)")
    classifier = Classifier(
        model_path(args, cfg), labels=args.labels, head=args.head, threads=cfg.model.threads
    )
    if args.source:
        from edgeknn.cli.classifylive import classify_live

        return classify_live(classifier, args.source, args.top, args.json)
    skipped: list[str] = []
    for path, image in each_image(args.images, skipped):
        labels = classifier.classify(image, top=args.top)
        if args.json:
            print_json({"file": str(path), "results": [vars(x) for x in labels]})
        else:
            print(f"{path}: " + ", ".join(f"{x.label} ({x.confidence:.2f})" for x in labels))
    return 1 if skipped else 0


def teach(args) -> int:
    """Holds the store's lock from reading it to saving it: a running device's store is refused
    (its next autosave would write over what this adds)."""
    with storelock.claimed(args.store, "edgeknn teach"):
        return _teach_locked(args)


def _teach_locked(args) -> int:
    cfg = load_config(args)
    problem = class_name_error(args.class_name)
    if problem:
        raise UsageError(f"--class: {problem}, got {args.class_name!r}")
    with Progress(f"teach {args.class_name!r}", 0) as progress:
        files, skipped = [], 0
        for path in args.paths:  # what cannot be read is skipped, one line each; the rest is kept
            try:
                files += find_images([path])
            except ImageError as e:
                progress.say(f"edgeknn: skipped {e}")
                skipped += 1
        if not files:
            print(f"edgeknn: {args.store}: nothing added (no image could be read)", file=sys.stderr)
            return 1
        embedder = Embedder(model_path(args, cfg), cfg.model.threads)
        store = _open_store(args.store, embedder, cfg, create=True)
        added = count = 0
        for i, path in enumerate(files, 1):
            try:
                image = load_rgb(path, max_side=1024)
            except ImageError as e:
                progress.say(f"edgeknn: skipped {e}")
                skipped += 1
                continue
            vectors = embedder.embed_views(image) if store.rule in VIEW_RULES else embedder.embed(image)
            picture = pictures.encode(embedder.model.prepare(image))  # what the camera would have kept
            count = store.add(args.class_name, vectors, picture)
            added += 1
            progress(i, len(files))
    if not added:
        print(f"edgeknn: {args.store}: nothing added (no image could be read)", file=sys.stderr)
        return 1
    store.save(args.store)
    also = f", {skipped} skipped" if skipped else ""
    print(f"{args.store}: class {args.class_name!r} now has {count} examples ({added} added{also})")
    return 1 if skipped else 0


def predict(args) -> int:
    cfg = load_config(args)
    embedder = Embedder(model_path(args, cfg), cfg.model.threads)
    store = _open_store(args.store, embedder, cfg, create=False)
    if args.threshold is not None:  # else the store's own (store.threshold)
        store.threshold = None if args.threshold == "auto" else args.threshold
    skipped: list[str] = []
    for path, image in each_image(args.images, skipped):
        p = store.classify(embedder.embed(image))
        if args.json:
            print_json(
                {
                    "file": str(path),
                    "label": p.label,
                    "confidence": round(p.confidence, 4),
                    "scores": {k: round(v, 4) for k, v in p.scores.items()},
                    "similarity": round(p.similarity, 4),
                    "neighbours": [{"class": c, "similarity": round(s, 4)} for c, s in p.neighbours],
                }
            )
        else:
            print(f"{path}: {p.label} ({p.confidence:.2f}, similarity {p.similarity:.2f})")
    return 1 if skipped else 0

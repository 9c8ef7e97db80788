#!/usr/bin/env python3
"""Closed-set accuracy of a store taught as a device teaches it, offline, on the sign digits.

`edgeknn eval` fits each store once, on all its examples. A device has its classes before they have
examples (``classes`` in its config), adds examples one frame at a time and refits its head beside
the loop after each change, each refit starting from the last. This script follows that path: the
classes made first, 10 frames of every class seen, then each class's examples added one per frame,
the refit beside waited for after each; then every other photo of those classes is classified and
the head's best class (the unknown answer left aside) compared with the truth, over 20 seeds.

    python scripts/measure_teachpath.py --classes 5,6,7,8,9 --shots 5 [--code DIR]

``--code``: the root of another checkout of edgeknn to measure (e.g. ``git worktree add`` of an
older commit), so two versions are compared on the same draws.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
SHARED = HERE / ".." / "shared"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--code", type=Path, default=HERE)
    p.add_argument("--classes", default="1,2,5")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--data", type=Path, default=SHARED / "data" / "sign_language_digits")
    p.add_argument("--model", type=Path, default=SHARED / "models" / "mobilenet_v1_0.75_192_quant.tflite")
    a = p.parse_args()
    sys.path.insert(0, str(a.code))
    from edgeknn.cli.evaluate import default_cache
    from edgeknn.cli.photoset import load_dataset, only
    from edgeknn.model.embedder import Embedder
    from edgeknn.store import refit
    from edgeknn.store.knn import KnnStore, StoreSettings

    classes = a.classes.split(",")
    data = only(load_dataset(a.data, Embedder(a.model), cache=default_cache()), classes)
    accuracy = []
    for seed in range(a.seeds):
        rng = np.random.default_rng(seed)
        store = KnnStore(data.vectors.shape[1], "x", StoreSettings(k=3, embedding=data.storage))
        for name in classes:
            store.add_class(name)
        refitter = refit.beside(store)
        support, query = {}, []
        for c in range(len(classes)):
            mine = rng.permutation(np.flatnonzero(data.labels == c))
            support[c] = mine[: a.shots]
            query += list(mine[a.shots + 10 :])
            for i in mine[a.shots : a.shots + 10]:  # the frames seen before teaching
                store.observe(data.vectors[i])
                store.classify(data.vectors[i])
        for c in range(len(classes)):
            for i in support[c]:  # one example a frame; the frame is classified first
                store.observe(data.vectors[i])
                store.classify(data.vectors[i])
                store.add(classes[c], data.views[i], added=time.time())
                refitter.wait(30)
        for _ in range(2):  # the last refit started, then taken
            store.classify(data.vectors[query[0]])
            refitter.wait(30)
        truth = np.array(classes)[data.labels[query]]
        best = []
        for i in query:
            scores = store.classify(data.vectors[i]).scores
            best.append(max(scores, key=scores.__getitem__))
        accuracy.append(float(np.mean(np.array(best) == truth)))
    acc = np.array(accuracy)
    print(
        f"{a.code}: classes {a.classes}, {a.shots} shots, {a.seeds} seeds: closed-set accuracy "
        f"{acc.mean():.3f} ± {acc.std():.3f} (min {acc.min():.3f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

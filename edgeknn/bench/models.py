"""Two models side by side: the bench's model and a compared one, measured the same way in one run.

The compared model gets the same loop measure (raw invokes alternating with the daemon's loop,
``pipeline_ratio`` the median of three parts) and the same `edgeknn run` subprocess with a
10 000-example store of its own width (startup, peak memory); not the k-NN or latency parts,
which do not depend on the model beyond its width. ``invoke_ratio`` comes from both interpreters
in one process, their invokes alternating in blocks (the median of three parts), so that a
neighbour's burst slows both alike instead of whichever model ran at the time.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

from edgeknn import config
from edgeknn.bench.inputs import Plan, Setup, random_store
from edgeknn.bench.pipeline import PARTS, pipeline
from edgeknn.bench.process import STARTUP_EXAMPLES, run_process
from edgeknn.model.embedder import Embedder
from edgeknn.model.registry import DEFAULT_NAME, MODELS, by_file
from edgeknn.model.tflite import sha256_of

SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
# What each model shows in the side-by-side table and under "side_by_side" in the JSON.
SIDE_KEYS = ("invoke_ms", "raw_fps", "pipeline_fps", "pipeline_ratio", "startup_s", "rss_mb")
BASELINE = "mobilenet_v1_1.0_224"  # what the default is compared with unless told otherwise


def name_of(model: Path) -> str:
    """The registry name of a model file (by its checksum, then its file name), else its file name."""
    try:
        digest = sha256_of(model)
    except OSError:
        digest = ""
    known = next((m for m in MODELS.values() if m.sha256 == digest), None) or by_file(model)
    return known.name if known else model.name


def compared_model(choice: str | None, main: Path, cfg: config.Config) -> tuple[str, Path | None]:
    """The model to set beside ``main``: ``choice`` (a name, "none"), else the 1.0/224 extractor, or
    the default when ``main`` is that one. Its file: in ``<state_dir>/models``, else ../shared/models;
    (name, None) when neither has it (or for "none")."""
    if choice == "none":
        return "none", None
    name = choice or (DEFAULT_NAME if name_of(main) == BASELINE else BASELINE)
    file = MODELS[name].file
    for folder in (cfg.resolved_state_dir() / "models", SHARED_MODELS):
        if (folder / file).is_file():
            return name, folder / file
    return name, None


def measure_compared(setup: Setup, model: Path) -> dict[str, float]:
    """``SIDE_KEYS`` of ``model``, measured as the bench measures its own (in a folder of its own)."""
    tmp = setup.tmp / "compared"
    tmp.mkdir()
    other = dataclasses.replace(setup, model=model, tmp=tmp)
    results: dict[str, float] = {}
    embedder = pipeline(other, results, latency=False)
    storage = setup.cfg.store.storage or "float32"
    store_path = tmp / "startup-store.npz"
    random_store(embedder, setup.cfg, STARTUP_EXAMPLES, seed=2, storage=storage).save(store_path)
    run_process(other, store_path, storage, results)
    return {key: results[key] for key in SIDE_KEYS if key in results}


def invoke_ratio(main: Path, compared: Path, threads: int, plan: Plan) -> float:
    """The median over ``PARTS`` parts of main's median invoke over the compared model's, their
    blocks of ``plan.invokes`` invokes alternating (each interpreter as the daemon builds it)."""
    models = [Embedder(path, threads).model for path in (main, compared)]
    frame = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    for model in models:
        model.set_input(frame)
    ratios = []
    for _ in range(PARTS):
        times: list[list[float]] = [[], []]
        for _ in range(max(2, plan.rounds // PARTS)):
            for model, spent in zip(models, times, strict=True):
                for _ in range(plan.invokes):
                    t = time.perf_counter()
                    model.interpreter.invoke()
                    spent.append(time.perf_counter() - t)
        ratios.append(statistics.median(times[0]) / statistics.median(times[1]))
    return statistics.median(ratios)

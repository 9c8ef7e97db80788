"""`edgeknn bench`: the daemon's loop against the raw model, the k-NN store, startup and memory.

Everything is measured on the objects the daemon itself uses: ``app.build`` wires the Embedder,
the KnnStore, the Capture (the model's ``prepare`` runs on the camera thread) and the MqttLink, and
the bench calls ``Daemon.step`` as ``Daemon.loop`` does. Startup and memory come from a real
``edgeknn run`` subprocess that says READY on a notify socket the bench listens on.
The parts: ``pipeline`` (the daemon's loop, frame → MQTT arrival), ``storecost`` (k-NN, adds, the
head's fit, uint8 agreement), ``process`` (startup and memory of `edgeknn run`), ``report`` (the
table), ``broker`` (the mosquitto launcher the tests use too), ``inputs`` (plan, setup, random stores).

The result is one flat dict of numbers (``--json`` prints it as one object). The main ones:

- ``invoke_ms``: median raw ``interpreter.invoke()`` (camera paused); ``raw_fps`` = 1000 / invoke_ms.
- ``pipeline_fps``: 1 / median ``Daemon.step`` time (replay → prepare → invoke → k-NN over 1 000
  examples → stabiliser → LEDs/MQTT as configured), in blocks alternating with the raw-invoke
  blocks; ``pipeline_ratio``: the median over three parts of that alternation of each part's
  pipeline rate / raw rate (``pipeline_ratio_min`` / ``_max``: the other two). The replay frames
  are decoded before the run, at the model's input size as the Pi's ISP delivers them (picamera2
  asks for that size), and paced at PACE x the loop's rate (``camera_fps``). ``pipeline_fps_resizing`` /
  ``pipeline_ratio_resizing``: the same with the photos at their own size, so that the camera
  thread crops and resizes every frame, as for a USB camera; ``prepare_ms_640x480``: that crop
  and resize for one VGA frame. ``loop_cpu_ms``: CPU time of the loop's own thread per frame
  (k-NN, head, stabiliser, outputs), which competes for the cores with the interpreter's threads.
- ``frame_to_publish_ms_p50`` / ``_p99``: capture timestamp → arrival at a mosquitto_sub process,
  with ``mqtt.publish = "every_frame"`` (a second daemon; ``pipeline_ratio_every_frame``).
- ``knn_us_<n>`` / ``knn_us_uint8_<n>``: ``KnnStore.classify`` with the k-NN vote over n rows;
  ``uint8_agreement`` (configured rule) / ``uint8_agreement_knn``: share of held-out photos that
  uint8 storage answers as float32 does.
- ``add_us_<n>``: adding one example to a store of n rows (``add_full_us_<n>``: to a full class).
- ``fit_ms_<n>`` / ``refit_ms_<n>``: the configured rule's head, fitted in the first ``classify``
  and refitted in the first one after an added example.
- ``startup_s``: process start → READY with a 10 000-example store; ``store_load_ms``;
  ``rss_mb``: its VmHWM after it has classified for a few seconds (``rss_ready_mb``: at READY).
- ``web_viewer_ratio``, ``pipeline_ratio_web_viewer``, ``rss_web_none_mb`` / ``rss_web_viewer_mb`` …:
  the web page's cost, one viewer against none (``bench/web.py``).
- ``side_by_side``: ``{model name: {invoke_ms, raw_fps, pipeline_fps, pipeline_ratio, startup_s,
  rss_mb}}`` for the bench's model and the compared one (``--compare``, ``models``), and
  ``invoke_ratio``: the bench model's invoke over the compared one's, both in this process with
  their invokes alternating (the median of three parts). ``model`` / ``compared_model``
  name them (the only values that are not numbers, with ``side_by_side``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeknn import config
from edgeknn.bench.broker import Broker, reachable_broker
from edgeknn.bench.inputs import BenchError, Plan, Setup, synthetic_frames
from edgeknn.bench.models import SIDE_KEYS, compared_model, invoke_ratio, measure_compared, name_of
from edgeknn.bench.pipeline import pipeline
from edgeknn.bench.process import startup
from edgeknn.bench.report import table
from edgeknn.bench.storecost import agreement, fit, knn
from edgeknn.bench.web import web_memory
from edgeknn.model.registry import DEFAULT_MODEL_FILE

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sign_language_digits"


def run_bench(args: argparse.Namespace, cfg: config.Config) -> int:
    """`edgeknn bench`: measure, then print a table or (``--json``) one JSON object."""
    try:
        model = bench_model(args, cfg)
        threads = args.threads or cfg.model.threads or os.cpu_count() or 1
        data = getattr(args, "data", None) or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
        stages = not args.json or sys.stderr.isatty()  # on a terminal, say each stage even with --json
        compared = compared_model(getattr(args, "compare", None), model, cfg)
        if compared[0] != "none" and compared[1] is None:
            print(
                f"edgeknn: bench: no {compared[0]} to compare with (`edgeknn model fetch {compared[0]}`)",
                file=sys.stderr,
            )
        results = measure(
            model, threads, Path(data) if data else None, cfg, bool(args.quick), stages, compared[1]
        )
    except BenchError as e:
        print(f"edgeknn: bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results))
    else:
        print(table(results, model, data))
    return 0


def bench_model(args: argparse.Namespace, cfg: config.Config) -> Path:
    """--model, else the configured model, else the extractor in ../shared/models beside the repo."""
    if getattr(args, "model", None):
        return Path(args.model)
    if cfg.model_path().exists():
        return cfg.model_path()
    shared = REPO.parent / "shared" / "models" / DEFAULT_MODEL_FILE
    if shared.exists():
        return shared
    raise BenchError(f"no model at {cfg.model_path()}: pass --model or run `edgeknn model fetch`")


def measure(
    model: Path,
    threads: int,
    data: Path | None,
    cfg: config.Config,
    quick: bool,
    verbose: bool,
    compared: Path | None = None,
) -> dict[str, Any]:
    """Every part in turn, on a local mosquitto if there is one (else the configured broker if it
    answers, else with MQTT off), then the ``compared`` model's side; numbers rounded to 4 decimals."""
    plan = Plan.make(quick)

    def say(text: str) -> None:
        if verbose:
            print(text, file=sys.stderr, flush=True)

    started = time.monotonic()
    results: dict[str, float] = {"threads": threads}
    side: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgeknn-bench-") as tmp_name:
        tmp = Path(tmp_name)
        frames = data if data else synthetic_frames(tmp / "frames")
        local: Broker | None = None
        with contextlib.suppress(RuntimeError):  # mosquitto is not installed, or it did not start
            local = Broker(tmp / "broker").start()
        broker = local.address if local else reachable_broker(cfg)
        where = f"{broker[0]}:{broker[1]}" if broker else "no broker: MQTT off"
        setup = Setup(cfg, model, threads, frames, tmp, broker, plan)
        try:
            say(f"pipeline: {model.name}, {threads} threads, frames from {frames}, MQTT {where}")
            embedder = pipeline(setup, results)
            say("k-NN: 1 000 / 10 000 / 100 000 rows, float32 and uint8; uint8 agreement on photos")
            knn(embedder, cfg, plan, results)
            fit(embedder, cfg, plan, results)
            agreement(embedder, cfg, frames, plan, results)
            say("startup and memory: `edgeknn run` with a 10 000-example store")
            startup(setup, embedder, results)
            say("the web page: `edgeknn run` with one viewer and with none")
            web_memory(setup, results)
            if compared is not None:
                say(f"side by side: {compared.name}, the loop and `edgeknn run` with a 10 000-example store")
                side = measure_compared(setup, compared)
                results["invoke_ratio"] = invoke_ratio(model, compared, threads, plan)
        finally:
            if local is not None:
                local.stop()
    results["bench_s"] = time.monotonic() - started
    out: dict[str, Any] = {k: round(float(v), 4) for k, v in results.items()}
    out["model"] = name_of(model)
    if side:
        out["compared_model"] = name_of(compared) if compared else ""
        out["side_by_side"] = {
            out["model"]: {k: out[k] for k in SIDE_KEYS if k in out},
            out["compared_model"]: {k: round(float(v), 4) for k, v in side.items()},
        }
    return out

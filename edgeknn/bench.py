"""`edgeknn bench`: the daemon's loop against the raw model, the k-NN store, startup and memory.

Everything is measured on the objects the daemon itself uses: ``daemon.build`` wires the Embedder,
the KnnStore, the Capture (the model's ``prepare`` runs on the camera thread) and the MqttLink, and
the bench calls ``Daemon.step`` as ``Daemon.loop`` does. Startup and memory come from a real
``edgeknn run`` subprocess that says READY on a notify socket the bench listens on.

The result is one flat dict of numbers (``--json`` prints it as one object). The main ones:

- ``invoke_ms``: median raw ``interpreter.invoke()`` (camera paused); ``raw_fps`` = 1000 / invoke_ms.
- ``pipeline_fps``: 1 / median ``Daemon.step`` time (replay → prepare → invoke → k-NN over 1 000
  examples → stabiliser → LEDs/MQTT as configured), in blocks alternating with the raw-invoke
  blocks; ``pipeline_ratio`` = pipeline_fps / raw_fps. The replay frames are decoded before the
  run, at the model's input size as the Pi's ISP delivers them (picamera2 asks for that size),
  and paced at PACE x the loop's rate (``camera_fps``). ``pipeline_fps_resizing`` /
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
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeknn import config
from edgeknn.imagefiles import find_images, load_rgb
from edgeknn.model import DEFAULT_MODEL_FILE, Embedder
from edgeknn.store import VIEW_RULES, KnnStore

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sign_language_digits"
PIPELINE_EXAMPLES = 1000
STARTUP_EXAMPLES = 10_000
KNN_SIZES = (1000, 10_000, 100_000)
ADD_SIZES = (1000, 10_000)
PACE = 1.1  # the replay camera's rate, times the raw invoke rate

# name: (target, lower is better?) for the table
TARGETS = {
    "pipeline_ratio": (0.95, False),
    "knn_us_1000": (100.0, True),
    "knn_us_10000": (1500.0, True),
    "uint8_agreement": (0.99, False),
    "startup_s": (1.0, True),
    "rss_mb": (120.0, True),
}


class BenchError(Exception):
    """The bench cannot go on (the message says why)."""


@dataclass(frozen=True)
class Plan:
    """How much to measure: ``quick`` is for tests (all keys, fewer repetitions)."""

    rounds: int  # interleaved raw / pipeline blocks
    invokes: int  # raw invokes per block
    frames: int  # pipeline frames per block
    queries: int  # k-NN queries per store size
    adds: int  # timed adds per store size
    photos: int  # real photos embedded for the uint8 agreement
    settle_s: float  # how long the subprocess classifies before its VmHWM is read
    quick: bool

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                rounds=2, invokes=20, frames=40, queries=20, adds=50, photos=200, settle_s=1.5, quick=True
            )
        return cls(
            rounds=20, invokes=30, frames=90, queries=200, adds=300, photos=600, settle_s=3.0, quick=False
        )


@dataclass(frozen=True)
class Setup:
    """What every part of the bench measures with."""

    cfg: config.Config
    model: Path
    threads: int
    frames: Path  # the replay folder
    tmp: Path
    broker: tuple[str, int] | None
    plan: Plan

    def daemon_config(self, name: str, store_path: Path, fps: float, **overrides) -> config.Config:
        """The configured daemon on the bench's model, a store, the replay at ``fps`` and the broker."""
        settings = {
            "state_dir": str(self.tmp / f"{name}-state"),
            "model.path": str(self.model.absolute()),
            "model.threads": self.threads,
            "store.path": str(store_path),
            "store.autosave_s": 86400.0,
            "camera.source": f"replay:{self.frames.absolute()}?fps={fps:g}&loop=1",
            "panel.kind": "none",
            "mqtt.enabled": self.broker is not None,
            "mqtt.device_id": f"{name}{os.getpid()}",
            **overrides,
        }
        if self.broker is not None:
            settings["mqtt.host"], settings["mqtt.port"] = self.broker
        return config.replace(self.cfg, **settings)


def run_bench(args, cfg: config.Config) -> int:
    """`edgeknn bench`: measure, then print a table or (``--json``) one JSON object."""
    try:
        model = bench_model(args, cfg)
        threads = args.threads or cfg.model.threads or os.cpu_count() or 1
        data = getattr(args, "data", None) or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
        results = measure(model, threads, Path(data) if data else None, cfg, bool(args.quick), not args.json)
    except BenchError as e:
        print(f"edgeknn: bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results))
    else:
        print(table(results, model, data))
    return 0


def bench_model(args, cfg: config.Config) -> Path:
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
    model: Path, threads: int, data: Path | None, cfg: config.Config, quick: bool, verbose: bool
) -> dict[str, float]:
    plan = Plan.make(quick)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if verbose else (lambda text: None)
    started = time.monotonic()
    results: dict[str, float] = {"threads": threads}
    with tempfile.TemporaryDirectory(prefix="edgeknn-bench-") as tmp_name:
        tmp = Path(tmp_name)
        frames = data if data else synthetic_frames(tmp / "frames")
        broker = LocalBroker.start_in(tmp / "broker") or reachable_broker(cfg)
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
        finally:
            if isinstance(broker, LocalBroker):
                broker.stop()
    results["bench_s"] = time.monotonic() - started
    return {k: round(float(v), 4) for k, v in results.items()}


# --- the pipeline ---------------------------------------------------------------------------------


class Player:
    """The bench's control over its replay: the pace (0 = as fast as possible) and a pause."""

    def __init__(self, frames: list[np.ndarray]):
        self.frames = frames
        self.period = 0.0
        self.running = threading.Event()

    def pause(self) -> None:
        self.running.clear()
        time.sleep(0.02)  # the camera thread finishes the frame in hand and waits

    def play(self, fps: float) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.running.set()


class ReplayFrames:
    """A replay source whose frames were decoded before the run (as ReplaySource decodes them),
    played in a loop at the Player's pace; while paused, ``read()`` waits (the thread is idle)."""

    def __init__(self, player: Player):
        self._player = player
        self._index = 0
        self._next_due: float | None = None
        self._closed = threading.Event()

    def read(self) -> np.ndarray:
        from edgeknn.camera import CameraError

        player = self._player
        while not player.running.wait(0.1) or self._closed.is_set():
            if self._closed.is_set():
                raise CameraError("bench replay: closed")
            self._next_due = None
        if player.period:  # the same schedule as ReplaySource: no burst after falling behind
            now = time.monotonic()
            if self._next_due is None or now - self._next_due > player.period:
                self._next_due = now
            elif now < self._next_due and self._closed.wait(self._next_due - now):
                raise CameraError("bench replay: closed")
            self._next_due += player.period
        frame = player.frames[self._index % len(player.frames)]
        self._index += 1
        return frame

    def close(self) -> None:
        self._closed.set()


def decode_frames(folder: Path, size: tuple[int, int], budget: int = 64 << 20) -> list[np.ndarray]:
    """The replay folder's images as ReplaySource reads them (longer side at most twice the model's)."""
    frames: list[np.ndarray] = []
    used = 0
    for path in find_images(folder):
        frame = load_rgb(path, 2 * max(size))
        frames.append(frame)
        used += frame.nbytes
        if used >= budget or len(frames) >= 512:
            break
    return frames


def pipeline(setup: Setup, results: dict) -> Embedder:
    """The daemon's loop against raw invokes, then frame → MQTT arrival with every frame published.

    Two daemons from ``daemon.build``: the first publishes as configured (``mqtt.publish``) and gives
    the pipeline rate; the second publishes every frame and gives the latency (and that rate too).
    """
    store_path = setup.tmp / "pipeline-store.npz"
    pcfg = setup.daemon_config("bench", store_path, fps=0, log_level="warning")
    probe = Embedder(setup.model, setup.threads)
    random_store(probe, pcfg, PIPELINE_EXAMPLES, seed=1).save(store_path)
    photos = decode_frames(setup.frames, probe.model.input_size)
    player = Player([probe.model.prepare(photo) for photo in photos])  # as the ISP delivers them
    vga = np.zeros((480, 640, 3), np.uint8)
    results["prepare_ms_640x480"] = median_us(probe.model.prepare, [vga] * setup.plan.queries) / 1000
    del probe

    run = run_daemon(pcfg, player, setup.plan.rounds, setup.plan, resizing=photos)
    results["invoke_ms"] = run.invoke_ms
    results["raw_fps"] = 1000 / run.invoke_ms
    results["pipeline_fps"] = run.fps
    results["pipeline_ratio"] = run.fps / results["raw_fps"]
    results["camera_fps"] = run.camera_fps
    results["loop_cpu_ms"] = statistics.median(run.loop_cpu) * 1000
    results["pipeline_fps_resizing"] = run.resizing_fps
    results["pipeline_ratio_resizing"] = run.resizing_fps / results["raw_fps"]
    if setup.broker is None:
        return run.embedder
    every = config.replace(pcfg, **{"mqtt.publish": "every_frame"})
    topic = f"{every.resolved_base_topic()}/prediction"
    subscriber = Subscriber.start(setup.broker, topic, setup.tmp / "arrivals.txt")
    run = run_daemon(every, player, max(1, setup.plan.rounds // 2), setup.plan)
    results["pipeline_ratio_every_frame"] = run.fps * run.invoke_ms / 1000
    if subscriber is not None:
        arrivals = subscriber.stop()
        latencies = [(arrivals[f] - ts) * 1000 for f, ts in run.captured.items() if f in arrivals]
        if latencies:
            results["frame_to_publish_ms_p50"] = float(np.percentile(latencies, 50))
            results["frame_to_publish_ms_p99"] = float(np.percentile(latencies, 99))
            results["published_share"] = len(latencies) / len(run.captured)
    return run.embedder


@dataclass
class DaemonRun:
    embedder: Embedder
    invokes: list[float] = field(default_factory=list)  # seconds per raw invoke
    steps: list[float] = field(default_factory=list)  # seconds per classified frame (Daemon.step)
    captured: dict[int, float] = field(default_factory=dict)  # frame number → capture time
    camera_fps: float = 0.0  # the replay's pace in the last block
    resizing_fps: float = 0.0  # frames per second when the camera thread resizes every frame
    loop_cpu: list[float] = field(default_factory=list)  # CPU seconds of the loop's thread per frame

    @property
    def invoke_ms(self) -> float:
        return statistics.median(self.invokes) * 1000

    @property
    def fps(self) -> float:
        return 1 / statistics.median(self.steps)


def run_daemon(
    pcfg: config.Config,
    player: Player,
    rounds: int,
    plan: Plan,
    resizing: list[np.ndarray] | None = None,
) -> DaemonRun:
    """Build and start a daemon; alternate raw-invoke blocks (camera paused) and pipeline blocks.

    Both rates are medians (of invokes, of ``Daemon.step`` calls), so a noisy neighbour's bursts
    skew neither. The replay runs at PACE x the fastest loop rate seen so far: a new frame is
    always there when the loop wants one, and the camera thread does not burn a core on frames
    that would be dropped. ``resizing``: one more block with these frames, which the camera
    thread must crop and resize.
    """
    from edgeknn.daemon import build, start

    player.pause()
    daemon = build(pcfg, opener=lambda: ReplayFrames(player))
    interpreter = daemon.embedder.model.interpreter
    run = DaemonRun(daemon.embedder)
    loop_fps: list[float] = []

    def raw_block() -> None:
        player.pause()
        daemon.settle()  # the inference thread is done with the interpreter
        for _ in range(plan.invokes):
            t = time.perf_counter()
            interpreter.invoke()
            run.invokes.append(time.perf_counter() - t)

    def pipeline_block(fps: float) -> list[float]:
        player.play(fps)
        for _ in range(3):  # the camera thread is awake again
            daemon.step(timeout=5)
        steps = []
        cpu = time.thread_time()
        for _ in range(plan.frames):
            t = time.perf_counter()
            reading = daemon.step(timeout=5)
            if reading is not None:
                steps.append(time.perf_counter() - t)
                run.captured[reading.frame] = reading.ts
        run.loop_cpu.append((time.thread_time() - cpu) / max(1, len(steps)))
        return steps

    start(daemon)
    try:
        deadline = time.monotonic() + 10
        while pcfg.mqtt.enabled and daemon.broker_status() != "ok" and time.monotonic() < deadline:
            time.sleep(0.02)
        raw_block()
        player.play(PACE * 1000 / run.invoke_ms)
        warm_until = time.monotonic() + 0.5  # the first frames fit the head; a subscriber subscribes
        while time.monotonic() < warm_until:
            daemon.step(timeout=5)
        run.captured.clear()
        for _ in range(rounds):
            raw_block()
            run.camera_fps = PACE * max(loop_fps or [1000 / run.invoke_ms])
            steps = pipeline_block(run.camera_fps)
            run.steps += steps
            loop_fps.append(1 / statistics.median(steps))
        if resizing is not None:
            captured, model_sized = dict(run.captured), player.frames
            player.frames = resizing
            run.resizing_fps = 1 / statistics.median(pipeline_block(run.camera_fps))
            player.frames, run.captured = model_sized, captured
    finally:
        player.play(0)
        daemon.shutdown()
    if not run.steps:
        raise BenchError(f"the daemon classified no frames (camera: {daemon.capture.error or 'no frames'})")
    return run


def random_store(embedder: Embedder, cfg: config.Config, n: int, seed: int, **settings) -> KnnStore:
    """A store of ``n`` random non-negative unit vectors (as ReLU embeddings are), spread over the classes."""
    s = cfg.store
    options = {"k": s.k, "rule": s.rule, "threshold": s.threshold, "storage": s.storage, **settings}
    options["capacity"] = max(options.get("capacity", s.capacity), n)
    store = KnnStore(embedder.dim, embedder.identity, **options)
    classes = list(cfg.classes)
    for start_row, rows in random_rows(n, embedder.dim, seed):
        for i, row in enumerate(rows, start_row):
            store.add(classes[i % len(classes)], row)
    return store


def random_rows(n: int, dim: int, seed: int, chunk: int = 4096):
    """(first index, rows) chunks of random non-negative unit vectors, the same for the same seed."""
    rng = np.random.default_rng(seed)
    for start_row in range(0, n, chunk):
        rows = np.abs(rng.standard_normal((min(chunk, n - start_row), dim), dtype=np.float32))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        yield start_row, rows


class Subscriber:
    """mosquitto_sub in its own process (it takes no CPU time or GIL from the bench's threads);
    it stamps each message's arrival (``%U``) into a file that is read when it has ended."""

    def __init__(self, proc: subprocess.Popen, output: Path):
        self.proc, self.output = proc, output

    @classmethod
    def start(cls, broker: tuple[str, int], topic: str, output: Path) -> Subscriber | None:
        binary = find_binary("mosquitto_sub", "/usr/bin", "/usr/local/bin")
        if binary is None:
            return None
        host, port = broker
        cmd = [binary, "-h", host, "-p", str(port), "-t", topic, "-q", "1", "-F", "%U %p"]
        with open(output, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        return cls(proc, output)

    def stop(self) -> dict[int, float]:
        """End the subscriber (SIGTERM: it flushes its output); {frame number: arrival time}."""
        time.sleep(0.2)  # the last messages arrive
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        arrivals: dict[int, float] = {}
        for line in self.output.read_text(errors="replace").splitlines():
            stamp, _, payload = line.partition(" ")
            try:
                arrivals[int(json.loads(payload)["frame"])] = float(stamp)
            except (ValueError, KeyError, TypeError):
                continue
        return arrivals


# --- the k-NN store -------------------------------------------------------------------------------


def knn(embedder: Embedder, cfg: config.Config, plan: Plan, results: dict) -> None:
    """Classify over 1 000 / 10 000 / 100 000 rows for each storage; add at 1 000 and 10 000."""
    for storage in ("float32", "uint8"):
        knn_storage(embedder, cfg, plan, storage, results)
    results["add_us"] = results["add_us_10000"]


def knn_storage(embedder: Embedder, cfg: config.Config, plan: Plan, storage: str, results: dict) -> None:
    """One storage: the k-NN rule (tfjs: k nearest rows vote), so the time is the search itself."""
    queries = next(random_rows(plan.queries, embedder.dim, seed=99))[1]
    store = KnnStore(
        embedder.dim, embedder.identity, k=cfg.store.k, rule="tfjs", capacity=10**9, storage=storage
    )
    classes = list(cfg.classes)
    suffix = "" if storage == "float32" else "_uint8"
    for size in KNN_SIZES:
        for _, rows in random_rows(size - len(store), embedder.dim, seed=size):
            for row in rows:
                store.add(classes[len(store) % len(classes)], row)
        results[f"knn_us{suffix}_{size}"] = median_us(store.classify, queries)
        if size in ADD_SIZES:  # after the k-NN timing: these adds grow the store a little
            extra = next(random_rows(plan.adds, embedder.dim, seed=size + 1))[1]
            results[f"add_us{suffix}_{size}"] = median_us(lambda row: store.add(classes[0], row), extra)
            if storage == "float32":  # a full class: each add replaces the class's oldest example
                store.capacity = min(store.counts().values())
                results[f"add_full_us_{size}"] = median_us(lambda row: store.add(classes[1], row), extra)
                store.capacity = 10**9
    results[f"store_mb{suffix}_{max(KNN_SIZES)}"] = store._rows[: len(store)].nbytes / 2**20


def fit(embedder: Embedder, cfg: config.Config, plan: Plan, results: dict) -> None:
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


def median_us(call: Callable, items) -> float:
    times = []
    for item in items:
        t = time.perf_counter()
        call(item)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def agreement(embedder: Embedder, cfg: config.Config, frames: Path, plan: Plan, results: dict) -> None:
    """Real photos: about half are examples (class = folder), the rest are asked; uint8 vs float32.

    ``uint8_agreement``: answers of the configured rule alike; ``uint8_agreement_knn``: of the k-NN vote.
    """
    files = find_images(frames)
    rng = np.random.default_rng(3)
    chosen = [files[i] for i in sorted(rng.choice(len(files), min(plan.photos, len(files)), replace=False))]
    vectors = np.stack([embedder.embed(load_rgb(f, 2 * max(embedder.model.input_size))) for f in chosen])
    labels = [f.parent.name for f in chosen]
    teach = rng.random(len(chosen)) < 0.5
    s = cfg.store
    for key, rule in (("uint8_agreement", s.rule), ("uint8_agreement_knn", "tfjs")):
        answers = {}
        for storage in ("float32", "uint8"):
            store = KnnStore(
                embedder.dim, embedder.identity, k=s.k, rule=rule, capacity=10**9, storage=storage
            )
            for vector, label in zip(vectors[teach], np.array(labels)[teach], strict=True):
                store.add(str(label), vector)
            answers[storage] = [store.classify(v).label for v in vectors[~teach]]
        same = [a == b for a, b in zip(answers["float32"], answers["uint8"], strict=True)]
        results[key] = sum(same) / max(1, len(same))
    results["agreement_photos"] = int((~teach).sum())


# --- startup and memory ---------------------------------------------------------------------------


def startup(setup: Setup, embedder: Embedder, results: dict) -> None:
    """`edgeknn run` with a 10 000-example store: start → READY, first prediction, peak memory;
    then the same with the other storage (keys ending in ``_uint8`` or ``_float32``)."""
    cfg, tmp = setup.cfg, setup.tmp
    settings = store_settings(cfg, capacity=STARTUP_EXAMPLES)
    configured = settings["storage"]
    for storage in (configured, "uint8" if configured == "float32" else "float32"):
        suffix = "" if storage == configured else f"_{storage}"
        store_path = tmp / f"startup-store{suffix}.npz"
        random_store(embedder, cfg, STARTUP_EXAMPLES, seed=2, storage=storage).save(store_path)
        if storage == configured:
            loads = []
            for _ in range(3):
                t = time.perf_counter()
                KnnStore.load(store_path, embedder.identity, **settings)
                loads.append(time.perf_counter() - t)
            results["store_load_ms"] = statistics.median(loads) * 1000
        measured: dict[str, float] = {}
        run_process(setup, store_path, storage, measured)
        results.update({key + suffix: value for key, value in measured.items()})


def run_process(setup: Setup, store_path: Path, storage: str, results: dict) -> None:
    """One `edgeknn run` subprocess on ``store_path``: startup_s, first_prediction_s, rss_mb."""
    tmp, broker, plan = setup.tmp, setup.broker, setup.plan
    rcfg = setup.daemon_config(
        f"run{storage}",
        store_path,
        fps=30,
        log_level="info",
        **{"store.capacity": STARTUP_EXAMPLES, "store.storage": storage},
    )
    conf = tmp / f"run-{storage}.toml"
    conf.write_text(to_toml(config.to_dict(rcfg)))
    first = None  # a subscriber that ends at the first prediction: the daemon is classifying
    if broker is not None:
        binary = find_binary("mosquitto_sub", "/usr/bin", "/usr/local/bin")
        if binary:
            topic = f"{rcfg.resolved_base_topic()}/prediction"
            cmd = [binary, "-h", broker[0], "-p", str(broker[1]), "-t", topic, "-C", "1"]
            first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    notify_path = tmp / f"notify-{storage}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID"):
        env.pop(name, None)
    log_path = tmp / f"run-{storage}.log"
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*edgeknn_command(), "run", "--config", str(conf)], env=env, stdout=log, stderr=log
        )
        try:
            ready = wait_for_ready(listener, proc, 60)
            if ready is None:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise BenchError(f"`edgeknn run` did not become ready; its log ends:\n{tail}")
            results["startup_s"] = ready - t0
            results["rss_ready_mb"] = vm_hwm_kb(proc.pid) / 1024
            if first is not None:
                try:
                    first.wait(60)
                    results["first_prediction_s"] = time.monotonic() - t0
                except subprocess.TimeoutExpired:
                    pass
            time.sleep(plan.settle_s)  # classifying for a while
            if proc.poll() is not None:
                raise BenchError(f"`edgeknn run` ended early (status {proc.returncode})")
            results["rss_mb"] = vm_hwm_kb(proc.pid) / 1024
        finally:
            stop_process(proc)
            if first is not None:
                stop_process(first)
            listener.close()


def store_settings(cfg: config.Config, **overrides) -> dict:
    s = cfg.store
    settings = {"k": s.k, "rule": s.rule, "threshold": s.threshold, "capacity": s.capacity}
    return {**settings, "storage": s.storage, **overrides}


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s; only ever a process the bench started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def to_toml(table: dict, prefix: str = "") -> str:
    """A config dict (``config.to_dict``) as TOML: values first, then one [section] per sub-table."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in table.items() if not isinstance(value, dict)]
    for key, value in table.items():
        if isinstance(value, dict):
            lines += ["", f"[{prefix}{key}]", to_toml(value, f"{prefix}{key}.")]
    return "\n".join(lines) + "\n"


def find_binary(name: str, *folders: str) -> str | None:
    """``name`` on PATH or in one of ``folders`` (mosquitto lives in /usr/sbin, often not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    return next((str(Path(f) / name) for f in folders if os.access(Path(f) / name, os.X_OK)), None)


def edgeknn_command() -> list[str]:
    script = Path(sys.executable).parent / "edgeknn"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from edgeknn.cli import main; sys.exit(main())"]


def wait_for_ready(listener: socket.socket, proc: subprocess.Popen, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        listener.settimeout(0.2)
        try:
            message = listener.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in message.split(b"\n"):
            return time.monotonic()
    return None


def vm_hwm_kb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    raise BenchError(f"process {pid}: no VmHWM in /proc/{pid}/status")


# --- brokers and frames ---------------------------------------------------------------------------


class LocalBroker(tuple):
    proc: subprocess.Popen

    @classmethod
    def start_in(cls, directory: Path) -> LocalBroker | None:
        binary = find_binary("mosquitto", "/usr/sbin", "/usr/local/sbin")
        if binary is None:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        lines = [f"user {getpass.getuser()}"] if os.geteuid() == 0 else []
        lines += ["allow_anonymous true", "persistence false", f"listener {port} 127.0.0.1"]
        conf = directory / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                time.sleep(0.02)
                continue
            broker = cls(("127.0.0.1", port))
            broker.proc = proc
            return broker
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def reachable_broker(cfg: config.Config) -> tuple[str, int] | None:
    if not cfg.mqtt.enabled or cfg.mqtt.tls or cfg.mqtt.username:
        return None
    try:
        socket.create_connection((cfg.mqtt.host, cfg.mqtt.port), timeout=0.5).close()
    except OSError:
        return None
    return (cfg.mqtt.host, cfg.mqtt.port)


def synthetic_frames(folder: Path, count: int = 64) -> Path:
    """Smooth random colour fields as JPEGs, for machines without the photo folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((320, 240), Image.Resampling.BILINEAR)
        (folder / str(i % 3)).mkdir(parents=True, exist_ok=True)
        image.save(folder / str(i % 3) / f"{i:03d}.jpg", quality=90)
    return folder


# --- the table ------------------------------------------------------------------------------------


def table(results: dict, model: Path, frames: Path | None) -> str:
    """The results as an aligned text table, targets beside the measures that have one."""
    head = (
        f"edgeknn bench: {model.name}, {int(results['threads'])} interpreter threads, "
        f"{platform.machine()} with {os.cpu_count()} CPUs, frames from {frames or 'synthetic images'}"
    )
    lines = [head, f"{'measure':<26}{'value':>11}  target"]
    for key, value in results.items():
        mark = ""
        if key in TARGETS:
            limit, lower = TARGETS[key]
            ok = value <= limit if lower else value >= limit
            mark = f"{'<=' if lower else '>='} {limit:g}{'' if ok else '  MISSED'}"
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        lines.append(f"{key:<26}{text:>11}  {mark}".rstrip())
    return "\n".join(lines)

"""The daemon's loop against raw invokes, and frame → MQTT arrival, on daemons from ``app.build``.

Raw-invoke blocks (camera paused) alternate with pipeline blocks (``Daemon.step`` as
``Daemon.loop`` calls it), so a noisy neighbour skews neither rate more than the other. The
alternation is cut into three parts, each giving a ratio, and ``pipeline_ratio`` is their median:
one noisy stretch does not decide it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edgeknn import config
from edgeknn.bench.broker import MosquittoSub
from edgeknn.bench.inputs import BenchError, Plan, Setup, decode_frames, median_us, random_store
from edgeknn.bench.web import web_viewer
from edgeknn.camera.sources import CameraError, Pacer
from edgeknn.model.embedder import Embedder

if TYPE_CHECKING:
    from edgeknn.device.daemon import Daemon

PIPELINE_EXAMPLES = 1000
PACE = 1.1  # the replay camera's rate, times the raw invoke rate
PARTS = 3  # pipeline_ratio: the median of this many parts of the alternation

# A measured block on the running daemon after the alternation (e.g. with a web viewer attached):
# it gets the daemon, a function that runs one pipeline block and returns its step times (seconds),
# and the median raw invoke (ms); it returns its own keys. Add such blocks to EXTRA_BLOCKS.
ExtraBlock = Callable[["Daemon", Callable[[], list[float]], float], dict[str, float]]
EXTRA_BLOCKS: tuple[ExtraBlock, ...] = (web_viewer,)


class Player:
    """The bench's control over its replay: the pace (0 = as fast as possible) and a pause."""

    def __init__(self, frames: list[np.ndarray]):
        self.frames = frames
        self.fps = 0.0
        self.running = threading.Event()

    def pause(self) -> None:
        self.running.clear()
        time.sleep(0.02)  # the camera thread finishes the frame in hand and waits

    def play(self, fps: float) -> None:
        self.fps = fps
        self.running.set()


class ReplayFrames:
    """A replay source whose frames were decoded before the run (as ReplaySource decodes them),
    played in a loop at the Player's pace (ReplaySource's Pacer); while paused, ``read()`` waits
    (the thread is idle)."""

    def __init__(self, player: Player):
        self._player = player
        self._index = 0
        self._pacer = Pacer()

    def read(self) -> np.ndarray:
        player, pacer = self._player, self._pacer
        while not player.running.wait(0.1) or pacer.closed:
            if pacer.closed:
                raise CameraError("bench replay: closed")
            pacer.restart()
        pacer.fps = player.fps
        if not pacer.wait():
            raise CameraError("bench replay: closed")
        frame = player.frames[self._index % len(player.frames)]
        self._index += 1
        return frame

    def close(self) -> None:
        self._pacer.close()


def pipeline(setup: Setup, results: dict[str, float], latency: bool = True) -> Embedder:
    """The daemon's loop against raw invokes, then frame → MQTT arrival with every frame published.

    Two daemons from ``app.build``: the first publishes as configured (``mqtt.publish``) and gives
    the pipeline rate; the second publishes every frame and gives the latency (and that rate too).
    ``latency=False`` (the compared model): the first daemon only, without the ``EXTRA_BLOCKS``.
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

    extra = EXTRA_BLOCKS if latency else ()
    run = run_daemon(pcfg, player, setup.plan.rounds, setup.plan, resizing=photos, extra=extra)
    results["invoke_ms"] = run.invoke_ms
    results["raw_fps"] = 1000 / run.invoke_ms
    results["pipeline_fps"] = run.fps
    ratios = run.part_ratios()
    results["pipeline_ratio"] = statistics.median(ratios)
    results["pipeline_ratio_min"], results["pipeline_ratio_max"] = min(ratios), max(ratios)
    results["camera_fps"] = run.camera_fps
    results["loop_cpu_ms"] = statistics.median(run.loop_cpu) * 1000
    results["pipeline_fps_resizing"] = run.resizing_fps
    results["pipeline_ratio_resizing"] = run.resizing_fps / results["raw_fps"]
    results.update(run.extra)
    if setup.broker is None or not latency:
        return run.embedder
    every = config.replace(pcfg, **{"mqtt.publish": "every_frame"})
    topic = f"{every.resolved_base_topic()}/prediction"
    subscriber = MosquittoSub.start(setup.broker, topic, setup.tmp / "arrivals.txt")
    run = run_daemon(every, player, max(1, setup.plan.rounds // 2), setup.plan)
    results["pipeline_ratio_every_frame"] = run.fps * run.invoke_ms / 1000
    if subscriber is not None:
        time.sleep(0.2)  # the last messages arrive
        subscriber.stop()
        arrivals = subscriber.arrivals()
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
    parts: list[tuple[int, int]] = field(default_factory=list)  # (invokes, steps) at the end of each part
    extra: dict[str, float] = field(default_factory=dict)  # the EXTRA_BLOCKS' keys

    @property
    def invoke_ms(self) -> float:
        return statistics.median(self.invokes) * 1000

    def part_ratios(self) -> list[float]:
        """Per part of the alternation: its pipeline rate over its raw invoke rate."""
        ratios, invokes_from, steps_from = [], 0, 0
        for invokes_to, steps_to in self.parts:
            invoke = statistics.median(self.invokes[invokes_from:invokes_to])
            step = statistics.median(self.steps[steps_from:steps_to])
            ratios.append(invoke / step)
            invokes_from, steps_from = invokes_to, steps_to
        return ratios

    @property
    def fps(self) -> float:
        return 1 / statistics.median(self.steps)


def run_daemon(
    pcfg: config.Config,
    player: Player,
    rounds: int,
    plan: Plan,
    resizing: list[np.ndarray] | None = None,
    extra: tuple[ExtraBlock, ...] = (),
) -> DaemonRun:
    """Build and start a daemon; alternate raw-invoke blocks (camera paused) and pipeline blocks.

    Both rates are medians (of invokes, of ``Daemon.step`` calls), so a noisy neighbour's bursts
    skew neither. The replay runs at PACE x the fastest loop rate seen so far: a new frame is
    always there when the loop wants one, and the camera thread does not burn a core on frames
    that would be dropped. ``resizing``: one more block with these frames, which the camera
    thread must crop and resize. The rounds fall into ``PARTS`` parts (``DaemonRun.parts``);
    ``extra``: blocks measured after the alternation (``ExtraBlock``).
    """
    from edgeknn.device.build import build
    from edgeknn.device.lifecycle import start

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
        run.invokes.clear()  # the warm-up block is in no part
        rounds = max(rounds, PARTS)
        for i in range(rounds):
            raw_block()
            run.camera_fps = PACE * max(loop_fps or [1000 / run.invoke_ms])
            steps = pipeline_block(run.camera_fps)
            run.steps += steps
            loop_fps.append(1 / statistics.median(steps))
            if (i + 1) * PARTS // rounds > i * PARTS // rounds:  # the last round of a part
                run.parts.append((len(run.invokes), len(run.steps)))
        for block in extra:
            run.extra.update(block(daemon, lambda: pipeline_block(run.camera_fps), run.invoke_ms))
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

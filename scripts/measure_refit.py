#!/usr/bin/env python3
"""Issue 20, finding 3: what 5 deletes cost the frame loop on a 3 000-example store (6 views each).

A store of random non-negative unit rows (the extractor's 1024-d embeddings are ReLU outputs: the
same kind) is saved, a daemon is built on it as `edgeknn run` builds one (the default rule, a
replay of the sign-language photos, the unit's 30 s watchdog: a ping every 15 s to a NOTIFY_SOCKET
stand-in), and once it predicts, 5 DeleteExample commands are queued together. Printed: the time
to the last reply, the longest gap between two predictions and between two WATCHDOG pings from
the first delete until 45 s after the last reply, the loop's longest step (over that time, and until
2 s after the last reply), the loop thread's CPU time in each delete, and the load average.

    OPENBLAS_NUM_THREADS=1 python scripts/measure_refit.py [--examples 3000] [--storage S] [--code /work/main]

``--code``: measure another checkout (a re-run of this script with it first on sys.path).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARED = Path("/work/shared")
MODEL = SHARED / "models" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
PHOTOS = SHARED / "data" / "sign_language_digits" / "3"
CLASSES = ["0", "1", "2", "3", "4"]


class Pings:
    """A NOTIFY_SOCKET stand-in: the arrival time of every WATCHDOG=1."""

    def __init__(self, path: Path):
        self.times: list[float] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            if b"WATCHDOG=1" in data:
                self.times.append(time.monotonic())

    def close(self) -> None:
        self._stop = True


def longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *[t for t in times if start < t < end], end]
    return max(b - a for a, b in zip(points, points[1:], strict=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--deletes", type=int, default=5)
    parser.add_argument("--after", type=float, default=45.0, help="seconds watched after the last reply")
    parser.add_argument("--code", type=Path, help="a checkout to measure instead of this one")
    parser.add_argument("--storage", help="store.storage (default: the code's default)")
    args = parser.parse_args()
    if args.code is not None and os.environ.get("MEASURE_REFIT_CODE") != str(args.code):
        env = {**os.environ, "PYTHONPATH": str(args.code), "MEASURE_REFIT_CODE": str(args.code)}
        script = str(Path(__file__).resolve())
        return subprocess.call([sys.executable, script, *sys.argv[1:]], env=env, cwd="/")

    import numpy as np

    import edgeknn
    from edgeknn import config
    from edgeknn.commands import DeleteExample, Result
    from edgeknn.device.build import build
    from edgeknn.device.lifecycle import start
    from edgeknn.device.systemd import Notifier
    from edgeknn.model.classifier import open_model
    from edgeknn.outputs import Output, Reading
    from edgeknn.store.knn import KnnStore

    print(f"code: {Path(edgeknn.__file__).parent.parent}")
    tmp = Path(tempfile.mkdtemp(prefix="measure-refit-"))
    cfg = config.from_dict(
        {
            "classes": CLASSES,
            "state_dir": str(tmp),
            "model": {"path": str(MODEL), "threads": 2},
            "camera": {"source": f"replay:{PHOTOS}?fps=15"},
            "store": {
                "autosave_s": 2.0,
                "capacity": args.examples,
                **({"storage": args.storage} if args.storage else {}),
            },
            "panel": {"kind": "none"},
            "mqtt": {"enabled": False},
            "web": {"enabled": False},
        }
    )
    embedder = open_model(MODEL, 1)
    store = KnnStore(embedder.dim, embedder.identity, cfg.store.settings())
    rng = np.random.default_rng(0)
    t0 = time.time() - args.examples * 10.0
    for i in range(args.examples):
        views = np.abs(rng.standard_normal((6, embedder.dim), dtype=np.float32))
        store.add(
            CLASSES[i % len(CLASSES)], views / np.linalg.norm(views, axis=1, keepdims=True), added=t0 + i * 10
        )
    store.save(cfg.store_path())
    ids = [e.id for e in store.examples()][: args.deletes]
    del store
    pings = Pings(tmp / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp / "notify"), "WATCHDOG_USEC": "30000000"})
    daemon = build(cfg, notifier=notifier)

    class Times(Output):
        def __init__(self) -> None:
            self.times: list[float] = []

        def show(self, reading: Reading) -> None:
            self.times.append(time.monotonic())

    shown = Times()
    daemon.outputs.append(shown)
    steps: list[float] = []
    step = daemon.step

    def timed_step(*a, **k):
        t = time.monotonic()
        try:
            return step(*a, **k)
        finally:
            steps.append((t, time.monotonic() - t))

    daemon.step = timed_step  # type: ignore[method-assign]
    deleting: list[float] = []  # the loop thread's CPU time in each KnnStore.delete_example
    delete_example = daemon.store.delete_example

    def timed_delete(example: int) -> str:
        t = time.thread_time()
        try:
            return delete_example(example)
        finally:
            deleting.append(time.thread_time() - t)

    daemon.store.delete_example = timed_delete  # type: ignore[method-assign]
    start(daemon)
    loop = threading.Thread(target=daemon.loop, name="edgeknn-main", daemon=True)
    loop.start()
    deadline = time.monotonic() + 300
    while len(shown.times) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    replies: list[Result] = []
    begin = time.monotonic()
    cpu = time.process_time()
    for example in ids:
        daemon.submit(DeleteExample(example=example, source="measure", reply=replies.append))
    while len(replies) < len(ids) and time.monotonic() < begin + 600:
        time.sleep(0.05)
    replied = time.monotonic() - begin
    end = time.monotonic() + args.after
    while time.monotonic() < end:
        time.sleep(0.5)
    daemon.stop()
    loop.join(60)
    daemon.shutdown()
    pings.close()
    ok = sum(r.ok for r in replies)
    load = os.getloadavg()
    longest_step = max((d for t, d in steps if t >= begin), default=0.0)
    near = max((d for t, d in steps if begin <= t <= begin + replied + 2.0), default=0.0)
    used = time.process_time() - cpu
    print(f"{ok}/{len(ids)} deletes answered in {replied:.2f} s (process CPU over the run {used:.1f} s)")
    print(f"longest gap between predictions: {longest_gap(shown.times, begin, end):.2f} s")
    print(f"longest gap between WATCHDOG pings: {longest_gap(pings.times, begin, end):.2f} s (every 15 s)")
    after = sum(t > begin for t in shown.times)
    print(f"longest loop step: {longest_step * 1000:.0f} ms; predictions after the deletes: {after}")
    print(f"longest loop step until 2 s after the last reply: {near * 1000:.0f} ms")
    cpu_ms = ", ".join(f"{d * 1000:.1f}" for d in deleting)
    print(f"loop thread CPU in each delete_example: {cpu_ms} ms (storage {daemon.store.storage})")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

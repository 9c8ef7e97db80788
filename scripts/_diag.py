#!/usr/bin/env python3
"""Measure issue 25's targets (a fleet on one broker) and print one table.

  python scripts/fleet-targets.py [--parts 1,2,3,4] [--every 3] [--settings device|rig] [--examples 3000]

1. A leader taught 3 classes x 5 examples and 5 followers (one on mobilenet_v1_0.75_192), in-process on one
   real Mosquitto: the time from the last example taught until each follower's store matches, then the share
   of photos (every ``--every``-th photo of sign digits 1, 2, 5: all of each class, not only the taught ones)
   on which each follower's stable label equals the leader's. Every device is shown the same photos in the
   same order, one frame per photo (its camera waits until the previous frame was classified), so the
   comparison is per photo.
2. On the leader: a class renamed, a class removed, an example deleted: the time until every follower has it.
3. A pack of ``--examples`` examples (6 views each, a real JPEG each) published by an ``edgeknn run``
   leader and loaded by an ``edgeknn run`` follower (its ``store.storage``: ``--storage``): VmHWM before and
   after on both sides, the time to publish and to load, the broker's retained bytes under <base>/fleet/#;
   then a second pack (a class renamed on the leader) loaded by the follower that holds the first: VmHWM.
4. The broker killed (SIGKILL) during a publish of that pack, then started again on the same port; the leader
   process killed mid-pack: does the follower keep its last good pack, does anything crash, does the new
   pack arrive once the broker is back.

Real components only: the TFLite models in /work/shared, a Mosquitto started here (edgeknn.bench.broker).
Note the load average beside the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from conftest import DIGITS, EXTRACTOR, SHARED  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from rig import CLASSES, Running, make_config, photo_folders, teach, wait_for  # noqa: E402

from edgeknn.bench.broker import Broker, end_process  # noqa: E402
from edgeknn.camera.sources import CameraError, ReplaySource  # noqa: E402
from edgeknn.imagefiles import find_images, load_rgb  # noqa: E402

OTHER_MODEL = SHARED / "models" / "mobilenet_v1_0.75_192_quant.tflite"
ROWS: list[tuple[str, str, str]] = []  # (item, measure, figure)


def row(item: str, measure: str, figure: str) -> None:
    ROWS.append((item, measure, figure))
    print(f"  [{item}] {measure}: {figure}", flush=True)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# --- items 1 and 2: six daemons in this process ----------------------------------------------------------


class Feed:
    """The world in front of every camera: while teaching, the shown class's few photos in a loop (paced);
    then ``sequence``: the same photos, in the same order, one frame each, in lockstep with each device."""

    def __init__(self, folders: dict[str, Path], fps: float):
        self.folders, self.fps = folders, fps
        self.shown = CLASSES[0]
        self.sequence: list[np.ndarray] | None = None


class FeedSource:
    def __init__(self, feed: Feed, device: Device):
        self.feed, self.device = feed, device
        self.reads = 0
        self._replays: dict[str, ReplaySource] = {}
        self._closed = threading.Event()

    def read(self) -> np.ndarray:
        if self._closed.is_set():
            raise CameraError("feed: closed")
        feed, device = self.feed, self.device
        if feed.sequence is not None and device.position < len(feed.sequence):
            # lockstep: the frame before has been classified and shown (or 60 s passed)
            deadline = time.monotonic() + 60
            while not self._closed.is_set() and time.monotonic() < deadline:
                readings = device.run.recorder.readings if device.run else []
                if not readings or readings[-1].frame >= self.reads:
                    break
                time.sleep(0.005)
            self.reads += 1
            device.photo_of_frame[self.reads] = device.position
            device.position += 1
            return feed.sequence[device.position - 1]
        if feed.sequence is not None:  # the sequence is over: hold the last frame
            time.sleep(0.2)
        name = feed.shown
        if name not in self._replays:
            self._replays[name] = ReplaySource(feed.folders[name], fps=feed.fps, loop=True, size=(224, 224))
        self.reads += 1
        return self._replays[name].read()

    def close(self) -> None:
        self._closed.set()
        for replay in self._replays.values():
            replay.close()


class Device:
    def __init__(self, name: str, feed: Feed):
        self.name, self.feed = name, feed
        self.run: Running | None = None
        self.position = 0
        self.photo_of_frame: dict[int, int] = {}
        self.sources: list[FeedSource] = []

    def opener(self) -> FeedSource:
        source = FeedSource(self.feed, self)
        self.sources.append(source)
        return source

    def labels_by_photo(self) -> dict[int, str]:
        assert self.run is not None
        out = {}
        for reading in list(self.run.recorder.readings):
            photo = self.photo_of_frame.get(reading.frame)
            if photo is not None:
                out[photo] = reading.label
        return out


# ``--settings``: "device", what a device runs unless told otherwise (the default rule, whose head and
# unknown threshold are fitted in a space centred on the frames the device has seen); "rig", the test
# rig's (the exact k-NN, which has no centre and no unknown answer, and a 5-frame window)
SETTINGS = {
    "device": {"store": {"autosave_s": 0.5, "rule": "default"}, "stabilizer": {}},
    "rig": {},
}


def device_config(
    root: Path, broker: Broker, name: str, model: Path | None = None, settings: str = "device", **fleet
):
    folder = root / name
    folder.mkdir(parents=True)
    extra = (
        {"model": {"path": str(model), "threads": 1}}
        if model
        else {"model": {"path": str(EXTRACTOR), "threads": 1}}
    )
    return make_config(
        folder,
        **extra,
        **SETTINGS[settings],
        panel={"kind": "none"},
        mqtt={
            "enabled": True,
            "host": "127.0.0.1",
            "port": broker.port,
            "device_id": name,
            "discovery": False,
        },
        fleet=fleet,
    )


def submit(run: Running, command) -> object:
    results: list = []
    run.daemon.submit(command(results.append))
    assert wait_for(lambda: results, 60), "no result"
    return results[0]


def same_store(leader: Running, follower: Running) -> bool:
    return (
        follower.daemon.store.classes == leader.daemon.store.classes
        and follower.daemon.store.counts() == leader.daemon.store.counts()
    )


def items_1_2(root: Path, every: int, parts: set[int], settings: str) -> None:
    from edgeknn.commands import DeleteExample, RemoveClass, RenameClass
    from edgeknn.device.build import build

    broker = Broker(root / "broker").start()
    feed = Feed(photo_folders(root), fps=5.0)
    names = ["kitchen", "hall", "porch", "attic", "garage", "shed"]
    devices = {n: Device(n, feed) for n in names}
    other = "shed"
    runs: dict[str, Running] = {}
    try:
        t = time.monotonic()
        for n in names:
            if n == "kitchen":
                cfg = device_config(root, broker, n, settings=settings, publish=True)
            else:
                model = OTHER_MODEL if n == other else None
                cfg = device_config(root, broker, n, model, settings, follow="kitchen")
            runs[n] = devices[n].run = Running(build(cfg, opener=devices[n].opener))
        print(f"six daemons started in {time.monotonic() - t:.1f} s (load {load()})", flush=True)
        devices["solo"] = Device("solo", feed)
        runs["solo"] = devices["solo"].run = Running(
            build(device_config(root, broker, "solo", OTHER_MODEL, settings), opener=devices["solo"].opener)
        )
        leader = runs["kitchen"]
        followers = {n: r for n, r in runs.items() if n not in ("kitchen", "solo")}
        teach(runs["solo"], feed, per_class=5)  # type: ignore[arg-type]  # the control: taught itself
        teach(leader, feed, per_class=5)  # type: ignore[arg-type]
        taught = time.monotonic()
        row("1", "leader taught", f"{leader.daemon.store.counts()} (fleet.debounce_s 2.0, load {load()})")
        times: dict[str, float] = {}
        pending = set(followers)
        deadline = taught + 300
        while pending and time.monotonic() < deadline:
            for n in list(pending):
                if same_store(leader, followers[n]):
                    times[n] = time.monotonic() - taught
                    pending.discard(n)
            time.sleep(0.02)
        for n in followers:
            model = "0.75_192 (re-embedded)" if n == other else "same model"
            figure = (
                f"{times[n]:.1f} s"
                if n in times
                else f"NOT within 300 s: {followers[n].daemon.store.counts()}"
            )
            row("1", f"store matches: {n}, {model}", figure + " (target <= 60 s)")
        row("1", "load average after loading", load())

        # the same photos, one frame each, in the same order, on every device
        photos = []
        for name in CLASSES:
            paths = find_images(DIGITS / name)[::every]
            photos += [(name, load_rgb(p, 448)) for p in paths]
        feed.sequence = [image for _, image in photos]
        t = time.monotonic()
        done = wait_for(lambda: all(d.position >= len(photos) for d in devices.values()), 1800, 0.5)
        time.sleep(1.0)
        row(
            "1",
            "replay",
            f"{len(photos)} photos (every {every}. of {', '.join(CLASSES)}) on 6 devices in "
            f"{time.monotonic() - t:.0f} s{'' if done else ' (NOT all shown)'}, load {load()}",
        )
        ref = devices["kitchen"].labels_by_photo()
        truth = [name for name, _ in photos]
        row(
            "1",
            "leader: stable label = photo's class",
            f"{np.mean([ref.get(i) == t for i, t in enumerate(truth)]) * 100:.1f} % of {len(ref)} frames",
        )
        from edgeknn.store.head import fit_head, sqrt_features, unit_rows
        for n, dv in devices.items():  # DIAG
            st = dv.run.daemon.store
            m = st._matcher
            f = m.head.fitted
            rows = st._rows.get(np.arange(len(st._rows))).astype(np.float32)
            labels = st._rows.labels
            def acc(fit):
                x = sqrt_features(rows.copy()); x -= fit.center; unit_rows(x)
                return float(np.mean(np.argmax(x @ fit.weights + fit.bias, 1) == labels))
            cold = fit_head("softmax", f.center.copy(), None, rows.copy(), labels, np.ones(len(st.classes), bool))
            raw = [(r.candidate or r.label) for r in dv.run.recorder.readings if r.frame in dv.photo_of_frame]
            lf = leader.daemon.store._matcher.head.fitted
            same = f.center.shape == lf.center.shape
            from edgeknn.store.scan import ExampleIndex, Space
            def thr_at(center):
                idx = ExampleIndex(Space(True, center))
                get = lambda pos: st._rows.get(pos).astype(np.float32)
                idx.sync(len(st._rows), st._rows.examples, get, Space(True, center))
                book = st._book
                added = lambda positions: np.array([book.added(int(i)) for i in st._rows.examples[positions]], np.float64)
                return round(idx.threshold(st._rows.labels, get, len(st.classes), 3, added), 3)
            if same:
                print("DIAG", n, "thr at own fit centre", thr_at(f.center), "at leader's", thr_at(lf.center), "at own running centre", thr_at(m.head.center.copy()))
            print("DIAG", n, "|fit centre - leader fit centre|", round(float(np.linalg.norm(f.center - lf.center)), 4) if same else "-", "calibration", m.index.calibration, "examples", len(st.examples()), "k", st.k if hasattr(st, "k") else None)
            print("DIAG", n, "train acc head", round(acc(f), 3), "|fit centre - centre|", round(float(np.linalg.norm(f.center - m.head.center)), 4), "|W-Wcold same centre|/|W|", round(float(np.linalg.norm(f.weights - cold.weights) / np.linalg.norm(f.weights)), 3), "thr", round(st.effective_threshold, 3), "seen", m.head.seen, "refits", m.refitter.fits if m.refitter else None, {x: raw.count(x) for x in set(raw)}, flush=True)
        pics = [len(leader.daemon.store.picture(e.id) or b"") for e in leader.daemon.store.examples()]
        row("1", "leader's pictures", f"{np.mean(pics) / 1024:.1f} KiB each on average")
        for n in [*followers, "solo"]:
            labels = devices[n].labels_by_photo()
            both = [i for i in ref if i in labels]
            agree = sum(labels[i] == ref[i] for i in both)
            right = np.mean([labels.get(i) == truth[i] for i in range(len(photos))]) * 100
            row(
                "1",
                f"stable label = leader's: {n}",
                f"{agree / max(1, len(both)) * 100:.1f} % of {len(both)} frames "
                f"(its own accuracy {right:.1f} %; target >= 95 %)",
            )
        feed.sequence = None

        if 2 in parts:
            first = leader.daemon.store.examples("1")[0].id
            changes = [
                (
                    "class renamed (5 -> fist)",
                    lambda r: RenameClass(class_name="5", new_name="fist", source="bench", reply=r),
                ),
                ("class removed (2)", lambda r: RemoveClass(class_name="2", source="bench", reply=r)),
                (f"example {first} deleted", lambda r: DeleteExample(example=first, source="bench", reply=r)),
            ]
            for what, command in changes:
                result = submit(leader, command)
                t0 = time.monotonic()
                took: dict[str, float] = {}

                def everyone(took: dict[str, float] = took, t0: float = t0) -> bool:
                    for n, f in followers.items():
                        if n not in took and same_store(leader, f):
                            took[n] = time.monotonic() - t0
                    return len(took) == len(followers)

                ok = wait_for(everyone, 120, 0.02)
                each = ", ".join(f"{n} {took[n]:.1f}" if n in took else f"{n} NOT" for n in followers)
                row(
                    "2",
                    f"{what}: every follower has it",
                    f"{max(took.values(), default=0):.1f} s{'' if ok else ' NOT ALL within 120 s'} "
                    f"(each, s: {each}; result ok={getattr(result, 'ok', None)}; target <= 10 s; "
                    f"load {load()})",
                )
        devices_output(broker)
    finally:
        for n, r in runs.items():
            try:
                r.stop()
            except Exception as e:  # report, go on stopping the others
                print(f"stopping {n}: {e!r}", flush=True)
        broker.kill()


def devices_output(broker: Broker) -> None:
    """``edgeknn devices --broker`` for the six devices, if the command exists."""
    help_ = subprocess.run(
        [sys.executable, "-m", "edgeknn", "devices", "--help"], capture_output=True, text=True
    )
    if help_.returncode != 0:
        row("1", "edgeknn devices", "not in this tree yet: skipped")
        return
    out = subprocess.run([sys.executable, "-m", "edgeknn", "devices", "--broker", f"127.0.0.1:{broker.port}"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    print(f"$ edgeknn devices --broker 127.0.0.1:{broker.port}  (exit {out.returncode})",
          f"\n{out.stdout}{out.stderr}",
          flush=True)  # fmt: skip
    row(
        "1", "edgeknn devices", f"exit {out.returncode}, {len(out.stdout.splitlines())} lines (printed above)"
    )


# --- items 3 and 4: `edgeknn run` processes ----------------------------------------------------------------


def vmhwm(pid: int) -> float:
    """Peak resident memory in MB (0 when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024 if found else 0.0


class Process:
    """``edgeknn run --config`` with every stderr line kept with its arrival time."""

    def __init__(self, name: str, config: Path, root: Path):
        self.name = name
        self.lines: list[tuple[float, str]] = []
        self.log = open(root / f"{name}.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeknn", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip()))
            self.log.write(line)
            self.log.flush()

    def when(self, pattern: str, after: float = 0.0, timeout: float = 300.0) -> float | None:
        """The arrival time of the first line after ``after`` matching ``pattern`` (waits for it)."""
        found: list[float] = []

        def seen() -> bool:
            found[:] = [t for t, line in list(self.lines) if t >= after and re.search(pattern, line)][:1]
            return bool(found)

        return found[0] if wait_for(seen, timeout, 0.05) else None

    def problems(self) -> list[str]:
        return [line for _, line in self.lines if re.search(r"Traceback|ERROR|CRITICAL|Exception", line)]

    def stop(self) -> None:
        end_process(self.proc, signal.SIGTERM, 15)
        self.log.close()


def big_store(path: Path, examples: int, photos: str) -> str:
    """A store of ``examples`` examples of 6 random unit views each and a real JPEG each: a camera-sized photo
    (data/test_photos at 448 px, as a 640x480 camera's frame is stored: ~14 KB) or a 100x100 sign digit."""
    from edgeknn.jpeg import encode
    from edgeknn.model.embedder import Embedder
    from edgeknn.store.knn import KnnStore, StoreSettings

    embedder = Embedder(EXTRACTOR, 1)
    store = KnnStore(embedder.dim, embedder.identity, StoreSettings(capacity=examples))
    if photos == "photos":
        pictures = [encode(load_rgb(p, 448)) for p in find_images(SHARED / "data" / "test_photos")]
    else:
        pictures = [encode(load_rgb(p, 448)) for name in CLASSES for p in find_images(DIGITS / name)[:20]]
    rng = np.random.default_rng(7)
    for i in range(examples):
        rows = np.abs(rng.standard_normal((6, embedder.dim), dtype=np.float32))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        store.add(CLASSES[i % len(CLASSES)], rows, pictures[i % len(pictures)])
    store.save(path)
    return f"{np.mean([len(p) for p in pictures]) / 1024:.1f} KiB per picture"


def run_config(
    root: Path, name: str, port: int, store: Path, examples: int, storage: str = "float32", **fleet
) -> Path:
    fleet_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fleet.items())
    text = f"""
classes = {json.dumps(CLASSES)}
state_dir = "{root / name}"
[model]
path = "{EXTRACTOR}"
threads = 1
[store]
path = "{store}"
capacity = {examples}
storage = "{storage}"
autosave_s = 5.0
[camera]
source = "replay:{DIGITS / "1"}?fps=2&loop=1"
[panel]
kind = "none"
[mqtt]
enabled = true
host = "127.0.0.1"
port = {port}
device_id = "{name}"
discovery = false
[web]
enabled = false
[fleet]
{fleet_lines}
"""
    (root / name).mkdir(exist_ok=True)
    config = root / f"{name}.toml"
    config.write_text(text)
    return config


class Retained:
    """A subscriber to ``topic`` keeping the newest payload of each retained topic."""

    def __init__(self, port: int, topic: str):
        self.payloads: dict[str, bytes] = {}
        self.history: list[tuple[float, str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

        def keep(c, u, m) -> None:
            self.payloads[m.topic] = bytes(m.payload)
            self.history.append((time.monotonic(), m.topic, bytes(m.payload)))

        self.client.on_message = keep
        self.client.on_connect = lambda c, u, f, r, p=None: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_bytes(port: int, base: str) -> tuple[int, int, int]:
    """(bytes, chunk topics, manifest bytes) of the retained messages under ``base``/fleet/#."""
    sub = Retained(port, f"{base}/fleet/#")
    time.sleep(3.0)
    sub.close()
    chunks = {t: p for t, p in sub.payloads.items() if "/pack/" in t and p}
    manifest = len(sub.payloads.get(f"{base}/fleet/manifest", b""))
    return sum(len(p) for p in chunks.values()) + manifest, len(chunks), manifest


STATES: Retained | None = None  # the follower's state messages, all along


def follower_counts(port: int, device: str) -> dict | None:
    """The follower's newest state: its classes and counts, its fleet status."""
    assert STATES is not None
    try:
        state = json.loads(STATES.payloads[f"edgeknn/{device}/state"])
    except (KeyError, ValueError):
        return None
    return {"counts": state.get("classes"), "fleet": state.get("fleet")}


def command(port: int, device: str, name: str, body: dict) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(f"edgeknn/{device}/cmd/{name}", json.dumps(body), qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def items_3_4(root: Path, examples: int, parts: set[int], photos: str, storage: str) -> None:
    t = time.monotonic()
    store = root / "big.npz"
    about = big_store(store, examples, photos)
    row(
        "3",
        "leader store built",
        f"{examples} examples x 6 views, {store.stat().st_size / 1e6:.1f} MB + pictures ({about}) "
        f"in {time.monotonic() - t:.0f} s",
    )
    broker = Broker(root / "broker34", persistence=True)  # not started yet: both processes settle without it
    leader_cfg = run_config(root, "bigleader", broker.port, store, examples, publish=True, debounce_s=1.0)
    follower_cfg = run_config(
        root, "bigfollower", broker.port, root / "follower.npz", examples, storage, follow="bigleader"
    )
    rows = np.load(store)["rows"]
    per_row = rows.shape[1] * 4 if storage == "float32" else rows.shape[1] + 4  # auto: uint8 here
    row("3", f"the follower's store rows once loaded ({storage})", f"{len(rows) * per_row / 1e6:.1f} MB")
    del rows
    leader = Process("bigleader", leader_cfg, root)
    follower = Process("bigfollower", follower_cfg, root)
    procs = [leader, follower]
    try:
        # settled without a broker: the "before" peak
        leader.when(r"classif|running|ready|started", timeout=120)
        time.sleep(20)
        before = {p.name: vmhwm(p.proc.pid) for p in procs}
        start = time.monotonic()
        broker.start()
        global STATES
        STATES = Retained(broker.port, "edgeknn/bigfollower/state")
        published = leader.when(r"fleet: published pack", start, 600)
        connected = leader.when(r"mqtt: connected", start, 1)
        loaded = follower.when(r"fleet: loaded pack", start, 600)
        imported = follower.when(r"event=examples_imported", start, 300)
        wait_for(
            lambda: (follower_counts(broker.port, "bigfollower") or {}).get("fleet", {}).get("pack"), 120
        )

        def shown_at() -> float | None:
            assert STATES is not None
            return next(
                (t for t, _, p in STATES.history if json.loads(p or b"{}").get("examples") == examples), None
            )

        wait_for(shown_at, 120)
        shown = shown_at()
        time.sleep(2)
        after = {p.name: vmhwm(p.proc.pid) for p in procs}
        row(
            "3",
            "time to publish (broker up -> manifest acknowledged)",
            f"{published - start:.1f} s" if published else "NOT within 600 s",
        )
        if connected and published:
            row(
                "3",
                "time to publish (leader's MQTT link connected -> manifest acknowledged)",
                f"{published - connected:.1f} s (includes RETAINED_WAIT_S 2 s)",
            )
        if loaded:
            row(
                "3",
                "follower: the import's reply -> its event line (the loop refitting, no frame classified)",
                f"{imported - loaded:.1f} s" if imported else "no event line",
            )
            row(
                "3",
                "follower: the import's reply -> its retained state shows the examples",
                f"{shown - loaded:.1f} s" if shown else "not seen",
            )
        row(
            "3",
            "time to load (manifest -> follower applied)",
            f"{loaded - published:.1f} s" if loaded and published else "NOT within 600 s",
        )
        for p in procs:
            row(
                "3",
                f"VmHWM {p.name}",
                f"{before[p.name]:.0f} -> {after[p.name]:.0f} MB "
                f"(+{after[p.name] - before[p.name]:.0f} MB; target +<= 60 MB)",
            )
        size, chunks, manifest = retained_bytes(broker.port, "edgeknn/bigleader")
        row(
            "3",
            "broker's retained bytes under edgeknn/bigleader/fleet/#",
            f"{size / 1e6:.1f} MB in {chunks} chunks + a {manifest / 1024:.0f} KiB manifest: "
            f"{size / examples / 1024:.1f} KiB per example (load {load()})",
        )
        state = follower_counts(broker.port, "bigfollower")
        good = state.get("counts") if state else None
        row(
            "3",
            "follower's counts (its retained state)",
            json.dumps(good) if good else f"state: {str(state)[:200]}",
        )
        # a second pack while the follower holds the first (it keeps predicting with it meanwhile)
        mark = time.monotonic()
        command(broker.port, "bigleader", "rename_class", {"class": "1", "new_name": "one"})
        again = follower.when(r"fleet: loaded pack", mark, 600)
        wait_for(
            lambda: "one" in ((follower_counts(broker.port, "bigfollower") or {}).get("counts") or {}), 120
        )
        time.sleep(8)  # its autosave (5 s) copies the pictures
        second = vmhwm(follower.proc.pid)
        row(
            "3",
            "VmHWM bigfollower, a second pack loaded while it holds the first",
            f"{after['bigfollower']:.0f} -> {second:.0f} MB (+{second - after['bigfollower']:.0f} MB)"
            if again
            else "NOT loaded within 600 s",
        )
        if 4 not in parts:
            return

        # 4a: the broker killed during the publish of a new version, then back on the same port
        began = Retained(broker.port, "edgeknn/bigleader/fleet/pack/+/0")
        time.sleep(2)
        known = set(began.payloads)
        mark = time.monotonic()
        command(broker.port, "bigleader", "rename_class", {"class": "5", "new_name": "five"})
        wait_for(lambda: set(began.payloads) - known, 60, 0.005)  # chunk 0 of the new version: mid-publish
        began.close()
        broker.kill()
        killed = time.monotonic()
        time.sleep(8)
        alive = {p.name: p.proc.poll() is None for p in procs}
        broker.start()
        back = time.monotonic()
        republished = leader.when(r"fleet: published pack", back, 300)
        reloaded = follower.when(r"fleet: loaded pack", back, 150)
        if not reloaded:
            sub = Retained(broker.port, "edgeknn/bigleader/fleet/#")
            time.sleep(3)
            sub.close()
            manifest = json.loads(sub.payloads.get("edgeknn/bigleader/fleet/manifest") or b"{}")
            version = str(manifest.get("sha256", ""))[:16]
            have = {
                int(t.rsplit("/", 1)[1]) for t, p in sub.payloads.items() if f"/pack/{version}/" in t and p
            }
            missing = sorted(set(range(len(manifest.get("chunks", [])))) - have)
            row(
                "4",
                "follower did NOT load it: the broker's retained pack",
                f"manifest {version} names {len(manifest.get('chunks', []))} chunks; "
                f"the broker holds {len(have)}; missing {missing[:10]}",
            )
        row(
            "4",
            "broker killed mid-publish",
            f"{killed - mark:.1f} s after the rename; processes alive while it was down: {alive}",
        )
        row(
            "4",
            "leader's lines while the broker was down",
            " | ".join(line[-140:] for t, line in leader.lines if killed <= t < back and "fleet" in line)[
                :600
            ]
            or "(none)",
        )
        row(
            "4",
            "broker back -> leader republished",
            f"{republished - back:.1f} s" if republished else "NOT within 300 s",
        )
        row(
            "4",
            "broker back -> follower loaded the new pack",
            f"{reloaded - back:.1f} s" if reloaded else "NOT within 150 s",
        )
        state = follower_counts(broker.port, "bigfollower")
        row("4", "follower's classes after", json.dumps(state.get("counts")) if state else "no state")

        # 4b: the broker killed while idle and started again WITHOUT its retained messages (its database lost)
        broker.kill()
        for db in (root / "broker34").glob("*.db"):
            db.unlink()
        broker.start()
        back = time.monotonic()
        republished = leader.when(r"fleet: published pack", back, 45)
        size, chunks, _ = retained_bytes(broker.port, "edgeknn/bigleader/fleet/#"[:-8])
        row(
            "4",
            "broker back without its retained pack -> leader republished",
            f"{republished - back:.1f} s"
            if republished
            else f"NOT within 45 s: the broker holds {size} bytes in {chunks} chunks for it",
        )
        state = follower_counts(broker.port, "bigfollower")
        row("4", "follower after that", json.dumps(state) if state else "no state")

        # 4c: the leader killed (SIGKILL) mid-pack
        began = Retained(broker.port, "edgeknn/bigleader/fleet/pack/+/0")
        time.sleep(2)
        known = set(began.payloads)
        mark = time.monotonic()
        command(broker.port, "bigleader", "rename_class", {"class": "five", "new_name": "cinq"})  # a new pack
        seen = wait_for(lambda: set(began.payloads) - known, 60, 0.005)  # chunk 0 of the new version
        began.close()
        os.kill(leader.proc.pid, signal.SIGKILL)
        row(
            "4",
            "leader's last lines before its SIGKILL",
            " | ".join(line[-120:] for _, line in leader.lines[-3:]),
        )
        killed = time.monotonic()
        time.sleep(30)
        state = follower_counts(broker.port, "bigfollower")
        row(
            "4",
            "follower's lines after the leader's kill",
            " | ".join(line[-160:] for t, line in follower.lines if t >= killed)[:900] or "(none)",
        )
        row(
            "4",
            "leader SIGKILLed mid-pack",
            f"{time.monotonic() - mark:.1f} s after the rename (mid-pack seen: {seen}); "
            f"follower alive: {follower.proc.poll() is None}; "
            f"its counts: {json.dumps(state.get('counts')) if state else 'no state'}; "
            f"fleet: {json.dumps(state.get('fleet')) if state else ''}",
        )
        for p in procs:
            bad = p.problems()
            row(
                "4",
                f"tracebacks/errors in {p.name}'s log",
                f"{len(bad)}" + (f": {bad[0][:200]}" if bad else ""),
            )
    finally:
        for p in procs:
            if p.proc.poll() is None:
                t = time.monotonic()
                p.stop()
                row(
                    "4",
                    f"{p.name} stopped with SIGTERM",
                    f"exit {p.proc.returncode} after {time.monotonic() - t:.1f} s",
                )
            print(
                f"--- {p.name} exit {p.proc.returncode} (log {p.log.name}); last lines:\n"
                + "\n".join(line for _, line in p.lines[-8:]),
                flush=True,
            )
        broker.kill()
        if STATES is not None:
            STATES.close()
            for t, _, payload in STATES.history:
                body = json.loads(payload or b"{}")
                print(f"  follower state at {t:.1f}: {body.get('classes')} {body.get('fleet')}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="1,2,3,4")
    parser.add_argument("--every", type=int, default=3, help="every n-th photo of each class is replayed")
    parser.add_argument("--settings", choices=tuple(SETTINGS), default="device",
                        help="items 1-2: the devices' rule and stabilizer (see SETTINGS)")
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--pictures", choices=("photos", "digits"), default="photos")
    parser.add_argument("--storage", choices=("auto", "float32", "uint8"), default="auto",
                        help="the follower's store.storage (auto, the default: uint8 for these models)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (the processes' logs)")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    print(f"start {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {load()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="fleet-targets-"))
    print(f"working in {root}", flush=True)
    try:
        if parts & {1, 2}:
            items_1_2(root / "a", args.every, parts, args.settings)
        if parts & {3, 4}:
            (root / "b").mkdir()
            items_3_4(root / "b", args.examples, parts, args.pictures, args.storage)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nend {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {load()}\n")
    width = max(len(m) for _, m, _ in ROWS)
    print(f"{'item':4}  {'measure':{width}}  figure")
    for item, measure, figure in ROWS:
        print(f"{item:4}  {measure:{width}}  {figure}")


if __name__ == "__main__":
    main()

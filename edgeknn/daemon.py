"""The device's main loop: newest frame → embedding → k-NN → stable label → outputs.

One thread (the caller of ``Daemon.loop``) owns the store, so the store needs no locks. Buttons
and MQTT put commands on one queue that the loop drains between frames. The camera thread keeps
only the newest frame and has already cropped and resized it to the model's input size. An
inference thread embeds frame N+1 while the loop classifies frame N and feeds the outputs, so
that work overlaps the model's invoke instead of adding to it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeknn import __version__, config
from edgeknn.camera import Capture, Frame, source_opener
from edgeknn.commands import (
    AddExample,
    Command,
    ForgetClass,
    RenameClass,
    Reset,
    Result,
    Save,
    SetThreshold,
    Snapshot,
)
from edgeknn.inference import InferenceThread
from edgeknn.model import DEFAULT_MODEL_SHA256, DEFAULT_MODEL_URL, Embedder, ModelError
from edgeknn.outputs import Output, Reading
from edgeknn.service import Notifier, setup_logging
from edgeknn.store import UNKNOWN, VIEW_RULES, KnnStore, StoreError

log = logging.getLogger(__name__)
EX_CONFIG = 78
STATE_EVERY_S = 30.0  # re-send state (fps, uptime) this often even when nothing else changed
STATE_CHECK_S = 0.5  # how often the loop rebuilds the state to see whether it changed
STALL_S = 5.0  # a camera with no frame for this long counts as down


class Stabilizer:
    """Turns per-frame labels into a stable one.

    ``consecutive``: a label becomes stable after ``frames`` frames in a row agree.
    ``window``: the stable label is the strict majority of the last ``frames`` frames (if any).
    """

    def __init__(self, mode: str, frames: int):
        self.mode, self.frames = mode, frames
        self.label = UNKNOWN
        self._run_label, self._run = UNKNOWN, 0
        self._window: deque[str] = deque(maxlen=frames)

    def update(self, label: str) -> bool:
        """Feed one frame's label; True when the stable label changed."""
        before = self.label
        if self.mode == "window":
            self._window.append(label)
            best, count = Counter(self._window).most_common(1)[0]
            if count * 2 > len(self._window):
                self.label = best
        else:
            self._run = self._run + 1 if label == self._run_label else 1
            self._run_label = label
            if self._run >= self.frames:
                self.label = label
        return self.label != before

    def reset(self) -> None:
        self.__init__(self.mode, self.frames)


class Daemon:
    """Owns the store; runs commands from one queue between frames; feeds the outputs."""

    def __init__(
        self,
        cfg: config.Config,
        embedder: Embedder,
        store: KnnStore,
        capture: Capture,
        store_path: Path,
        notifier: Notifier | None = None,
    ):
        self.cfg = cfg
        self.embedder = embedder
        self.store = store
        self.capture = capture
        self.store_path = Path(store_path)
        self.notifier = notifier or Notifier({})
        self.outputs: list[Output] = []
        self.broker_status: Callable[[], str] = lambda: "disabled"
        self.commands: queue.Queue[Command] = queue.Queue()
        self.stabilizer = Stabilizer(cfg.stabilizer.mode, cfg.stabilizer.frames)
        self._stop = threading.Event()
        self._pending: list[list] = []  # [AddExample, remaining] waiting for fresh frames
        self._frame: Frame | None = None
        self._inference = InferenceThread(embedder)
        self._next: Frame | None = None  # the frame being embedded meanwhile
        self._last_number = 0
        self._dirty_since: float | None = None
        self._error = ""
        self._started = time.monotonic()
        self._fps = 0.0
        self._inference_ms = 0.0
        self._last_state: dict | None = None
        self._last_state_time = 0.0
        self._last_state_check = 0.0
        self.frames_classified = 0
        self._fps_window = (time.monotonic(), 0)  # (start, frames_classified then)
        for name in cfg.classes:
            store.ensure_class(name)
        store.fit()

    # --- commands ---------------------------------------------------------------------------

    def submit(self, command: Command) -> None:
        """Queue a command (thread-safe: buttons and MQTT call this from their own threads)."""
        self.commands.put(command)

    def stop(self) -> None:
        self._stop.set()

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                self._run_command(command)
            except Exception as e:  # a command must never take the loop down
                log.exception("command %s failed", type(command).__name__)
                self._reply(command, Result(False, f"internal error: {e}"))

    def _reply(self, command: Command, result: Result) -> None:
        if command.reply is not None:
            try:
                command.reply(result)
            except Exception:
                log.exception("reply to %s failed", type(command).__name__)
        if not result.ok:
            log.warning("%s from %s refused: %s", type(command).__name__, command.source, result.error)

    def _run_command(self, command: Command) -> None:
        if isinstance(command, AddExample):
            if command.class_name not in self.store.classes:
                self._reply(command, Result(False, f"class: unknown class {command.class_name!r}"))
                return
            self._pending.append([command, max(1, command.count)])
        elif isinstance(command, ForgetClass):
            if command.class_name not in self.store.classes:
                self._reply(command, Result(False, f"class: unknown class {command.class_name!r}"))
                return
            removed = self.store.forget(command.class_name)
            self._changed()
            self._event(
                {"event": "class_forgotten", "class": command.class_name, "removed": removed}, command
            )
            self._reply(command, Result(True, detail={"class": command.class_name, "removed": removed}))
        elif isinstance(command, RenameClass):
            try:
                self.store.rename(command.class_name, command.new_name)
            except (KeyError, ValueError) as e:
                self._reply(command, Result(False, f"class: cannot rename: {e}"))
                return
            self._changed()
            self._event(
                {"event": "class_renamed", "class": command.class_name, "new_name": command.new_name}, command
            )
            self._reply(
                command, Result(True, detail={"class": command.class_name, "new_name": command.new_name})
            )
        elif isinstance(command, Reset):
            self.store.reset()
            self._pending.clear()
            self._changed()
            self._event({"event": "reset"}, command)
            self._reply(command, Result(True))
        elif isinstance(command, Save):
            ok = self.save()
            self._reply(command, Result(ok, "" if ok else f"save failed: {self._error}"))
        elif isinstance(command, SetThreshold):
            self.store.threshold = float(command.value)
            self._publish_state(force=True)
            self._reply(command, Result(True, detail={"threshold": self.store.threshold}))
        elif isinstance(command, Snapshot):
            self._reply(command, self._snapshot())
        else:
            self._reply(command, Result(False, f"unknown command {type(command).__name__}"))

    def _add_pending(self, frame: Frame, views: np.ndarray) -> None:
        """Add the newest frame to every pending AddExample (one example per fresh frame)."""
        for item in list(self._pending):
            command, remaining = item
            if command.class_name not in self.store.classes:  # renamed or reset meanwhile
                self._pending.remove(item)
                self._reply(command, Result(False, f"class: unknown class {command.class_name!r}"))
                continue
            count = self.store.add(command.class_name, views)
            item[1] = remaining - 1
            self._event({"event": "example_added", "class": command.class_name, "count": count}, command)
            if item[1] <= 0:
                self._pending.remove(item)
                self._reply(command, Result(True, detail={"class": command.class_name, "count": count}))
        self._changed()

    def _snapshot(self) -> Result:
        if self._frame is None:
            return Result(False, "snapshot: no frame yet")
        from PIL import Image

        folder = self.store_path.parent / "snapshots"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / time.strftime("%Y%m%d-%H%M%S.jpg")
        Image.fromarray(np.asarray(self._frame.image)).save(path, quality=90)
        return Result(True, detail={"file": str(path)})

    def _event(self, event: dict, command: Command | None = None) -> None:
        if command is not None:
            event = {**event, "source": command.source}
        log.info("%s", " ".join(f"{k}={v}" for k, v in event.items()))
        for output in self.outputs:
            _guard(output.event, event)

    def _changed(self) -> None:
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()
        self._publish_state(force=True)

    # --- saving -------------------------------------------------------------------------------

    def save(self) -> bool:
        try:
            self.store.save(self.store_path)
        except OSError as e:
            self._error = f"cannot save {self.store_path}: {e.strerror or e}"
            log.error("%s", self._error)
            self._event({"event": "error", "error": self._error})
            return False
        self._dirty_since = None
        if self._error.startswith("cannot save"):
            self._error = ""
        log.info("saved %d examples to %s", sum(self.store.counts().values()), self.store_path)
        return True

    def _autosave(self) -> None:
        if (
            self._dirty_since is not None
            and time.monotonic() - self._dirty_since >= self.cfg.store.autosave_s
        ):
            self.save()

    # --- state --------------------------------------------------------------------------------

    def camera_status(self) -> str:
        if self.capture.ok and self.capture.last_frame_age() < STALL_S:
            return "ok"
        return "starting" if self.capture.frames_captured == 0 and not self.camera_error() else "down"

    def camera_error(self) -> str:
        """Why the camera is not ok: the capture's error, or a stall (a read that raises nothing)."""
        if self.capture.error:
            return self.capture.error
        if self.capture.last_frame_age() >= STALL_S and not self.capture.finished:
            return f"no frame for more than {STALL_S:g} s (the camera stalled)"
        return ""

    def state(self) -> dict:
        counts = self.store.counts()
        return {
            "classes": counts,
            "examples": sum(counts.values()),
            "model": self.embedder.identity,
            "model_file": self.embedder.model.path.name,
            "backend": self.embedder.model.backend,
            "k": self.store.k,
            "rule": self.store.rule,
            "threshold": self.store.threshold,
            "storage": self.store.storage,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "fps": round(self._fps, 1),
            "inference_ms": round(self._inference_ms, 2),
            "camera": self.camera_status(),
            "camera_error": self.camera_error(),
            "broker": self.broker_status(),
            "error": self._error,
        }

    def _publish_state(self, force: bool = False) -> None:
        """Send the state when it changed (checked at most every STATE_CHECK_S, off the per-frame path)."""
        now = time.monotonic()
        if not force and now - self._last_state_check < STATE_CHECK_S:
            return
        self._last_state_check = now
        state = self.state()
        volatile = ("uptime_s", "fps", "inference_ms")
        same = self._last_state is not None and all(
            state[k] == self._last_state[k] for k in state if k not in volatile
        )
        if same and not force and time.monotonic() - self._last_state_time < STATE_EVERY_S:
            return
        if not same:
            self._log_health(state)
        self._last_state, self._last_state_time = state, time.monotonic()
        for output in self.outputs:
            _guard(output.state, state)
        self.notifier.status(f"{state['camera']} camera, {state['examples']} examples, {state['fps']} fps")

    def _log_health(self, state: dict) -> None:
        before = self._last_state or {}
        for key in ("camera", "broker"):
            if before.get(key) != state[key] and before:
                log.info("%s: %s", key, state[key])

    # --- the loop -----------------------------------------------------------------------------

    def step(self, timeout: float = 0.5) -> Reading | None:
        """Run queued commands, then classify the newest frame if there is one; return its reading.

        The frame's embedding usually comes from the inference thread, started in the previous
        step; as soon as it is in hand, the next frame (if the camera has one) goes to that thread.
        An example being added needs several views of a frame: they are embedded here, with the
        inference thread idle, and nothing is started meanwhile.
        """
        self._drain_commands()
        if self._next is None:
            self._next = self.capture.latest(after=self._last_number, timeout=timeout)
            if self._next is not None:
                self._inference.start(self._next.image)
        self.notifier.watchdog()
        if self._next is None:
            self._publish_state()
            self._autosave()
            return None
        frame, self._next = self._next, None
        self._last_number, self._frame = frame.number, frame
        vector, self._inference_ms = self._inference.result()
        if self._pending and self.store.rule in VIEW_RULES:
            start = time.perf_counter()
            views = self.embedder.embed_views(frame.image)
            self._inference_ms = (time.perf_counter() - start) * 1000
        else:
            views = vector[np.newaxis]
            self._next = self.capture.latest(after=frame.number, timeout=0)
            if self._next is not None:
                self._inference.start(self._next.image)
        if self._pending:
            self._add_pending(frame, views)
        self.store.observe(vector)
        prediction = self.store.classify(vector)
        changed = self.stabilizer.update(prediction.label)
        stable = self.stabilizer.label
        now = time.time()
        reading = Reading(
            label=stable,
            confidence=prediction.scores.get(stable, 0.0),
            scores=prediction.scores,
            similarity=prediction.similarity,
            frame=frame.number,
            ts=frame.ts,
            latency_ms=(now - frame.ts) * 1000,
            changed=changed,
            inference_ms=self._inference_ms,
        )
        if changed:
            log.info("prediction: %s (%.2f, similarity %.2f)", stable, reading.confidence, reading.similarity)
        for output in self.outputs:
            _guard(output.show, reading)
        self._count_frame()
        self._publish_state()
        self._autosave()
        return reading

    def settle(self) -> None:
        """Wait until the inference thread is idle (the frame it embeds is kept for the next step),
        so that another caller may use the embedder's interpreter."""
        self._inference.wait()

    def _count_frame(self) -> None:
        """Frames per second, counted over windows of at least a second (a mean of 1/dt overstates it)."""
        self.frames_classified += 1
        now = time.monotonic()
        elapsed = now - self._fps_window[0]
        if elapsed >= 1.0:
            self._fps = (self.frames_classified - self._fps_window[1]) / elapsed
            self._fps_window = (now, self.frames_classified)

    def loop(self) -> None:
        """Run until ``stop()`` (a signal) or the end of a non-looping replay."""
        self._publish_state(force=True)
        while not self._stop.is_set():
            self.step()
            if (
                self.capture.finished
                and self._frame is not None
                and self.capture.latest(self._last_number, 0) is None
            ):
                log.info("camera source finished")
                break
        self._drain_commands()

    def shutdown(self) -> None:
        """Save if needed, close the outputs (MQTT says offline) and the camera."""
        self.notifier.stopping()
        self._inference.close()
        self._next = None
        if self._dirty_since is not None:
            self.save()
        for output in self.outputs:
            _guard(output.close)
        self.capture.close()


def _guard(method: Callable, *args) -> None:
    """Outputs must not take the loop down: log and go on."""
    try:
        method(*args)
    except Exception:
        log.exception("output %s failed", getattr(method, "__qualname__", method))


# --- building and running ----------------------------------------------------------------------


class Fatal(Exception):
    """Something a person must fix; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EX_CONFIG):
        super().__init__(message)
        self.code = code


def open_store(cfg: config.Config, embedder: Embedder, path: Path) -> KnnStore:
    """Load the store, or start empty; a damaged file is moved aside (never deleted or overwritten)."""
    s = cfg.store
    settings = {
        "k": s.k,
        "rule": s.rule,
        "threshold": s.threshold,
        "capacity": s.capacity,
        "storage": s.storage,
    }
    if not path.exists():
        log.info("no store at %s yet: starting empty", path)
        return KnnStore(embedder.dim, embedder.identity, **settings)
    if path.is_dir():  # a mistake in store.path, not a damaged store: nothing to move aside
        raise Fatal(f"{path}: is a folder, not a store file; check store.path")
    try:
        store = KnnStore.load(path, embedder.identity, **settings)
    except StoreError as e:
        if not e.corrupt:
            raise Fatal(str(e)) from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = path.with_name(f"{path.name}.broken-{stamp}"), 1
        while aside.exists():  # broken twice within a second: keep both
            aside, n = path.with_name(f"{path.name}.broken-{stamp}-{n}"), n + 1
        try:
            os.replace(path, aside)
        except OSError as move_error:
            raise Fatal(f"{e}; and cannot move it aside ({move_error.strerror})", 1) from None
        log.error("%s; moved it to %s and started empty", e, aside)
        return KnnStore(embedder.dim, embedder.identity, **settings)
    log.info("loaded %d examples from %s", sum(store.counts().values()), path)
    return store


def build(
    cfg: config.Config,
    *,
    opener=None,
    pin_factory=None,
    notifier: Notifier | None = None,
) -> Daemon:
    """Wire the core and the edges from a config. ``opener``/``pin_factory`` let tests swap hardware."""
    from edgeknn.panel import PanelError, open_panel

    try:
        if not cfg.model.path and not cfg.model_path().exists():
            from edgeknn.download import fetch  # urllib and ssl: only needed on a first start

            log.info("no model at %s: downloading %s", cfg.model_path(), DEFAULT_MODEL_URL)
            fetch(DEFAULT_MODEL_URL, DEFAULT_MODEL_SHA256, cfg.model_path())
        embedder = Embedder(cfg.model_path(), cfg.model.threads)
    except ModelError as e:
        raise Fatal(str(e)) from None
    store_path = cfg.store_path()
    store = open_store(cfg, embedder, store_path)
    if opener is None:
        try:
            opener = source_opener(cfg.camera.source, embedder.model.input_size, cfg.camera.fps)
        except ValueError as e:
            raise Fatal(f"camera.source: {e}") from None
    capture = Capture(opener, prepare=embedder.model.prepare)
    daemon = Daemon(cfg, embedder, store, capture, store_path, notifier)
    try:
        panel = open_panel(cfg.panel.kind, list(cfg.classes), daemon.submit, cfg.panel, pin_factory)
    except PanelError as e:
        raise Fatal(str(e)) from None
    if panel is not None:
        daemon.outputs.append(panel)
    if cfg.mqtt.enabled:
        from edgeknn.mqtt import MqttError, MqttLink

        try:
            link = MqttLink(
                cfg.mqtt,
                base_topic=cfg.resolved_base_topic(),
                device_id=cfg.resolved_device_id(),
                classes=list(store.classes),
                submit=daemon.submit,
                version=__version__,
            )
        except MqttError as e:
            raise Fatal(str(e)) from None
        daemon.outputs.append(link)
        daemon.broker_status = lambda: link.status
    return daemon


def config_from_args(args) -> config.Config:
    """The config file (or defaults) with the command line's overrides applied."""
    cfg = config.load(args.config)
    overrides: dict = {}
    if args.source:
        overrides["camera.source"] = args.source
    if args.panel:
        overrides["panel.kind"] = args.panel
    if args.model:
        overrides["model.path"] = str(Path(args.model).absolute())
    if args.store:
        overrides["store.path"] = str(Path(args.store).absolute())
    if args.mqtt:
        if args.mqtt == "none":
            overrides["mqtt.enabled"] = False
        else:
            host, _, port = args.mqtt.rpartition(":") if ":" in args.mqtt else (args.mqtt, "", "")
            overrides["mqtt.enabled"] = True
            overrides["mqtt.host"] = host
            if port:
                overrides["mqtt.port"] = int(port) if port.isdigit() else port
    if args.device_id:
        overrides["mqtt.device_id"] = args.device_id
    return config.replace(cfg, **overrides) if overrides else cfg


def run(args) -> int:
    """`edgeknn run`: build, start, loop until SIGTERM/SIGINT; SIGHUP reloads the configuration."""
    cfg = config_from_args(args)
    setup_logging(cfg.log_level)
    notifier = Notifier()
    try:
        daemon = build(cfg, notifier=notifier)
    except Fatal as e:
        log.error("%s", e)
        return e.code
    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    signal.signal(signal.SIGHUP, lambda *_: (reload.set(), daemon.stop()))
    while True:
        start(daemon)
        notifier.ready(f"classifying with {daemon.embedder.model.path.name}")
        log.info(
            "running: %s, source %s, panel %s, mqtt %s, classes %s",
            daemon.embedder.model.path.name,
            daemon.cfg.camera.source,
            daemon.cfg.panel.kind,
            f"{cfg.mqtt.host}:{cfg.mqtt.port}" if cfg.mqtt.enabled else "off",
            ", ".join(f"{k}={v}" for k, v in daemon.store.counts().items()),
        )
        if not len(daemon.store):
            log.info("no examples yet: teach with the class buttons, `edgeknn teach` or MQTT cmd/add_example")
        daemon.loop()
        if not reload.is_set():
            break
        reload.clear()
        daemon = _reloaded(daemon, args, notifier)
    daemon.shutdown()
    notifier.close()
    log.info("stopped")
    return 0


def start(daemon: Daemon) -> None:
    daemon.capture.start()
    for output in daemon.outputs:
        if hasattr(output, "start"):
            output.start()


def _reloaded(daemon: Daemon, args, notifier: Notifier) -> Daemon:
    """SIGHUP: re-read the config; keep running the old one if the new one is invalid."""
    notifier.notify("RELOADING=1")
    try:
        cfg = config_from_args(args)
    except config.ConfigError as e:
        for line in e.errors:
            log.error("reload refused: %s", line)
        daemon._stop.clear()
        return daemon
    daemon.shutdown()
    setup_logging(cfg.log_level)
    try:
        new = build(cfg, notifier=notifier)
    except Fatal as e:
        log.error("reload failed: %s", e)
        raise SystemExit(e.code) from None
    log.info("configuration reloaded")
    return new

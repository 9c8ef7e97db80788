"""The device's main loop: newest frame → embedding → k-NN → stable label → outputs.

One thread (the caller of ``Daemon.loop``) owns the store, so the store needs no locks. Buttons
and MQTT put commands on one queue that the loop drains between frames. The camera thread keeps
only the newest frame and has already cropped and resized it to the model's input size. An
inference thread embeds frame N+1 while the loop classifies frame N and feeds the outputs, so
that work overlaps the model's invoke instead of adding to it.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from edgeknn import __version__, config
from edgeknn import jpeg as pictures
from edgeknn.camera.capture import Capture, Frame
from edgeknn.commands import (
    AddClass,
    AddExample,
    Command,
    DeleteExample,
    ForgetClass,
    ImportExamples,
    LendExamples,
    ListExamples,
    RemoveClass,
    RenameClass,
    Reset,
    Result,
    Save,
    SelectClass,
    SetThreshold,
    Snapshot,
)
from edgeknn.device.commandqueue import MAX_QUEUED_COMMANDS, CommandQueue, Handlers
from edgeknn.device.runtime import SettingCommands
from edgeknn.device.saving import Saver
from edgeknn.device.snapshots import Snapshotter
from edgeknn.device.status import FrameRate, StatePublisher, camera_error, camera_status
from edgeknn.device.systemd import Notifier
from edgeknn.device.teaching import Teacher
from edgeknn.model.classifier import ModelClasses, SideHead
from edgeknn.model.embedder import Embedder
from edgeknn.model.inference import InferenceThread
from edgeknn.outputs import Output, Reading
from edgeknn.store import lock as storelock
from edgeknn.store import refit
from edgeknn.store.head import VIEW_RULES
from edgeknn.store.knn import KnnStore, threshold_calibration
from edgeknn.store.names import UNKNOWN
from edgeknn.throttle import Throttle

log = logging.getLogger(__name__)

# What a classifier model refuses: it has no examples to add, forget or save.
TEACHING = (AddExample, ForgetClass, RenameClass, AddClass, RemoveClass, DeleteExample, Reset, Save)
TEACHING_ALSO = (ImportExamples, LendExamples)  # the web page's upload and download


class Stabilizer:
    """Turns per-frame labels into a stable one.

    ``consecutive``: a label becomes stable after ``frames`` frames in a row agree.
    ``window``: the stable label is the strict majority of the last ``frames`` frames (if any).
    """

    def __init__(self, mode: str, frames: int):
        self.mode, self.frames = mode, frames
        self._window: deque[str] = deque(maxlen=frames)
        self.label = self._run_label = UNKNOWN
        self._run = 0

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
        self.label = self._run_label = UNKNOWN
        self._run = 0
        self._window.clear()

    def relabel(self, old: str, new: str | None) -> bool:
        """A class was renamed (``new``) or removed (None): the frames seen so far follow it, so the
        stable label never names a class that is gone. True if the stable label changed."""
        if new is None:
            if old not in (self.label, self._run_label, *self._window):
                return False
            before = self.label
            self.reset()
            return self.label != before
        self._window = deque((new if label == old else label for label in self._window), self._window.maxlen)
        self._run_label = new if self._run_label == old else self._run_label
        if self.label == old:
            self.label = new
            return True
        return False


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
        side: SideHead | None = None,
    ):
        self.cfg = cfg
        self.embedder = embedder
        self.side = side  # model.head: its top-k goes out beside the k-NN label
        self.store = store
        self.capture = capture
        self.store_path = Path(store_path)
        self.notifier = notifier or Notifier({})
        self.outputs: list[Output] = []
        self.broker_status: Callable[[], str] = lambda: "disabled"
        self.fleet_status: Callable[[], dict | None] = lambda: None  # a fleet leader's or follower's
        self._handlers: Handlers = {}  # a command's type → its handler, filled below
        self.commands = CommandQueue(self._handlers, log)
        self._event_logs: dict[str, Throttle] = {}
        self.stabilizer = Stabilizer(cfg.stabilizer.mode, cfg.stabilizer.frames)
        self._background = {name.casefold() for name in cfg.store.background}  # store.background
        self._relabelled = False  # a rename or removal changed the stable label: the next reading says so
        self._stop = threading.Event()
        self._frame: Frame | None = None
        self._inference = InferenceThread(embedder, side.scores if side else None)
        self._next: Frame | None = None  # the frame being embedded meanwhile
        self._last_number = 0
        self.saver = Saver(store, self.store_path, cfg.store.autosave_s, self._event)
        # JPEGs made off the loop: the snapshot command's file, and (its ``publish``) MQTT's image topic
        interval = cfg.mqtt.snapshot_interval_s if cfg.mqtt.enabled else 0.0
        # The snapshot command's files go to <state_dir>/snapshots (not beside a --store elsewhere); the
        # periodic ones are never written (an SD card is not worn by a picture every few seconds).
        self.snapshots = Snapshotter(cfg.resolved_state_dir() / "snapshots", interval)
        self._started = time.monotonic()
        self._inference_ms = 0.0
        self.rate = FrameRate()
        self._state = StatePublisher(self.outputs, self.notifier, _guard)
        self.teacher = Teacher(store, self._changed, self._event, self.commands.reply)
        publish = partial(self._publish_state, force=True)
        self.settings = SettingCommands(
            cfg, store, publish, self.teacher.rename_class, self.teacher.remove_class
        )
        self._handlers |= {  # in place: the queue routes every command by this one dict
            AddExample: self.teacher.queue_examples,
            ForgetClass: self.teacher.forget_class,
            RenameClass: self.settings.rename_class,
            AddClass: self.teacher.add_class,
            RemoveClass: self.settings.remove_class,
            DeleteExample: self.teacher.delete_example,
            ListExamples: self.teacher.list_examples,
            Reset: self.teacher.reset,
            Save: self._save_now,
            SetThreshold: self.settings.set_threshold,
            SelectClass: self.settings.select_class,
            Snapshot: self._snapshot,
            ImportExamples: self.teacher.import_examples,
            LendExamples: self.teacher.lend_examples,
        }
        self.classifier = isinstance(store, ModelClasses)  # a classifier model: its own labels, untaught
        self._said_untaught = False
        if self.classifier:
            self._handlers.update(dict.fromkeys(TEACHING + TEACHING_ALSO, self._refuse_teaching))
            self._handlers[SetThreshold] = self.settings.set_min_confidence
        else:
            store.threshold = self.settings.kept.get("threshold", store.threshold)
        store.fit()
        if not self.classifier:  # from now on a change's refit runs beside the loop (store/refit.py)
            refit.beside(store)

    # --- commands ---------------------------------------------------------------------------

    def submit(self, command: Command) -> None:
        """Queue a command (thread-safe: buttons and MQTT call this from their own threads); a full
        queue answers ``busy`` at once."""
        self.commands.submit(command)

    def stop(self) -> None:
        self._stop.set()

    def resume(self) -> None:
        """Let ``loop`` run again after a ``stop`` (a refused reload keeps this daemon running)."""
        self._stop.clear()

    def _save_now(self, command: Save) -> Result:
        ok = self.saver.save()
        return Result(ok, "" if ok else f"save failed: {self.saver.error}")

    def route(self, kinds: tuple[type[Command], ...], handler: Callable[[Command], Result | None]) -> None:
        """Send these commands to ``handler`` (a fleet follower refuses teaching, naming its leader)."""
        self._handlers.update(dict.fromkeys(kinds, handler))

    def _refuse_teaching(self, command: Command) -> None:
        """A classifier model cannot be taught: answer every teaching command so, log it once."""
        error = (
            f"teaching: {self.embedder.model.path.name} is a classifier model: it answers with its own "
            'labels and cannot be taught (model.kind = "embedder" or a k-NN model can)'
        )
        if not self._said_untaught:
            self._said_untaught = True
            log.warning("%s from %s refused: %s", type(command).__name__, command.source, error)
        if command.reply is not None:
            _guard(command.reply, Result(False, error))

    def _snapshot(self, command: Snapshot) -> Result | None:
        """The newest frame to a file and MQTT's image topic, encoded on the snapshot thread (it replies)."""
        if self._frame is None:
            return Result(False, "snapshot: no frame yet")
        self.snapshots.take(_picture(self._frame), lambda result: self.commands.reply(command, result))
        return None

    def _event(self, event: dict, command: Command | None = None) -> None:
        if event.get("event") in ("class_renamed", "class_removed"):  # the stable label follows its class
            self._relabelled |= self.stabilizer.relabel(event["class"], event.get("new_name"))
        if command is not None:
            event = {**event, "source": command.source}
        name = str(event.get("event"))
        throttle = self._event_logs.setdefault(name, Throttle(log, 1.0))  # at most one line a second each
        throttle.log(logging.INFO, "%s", " ".join(f"{k}={v}" for k, v in event.items()))
        for output in self.outputs:
            _guard(output.event, event)

    def _changed(self) -> None:
        self.saver.changed()
        self._publish_state(force=True)

    # --- state --------------------------------------------------------------------------------

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
            "effective_threshold": round(self.store.effective_threshold, 4),  # applied now (None above: auto)
            "threshold_calibration": "set" if self.classifier else threshold_calibration(self.store),
            "training_class": self.settings.training_class,
            "storage": self.store.storage,
            "version": __version__,
            "host": socket.gethostname(),
            "uptime_s": round(time.monotonic() - self._started, 1),
            "fps": round(self.rate.fps, 1),
            "inference_ms": round(self._inference_ms, 2),
            "camera": camera_status(self.capture),
            "camera_error": camera_error(self.capture),
            "broker": self.broker_status(),
            "error": self.saver.error,
            "busy_refusals": self.commands.busy_refusals,
            "fleet": self.fleet_status(),
        }

    def _publish_state(self, force: bool = False) -> None:
        self._state.publish(self.state, force)

    # --- the loop -----------------------------------------------------------------------------

    def step(self, timeout: float = 0.5) -> Reading | None:
        """Run queued commands, then classify the newest frame if there is one; return its reading.

        The frame's embedding usually comes from the inference thread, started in the previous
        step; as soon as it is in hand, the next frame (if the camera has one) goes to that thread.
        An example being added needs several views of a frame: they are embedded here, with the
        inference thread idle, and nothing is started meanwhile.
        """
        self.commands.run()
        if self._next is None:
            self._next = self.capture.latest(after=self._last_number, timeout=timeout)
            if self._next is not None:
                self._inference.start(self._next.image)
        self.notifier.watchdog()
        if self._next is None:
            self._publish_state()
            self.saver.autosave()
            return None
        frame, self._next = self._next, None
        self._last_number, self._frame = frame.number, frame
        vector, self._inference_ms = self._inference.result()
        if self.teacher.pending and self.store.rule in VIEW_RULES:
            start = time.perf_counter()
            views = self.embedder.embed_views(frame.image, each=self.notifier.watchdog)
            self._inference_ms = (time.perf_counter() - start) * 1000
        else:
            views = vector[np.newaxis]
            self._next = self.capture.latest(after=frame.number, timeout=0)
            if self._next is not None:
                self._inference.start(self._next.image)
        if self.teacher.pending:  # each example keeps the model-sized frame it came from, as a JPEG
            self.teacher.add_pending(views, pictures.encode(frame.image))
        self.store.observe(vector)
        prediction = self.store.classify(vector)
        if prediction.label.casefold() in self._background:  # taught as "nothing here": no class
            prediction = dataclasses.replace(prediction, label=UNKNOWN)
        changed = self.stabilizer.update(prediction.label) or self._relabelled
        self._relabelled = False
        stable = self.stabilizer.label
        reading = Reading(
            label=stable,
            confidence=prediction.scores.get(stable, 0.0),
            scores=prediction.scores,
            similarity=prediction.similarity,
            frame=frame.number,
            ts=frame.ts,
            latency_ms=(time.monotonic() - frame.mono) * 1000,  # never across a wall-clock step
            changed=changed,
            inference_ms=self._inference_ms,
            candidate=prediction.label if prediction.label != stable else "",  # why scores may disagree
            results=tuple(prediction.scores.items()) if self.classifier else self._side_results(),
        )
        if changed:
            log.info("prediction: %s (%.2f, similarity %.2f)", stable, reading.confidence, reading.similarity)
        for output in self.outputs:
            _guard(output.show, reading)
        self.snapshots.tick(_picture(frame))
        self.rate.tick()
        self._publish_state()
        self.saver.autosave()
        return reading

    def _side_results(self) -> tuple[tuple[str, float], ...]:
        """The head's top-k of this frame (``model.head``), or none."""
        probs = self._inference.side_result
        return self.side.results(probs) if self.side is not None and probs is not None else ()

    @property
    def frames_classified(self) -> int:
        return self.rate.count

    def settle(self) -> None:
        """Wait until the inference thread is idle (the frame it embeds is kept for the next step),
        so that another caller may use the embedder's interpreter."""
        self._inference.wait()

    def loop(self) -> None:
        """Run until ``stop()`` (a signal), the end of a non-looping replay, or a source that cannot work."""
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
            if self.capture.fatal:
                log.error("camera.source: %s", self.capture.fatal)
                break
        self.commands.run(limit=MAX_QUEUED_COMMANDS)

    def shutdown(self, stopping: bool = True) -> bool:
        """Save if needed, close the inference thread, the outputs (MQTT says offline) and the camera;
        False if changes could not be saved. ``stopping``: tell systemd (not for a reload)."""
        if stopping:
            self.notifier.stopping()
        self._inference.close()
        why = (
            "stopping: try again once the device is back" if stopping else "reloading: try again in a moment"
        )
        self.teacher.refuse_pending(why)  # answered while the outputs that carry the replies are still open
        self.commands.refuse_waiting(why)
        self.snapshots.close()  # the snapshots asked for are made and answered before MQTT closes
        self._next = self._frame = None
        saved = self.saver.flush(final=stopping)
        storelock.release(self.store_path)  # taken by app.open_store: commands may write the store now
        for output in self.outputs:
            _guard(output.close)
        self.capture.close()
        return saved


def _picture(frame: Frame) -> np.ndarray:
    """What a snapshot shows: the camera's own frame where it is bigger than the model's input (the
    page's "Full frame"), else the frame as the model sees it."""
    full = frame.full
    return full if full is not None and max(full.shape[:2]) > max(frame.image.shape[:2]) else frame.image


def _guard(method: Callable, *args) -> None:
    """Outputs must not take the loop down: log and go on."""
    try:
        method(*args)
    except Exception:
        log.exception("output %s failed", getattr(method, "__qualname__", method))

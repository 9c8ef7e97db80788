"""Following another device (``[fleet] follow = "<device id>"``): its pack loaded at start and at every new
version, so this device recognises the same classes, in the same slots (its own buttons and LEDs map to
them as on the leader).

The chunks go to a temporary file as they arrive (never the whole pack in memory), each checked against
the manifest; a complete pack is streamed off the loop, on this output's thread, into a store built beside
the live one (``store/staged.py``: one example in memory at a time, the pictures into a staging folder),
re-embedded from its pictures when the leader's model is not this device's (the device keeps predicting
with what it has meanwhile), then swapped in by the loop in one command (``ImportExamples``, mode
``replace``: all or nothing). Anything wrong — a damaged or half-published pack, a bad HMAC, a pack too
big, rows of another width without pictures — refuses the whole pack with one line, and the last good
one stays. A leader that disappears leaves the follower with what it has (saved like any store).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeknn.commands import Claim, Command, ImportExamples, Result
from edgeknn.fleet import pack
from edgeknn.fleet.client import FleetClient
from edgeknn.jpeg import PictureError, decode
from edgeknn.outputs import Output
from edgeknn.store import archive, staged
from edgeknn.store.knn import StoreSettings
from edgeknn.store.pictures import Staging
from edgeknn.throttle import Throttle

log = logging.getLogger(__name__)

APPLY_WAIT_S = 300.0  # the loop applies a queued import between frames
STALL_S = 60.0  # a pack none of whose missing chunks came for this long is given up (the leader republishes)


class Follower(Output):
    """Loads ``leader``'s pack whenever its manifest names a new version."""

    def __init__(self, client: FleetClient, submit: Callable[[Command], None], *, leader: str,
                 leader_base: str, key: str, max_bytes: int, model_id: str, dim: int,
                 embedder: Callable[[], object], folder: Path, settings: StoreSettings,
                 when_saved: Callable[[Callable[[], None]], None],
                 adopt_center: Callable[[np.ndarray, int], None]):  # fmt: skip
        self.client, self._submit, self.leader, self._key = client, submit, leader, key
        self._settings = settings  # the store's: the pack's store is built beside it with them
        self._leader_base, self._max_bytes, self._folder = leader_base, max_bytes, folder
        self._model_id, self._dim, self._make_embedder = model_id, dim, embedder
        self._state_file = folder / "fleet-follow.json"  # the pack the saved store holds
        self.loaded: str | None = self._read_loaded()  # sha256 of the pack the store in memory holds
        self._when_saved = when_saved  # the saver's: the state file follows the store file
        self._adopt_center = adopt_center  # the store's: the leader's centre, on the leader's model
        self._applying: pack.Manifest | None = None  # the pack of the import handed to the loop
        self._assembly: pack.Assembly | None = None
        self._progress = 0.0  # when the pack being gathered last got a chunk
        self._lock = threading.Lock()
        self._ready: queue.Queue[pack.Assembly | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fleet-follower", daemon=True)
        self._throttle = Throttle(log)
        self._refusals = Throttle(log)
        self.leader_online: bool | None = None
        self.last_error = ""

    # --- Output ---------------------------------------------------------------------------------

    def start(self) -> None:
        Staging.sweep(self._folder)  # what a killed process left
        self.client.subscribe(f"{self._leader_base}/fleet/manifest", self._on_manifest)
        self.client.subscribe(f"{self._leader_base}/fleet/online", self._on_leader_online)
        self.client.start()
        self._thread.start()

    def close(self) -> None:
        self._ready.put(None)
        self._thread.join(timeout=5.0)
        with self._lock:
            if self._assembly is not None:
                self._assembly.close()
        self.client.close()

    def status(self) -> dict:
        return {
            "following": self.leader,
            "pack": self.loaded[:16] if self.loaded else None,
            "leader_online": self.leader_online,
            "error": self.last_error,
        }

    def refusal(self) -> str:
        """Why a teaching command is refused here: one line naming the leader."""
        return f"this device follows {self.leader}: teach {self.leader} instead (fleet.follow)"

    def teaching(
        self, apply: Callable[[ImportExamples], Result | None]
    ) -> Callable[[Command], Result | None]:
        """The daemon's handler of teaching commands on a follower: the pack's own import is applied
        (``apply``: the teacher's import), every other teaching command refused naming the leader."""

        def handle(command: Command) -> Result | None:
            if isinstance(command, ImportExamples) and command.source == "fleet":
                result, manifest = apply(command), self._applying
                if result is None and manifest is not None:  # applied (refusals are a Result)
                    self._when_saved(lambda: self._write_loaded(manifest))
                    self._take_center(manifest)
                return result
            self._refusals.log(logging.INFO, "%s from %s refused: %s", type(command).__name__,
                               command.source, self.refusal())  # fmt: skip
            return Result(False, f"teaching: {self.refusal()}")

        return handle

    # --- the network thread ---------------------------------------------------------------------

    def _on_leader_online(self, topic: str, payload: bytes) -> None:
        self.leader_online = payload == b"online"

    def _on_manifest(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # the leader's pack was cleared: keep what we have
        try:
            manifest = pack.parse(payload, self._key, self._max_bytes)
        except pack.PackError as e:
            self._refuse(f"{e}")
            return
        with self._lock:
            current = self._assembly
            if manifest.sha256 == self.loaded or (current and current.manifest.sha256 == manifest.sha256):
                return
            if current is not None:
                self.client.unsubscribe(self._chunks(current.manifest))
                current.close()
            self._assembly = pack.Assembly(manifest, self._folder)
            self._progress = time.monotonic()
        log.info("fleet: %s published pack %s (%d examples): loading it", self.leader, manifest.version,
                 manifest.examples)  # fmt: skip
        self.client.subscribe(self._chunks(manifest), self._on_chunk)

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        parts = topic.rsplit("/", 2)
        with self._lock:
            assembly = self._assembly
            if assembly is None or parts[-2] != assembly.manifest.version or not parts[-1].isdigit():
                return
            if not payload:  # the leader cleared this version: a newer manifest is coming
                return
            try:
                assembly.put(int(parts[-1]), payload)
                self._progress = time.monotonic()
            except pack.PackError as e:
                self._drop(assembly)
                self._refuse(f"pack {assembly.manifest.version}: {e}")
                return
            if not assembly.complete:
                return
            self._assembly = None
        self.client.unsubscribe(self._chunks(assembly.manifest))
        self._ready.put(assembly)

    def _drop(self, assembly: pack.Assembly) -> None:
        self.client.unsubscribe(self._chunks(assembly.manifest))
        assembly.close()
        self._assembly = None

    def _chunks(self, manifest: pack.Manifest) -> str:
        return f"{self._leader_base}/fleet/pack/{manifest.version}/+"

    # --- this output's thread: check, re-embed, hand to the loop --------------------------------

    def _run(self) -> None:
        while True:
            try:
                assembly = self._ready.get(timeout=5.0)
            except queue.Empty:
                self._give_up_stalled()
                continue
            if assembly is None:
                return
            try:
                self._load(assembly)
            except (pack.PackError, archive.ArchiveError, OSError, ValueError, RuntimeError) as e:
                self._refuse(f"pack {assembly.manifest.version}: {e}")
            finally:
                assembly.close()

    def _give_up_stalled(self) -> None:
        """A pack whose chunks stopped coming (a broker that lost some in a crash, a leader gone mid-pack)
        is given up, so that the same version published again is gathered anew."""
        with self._lock:
            assembly = self._assembly
            if assembly is None or time.monotonic() - self._progress < STALL_S:
                return
            self._drop(assembly)
        have, of = assembly.received, len(assembly.manifest.chunks)
        self._refuse(
            f"pack {assembly.manifest.version}: {have} of {of} chunks came, then none for {STALL_S:.0f} s"
        )

    def _load(self, assembly: pack.Assembly) -> None:
        manifest = assembly.manifest
        built = staged.build(
            assembly.file(), self._model_id, self._dim, self._settings, self._folder,
            reembed=self._reembedder(), max_examples=archive.MAX_EXAMPLES,
        )  # fmt: skip
        assembly.close()  # the pack's temporary file is not needed any more
        done, box, claim = threading.Event(), {}, Claim()

        def reply(result: Result) -> None:
            box["result"] = result
            done.set()

        self._applying = manifest
        self._submit(ImportExamples(export=built, mode="replace", source="fleet", reply=reply, claim=claim))
        if not done.wait(APPLY_WAIT_S) and claim.abandon():  # the loop never started it: it never will
            built.discard()
            raise RuntimeError("the loop did not apply it in time")
        if not done.wait(APPLY_WAIT_S):  # the loop took it: its answer comes, unless it is stuck
            raise RuntimeError("the loop took it and gave no answer")
        result: Result = box["result"]
        if not result.ok:
            built.discard()
            raise RuntimeError(result.error)
        self.loaded, self.last_error = manifest.sha256, ""  # fleet-follow.json: when it is saved
        self.client.publish(
            f"{self.client.base}/fleet/following",
            json.dumps({"leader": self.leader, "pack": manifest.version}),
            timeout=10.0,
        )
        log.info(
            "fleet: loaded pack %s of %s: %s", manifest.version, self.leader, result.detail.get("classes")
        )

    def _take_center(self, manifest: pack.Manifest) -> None:
        """On the leader's model, measure in the leader's space: its centre (the mean of the frames its
        camera had seen at its last fit) becomes this device's, which its own frames then move. Two
        devices with the same examples and other centres draw the unknown line apart (the threshold
        is calibrated in the centred space). Another model's space has another centre: its own stays."""
        if manifest.center and manifest.model_id == self._model_id and len(manifest.center) == 4 * self._dim:
            self._adopt_center(np.frombuffer(manifest.center, "<f4"), manifest.seen)

    def _reembedder(self) -> Callable[[bytes], np.ndarray]:
        """Rows of a pack's picture by this device's model (for a leader on another model), its embedder
        made at the first picture."""
        embedder: list[object] = []

        def rows(picture: bytes) -> np.ndarray:
            if not embedder:
                log.info("fleet: re-embedding the examples of %s's pack for this device's model", self.leader)
                embedder.append(self._make_embedder())
            try:
                image = decode(picture)
            except PictureError as error:
                raise pack.PackError(f"a picture: {error}") from None
            return np.asarray(embedder[0].embed_views(image), dtype=np.float32)  # type: ignore[attr-defined]

        return rows

    def _refuse(self, why: str) -> None:
        self.last_error = f"fleet: {why}; keeping the last good pack"
        self._throttle.log(logging.WARNING, "%s", self.last_error)

    def _read_loaded(self) -> str | None:
        try:
            if self._state_file.is_file() and self._state_file.stat().st_size < 4096:
                body = json.loads(self._state_file.read_text())
                if body.get("leader") == self.leader and isinstance(body.get("sha256"), str):
                    return body["sha256"]
        except (OSError, ValueError, AttributeError):
            pass
        return None

    def _write_loaded(self, manifest: pack.Manifest) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"leader": self.leader, "sha256": manifest.sha256}, f)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self._state_file)
        except OSError as e:
            log.warning("fleet: cannot keep which pack is loaded in %s (%s)", self._state_file, e.strerror)

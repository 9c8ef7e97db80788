"""Publishing this device's pack (``[fleet] publish = true``): a retained, chunked copy of its examples that
the devices following it load.

An ``Output``: the loop's events say when the store changed (an example added or deleted, a class added,
removed, renamed or forgotten, an import, a reset). Once changes pause for ``fleet.debounce_s`` the loop
lends the store (``LendExamples``, a few ms, no copy), and this output's own thread writes the archive to a
temporary file, cuts it into chunks and publishes them, then the manifest, then clears the chunks of the
version before. A pack the broker already holds (the same sha256 in its retained manifest: a restart, a
change undone) is not published again. After a reconnect the whole pack is published again, once: a broker
that crashed may have lost retained chunks it had acknowledged (not yet saved), or all of them; and a
publish interrupted by the outage starts over from its first chunk, so a manifest always follows every
chunk it names on the broker as it now is. Rows go as float16 from a float32 store (half the bytes;
unit vectors lose nothing a k-NN notices), uint8 as they are.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgeknn.commands import Command, LendExamples, Result
from edgeknn.fleet import pack
from edgeknn.fleet.client import FleetClient
from edgeknn.outputs import Output
from edgeknn.store import exchange

log = logging.getLogger(__name__)

CHANGES = frozenset(
    {
        "example_added",
        "example_deleted",
        "examples_imported",
        "class_added",
        "class_removed",
        "class_renamed",
        "class_forgotten",
        "reset",
    }
)
RETAINED_WAIT_S = 2.0  # after connecting, how long the broker's retained manifest may take to arrive
LEND_WAIT_S = 60.0


class Leader(Output):
    """Keeps ``<base>/fleet/manifest`` and its chunks up to date with the store."""

    def __init__(self, client: FleetClient, submit: Callable[[Command], None], *, device: str, key: str,
                 debounce_s: float, folder: Path):  # fmt: skip
        self.client, self._submit, self.device, self._key = client, submit, device, key
        self._debounce, self._folder = debounce_s, folder
        self._manifest_topic = f"{client.base}/fleet/manifest"
        self._published: pack.Manifest | None = None  # what the broker holds, as far as we know
        self._heard = threading.Event()  # the broker's retained manifest (or its absence) is known
        self._changed_at: float | None = time.monotonic()  # a first pack at start (unless the broker has it)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-leader", daemon=True)
        self._force = False  # publish even if the broker's manifest names this pack (after a reconnect)
        self.followers: dict[str, str] = {}  # device id → the pack version it last loaded
        self.last_error = ""

    # --- Output ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.client.on_reconnect = self._on_reconnect
        self.client.subscribe(self._manifest_topic, self._on_own_manifest)
        prefix = self.client.base.rsplit("/", 1)[0]
        self.client.subscribe(f"{prefix}/+/fleet/following", self._on_following)
        self.client.start()
        self._thread.start()

    def event(self, event: dict) -> None:
        if event.get("event") in CHANGES:
            self._changed_at = time.monotonic()
            self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        self.client.close()

    def status(self) -> dict:
        """What the state says of this device as a leader."""
        p = self._published
        return {
            "publishing": True,
            "pack": p.version if p else None,
            "followers": sorted(self.followers),
            "error": self.last_error,
        }

    # --- the broker's side ----------------------------------------------------------------------

    def _on_reconnect(self) -> None:
        """The broker may have lost what it held: publish the whole pack again (no debounce)."""
        self._force = True
        self._changed_at = time.monotonic() - self._debounce
        self._wake.set()

    def _on_own_manifest(self, topic: str, payload: bytes) -> None:
        if payload:
            try:
                self._published = pack.parse(payload, self._key, max_bytes=1 << 42)
            except pack.PackError as e:
                log.info("fleet: the retained manifest on the broker is not usable (%s): it is replaced", e)
        self._heard.set()

    def _on_following(self, topic: str, payload: bytes) -> None:
        follower = topic.split("/")[-3]
        try:
            body = json.loads(payload) if payload else {}
        except ValueError:
            return
        if isinstance(body, dict) and body.get("leader") == self.device:
            self.followers[follower] = str(body.get("pack", ""))[:16]
        else:
            self.followers.pop(follower, None)

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            due = self._changed_at
            if due is None or time.monotonic() - due < self._debounce or not self.client.connected:
                continue
            self._heard.wait(RETAINED_WAIT_S)
            self._heard.set()  # no retained manifest arrived: there is none
            self._changed_at = None
            try:
                self._publish_once()
                self.last_error = ""
            except (OSError, pack.PackError, exchange.ArchiveError, RuntimeError) as e:
                self.last_error = f"fleet: the pack was not published: {e}"
                log.warning("%s (trying again in %.0f s)", self.last_error, max(self._debounce, 5.0))
                self._changed_at = time.monotonic() + max(self._debounce, 5.0)

    def _lend(self) -> dict:
        done, box = threading.Event(), {}

        def reply(result: Result) -> None:
            box["result"] = result
            done.set()

        self._submit(LendExamples(source="fleet", reply=reply))
        if not done.wait(LEND_WAIT_S) or not box["result"].ok:
            raise RuntimeError(getattr(box.get("result"), "error", "") or "the loop did not lend the store")
        return box["result"].detail

    def _publish_once(self) -> None:
        force, self._force = self._force, False
        detail = self._lend()
        lent = detail["lent"]
        with tempfile.TemporaryFile(dir=self._folder) as f:
            try:
                exchange.write_lent(f, lent, "float16" if lent.storage == "float32" else None)
            finally:
                detail["give_back"]()
            examples = len(lent.examples)
            manifest = pack.make(self.device, f, lent.model_id, list(lent.classes), examples,
                                 center=detail.get("center"))  # fmt: skip
            before = self._published
            if before is not None and before.sha256 == manifest.sha256 and not force:
                log.debug("fleet: the broker already holds this pack (%s)", manifest.version)
                return
            connects = self.client.connects
            for index, data in pack.chunks_of(f, manifest):
                self._send(self._chunk_topic(manifest, index), data, connects, f"chunk {index}")
        self._send(self._manifest_topic, manifest.to_json(self._key), connects, "the manifest")
        self._published = manifest
        log.info(
            "fleet: published pack %s: %d examples of %d classes, %d bytes in %d chunks",
            manifest.version, examples, len(manifest.classes), manifest.size, len(manifest.chunks),
        )  # fmt: skip
        if before is not None and before.version != manifest.version:
            for index in range(len(before.chunks)):  # the old version's chunks: gone from the broker
                self.client.publish(self._chunk_topic(before, index), b"", timeout=10.0)

    def _send(self, topic: str, payload: bytes, connects: int, what: str) -> None:
        """Publish one piece of a pack; a piece not acknowledged, or a reconnect since the first, starts
        the whole pack over (the broker may have lost pieces it had acknowledged)."""
        if self._stop.is_set() or not self.client.publish(topic, payload) or self.client.connects != connects:
            self._force = True
            raise RuntimeError(f"{what} was not acknowledged by the broker, or the connection was lost")

    def _chunk_topic(self, manifest: pack.Manifest, index: int) -> str:
        return f"{self.client.base}/fleet/pack/{manifest.version}/{index}"

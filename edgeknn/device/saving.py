"""Keeping the store's file up to date: after ``store.autosave_s`` of unsaved changes, on request, before
a reload and at shutdown.

An autosave writes a snapshot of the store on a thread of its own, so a big store (tens of MB, seconds
on an SD card) does not stall the loop; the snapshot (``KnnStore.contents``) is left alone by the changes
the loop makes meanwhile. One writer at a time: a save on request waits for the autosave in flight.

A failed save keeps the examples in memory and is kept as ``error`` (the state's error: MQTT and the
status LED show it) until a save succeeds. It is logged and reported once per streak of failures, and
autosaves are retried after ``first_retry_s``, doubling up to ``max_retry_s``: a full disk sees a few
attempts a minute at first and one every few minutes after, not one per frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from edgeknn.store import file as storefile
from edgeknn.store.knn import KnnStore

log = logging.getLogger(__name__)

RETRY_FIRST_S = 5.0  # after a failed save, the next autosave waits 5 s,
RETRY_MAX_S = 300.0  # doubling up to 5 minutes


def os_reason(e: OSError, path: Path) -> str:
    """Why a save failed, in one line; names the file when it is not the store's (a picture's folder)."""
    reason = e.strerror or str(e)
    culprit = e.filename2 or e.filename
    return f"{reason}: {culprit}" if culprit and str(culprit) != str(path) else reason


def examples_in(store: KnnStore) -> int:
    """How many examples the store holds (what "saved N examples" counts): not its rows, of which an
    example has one per view (six with the view rules)."""
    return sum(store.counts().values())


class _Write:
    """One save of a snapshot on its own thread; ``error`` is set (or not) once ``done``."""

    THREAD_NAME = "edgeknn-save"

    def __init__(
        self,
        path: Path,
        arrays: storefile.Arrays,
        pictures: Mapping[int, bytes],
        generation: int,
        examples: int,
    ):
        self.path, self.generation, self.examples = path, generation, examples
        self.pictures = pictures  # the pictures not yet saved (KnnStore.pictures_to_write)
        self.error: str | None = None
        self._arrays: storefile.Arrays | None = arrays
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            assert self._arrays is not None
            storefile.write(self.path, self._arrays, self.pictures)
        except OSError as e:
            self.error = os_reason(e, self.path)
        except Exception as e:  # never lose the reason: it becomes the state's error
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self._arrays = None  # the snapshot's memory goes as soon as it is written

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()


class Saver:
    """Saves one store to one file; ``report`` hears one ``error`` event per streak of failed saves."""

    def __init__(
        self,
        store: KnnStore,
        path: Path,
        autosave_s: float,
        report: Callable[[dict], None],
        *,
        first_retry_s: float | None = None,
        max_retry_s: float | None = None,
    ):
        self.store, self.path, self.autosave_s, self._report = store, Path(path), autosave_s, report
        self.first_retry_s = RETRY_FIRST_S if first_retry_s is None else first_retry_s
        self.max_retry_s = RETRY_MAX_S if max_retry_s is None else max_retry_s
        self.dirty_since: float | None = None  # when the first unsaved change happened
        self.error = ""  # why the last save failed, for the state; empty once a save succeeded
        self.reason = ""  # the same without "the examples are kept in memory" (they are not, at exit)
        self.attempts = 0  # saves tried, for the figures (saves per minute on a full disk)
        self._generation = 0  # counts changes; a save covers the changes up to its snapshot's
        self._retry_at = 0.0
        self._delay = self.first_retry_s
        self._write: _Write | None = None
        self._when_saved: list[tuple[int, Callable[[], None]]] = []  # (generation, callback)

    @property
    def dirty(self) -> bool:
        return self.dirty_since is not None

    def changed(self) -> None:
        self._generation += 1
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()

    def when_saved(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the loop) once a save covers every change made so far; now if none is
        unsaved. A follower records there which pack its store file holds: after a power cut before
        that save, it still names the pack the file has, so the newer one is loaded again."""
        if not self.dirty:
            callback()
        else:
            self._when_saved.append((self._generation, callback))

    def save(self, final: bool = False) -> bool:
        """Save now, on this thread (a request, a reload, a shutdown); the backoff does not apply.
        ``final``: the process is about to exit, and its caller says a failure (not this)."""
        self.wait()
        self.attempts += 1
        generation, examples = self._generation, examples_in(self.store)
        pictures = self.store.pictures_to_write(self.path)
        try:
            storefile.write(self.path, self.store.contents(), pictures)
        except OSError as e:
            self._failed(os_reason(e, self.path), quiet=final)
            return False
        self.store.pictures_saved(self.path, pictures)
        self._saved(generation, examples)
        return True

    def autosave(self) -> None:
        """Called from the loop: take a finished background save's outcome, start one when it is due."""
        if self._write is not None:
            if not self._write.done:
                return
            self._finish()
        now = time.monotonic()
        if self.dirty_since is None or now - self.dirty_since < self.autosave_s or now < self._retry_at:
            return
        self.attempts += 1
        pictures = self.store.pictures_to_write(self.path)
        self._write = _Write(
            self.path, self.store.contents(snapshot=True), pictures, self._generation, examples_in(self.store)
        )

    def wait(self) -> None:
        """Wait for the background save in flight (if any) and take its outcome."""
        if self._write is not None:
            self._write.join()
            self._finish()

    def flush(self, final: bool = False) -> bool:
        """Save if anything is unsaved (shutdown, reload); False if changes remain unsaved."""
        self.wait()
        return self.save(final) if self.dirty else True

    def _finish(self) -> None:
        write, self._write = self._write, None
        assert write is not None
        self.store.snapshot_done()
        if write.error is None:
            self.store.pictures_saved(self.path, write.pictures)
            self._saved(write.generation, write.examples)
        else:
            self._failed(write.error)

    def _saved(self, generation: int, examples: int) -> None:
        if generation == self._generation:
            self.dirty_since = None
        else:  # changed while the snapshot was written: those changes are due in autosave_s
            self.dirty_since = time.monotonic()
        if self.error:
            log.warning("saved %d examples to %s: saving works again", examples, self.path)
        else:
            log.info("saved %d examples to %s", examples, self.path)
        self.error = self.reason = ""
        self._delay, self._retry_at = self.first_retry_s, 0.0
        due = [callback for wanted, callback in self._when_saved if wanted <= generation]
        self._when_saved = [(wanted, c) for wanted, c in self._when_saved if wanted > generation]
        for callback in due:
            callback()

    def _failed(self, reason: str, quiet: bool = False) -> None:
        first = not self.error
        self.reason = f"cannot save {self.path}: {reason}"
        self.error = f"{self.reason}; the examples are kept in memory"
        self._retry_at = time.monotonic() + self._delay
        if first and not quiet:
            log.error("%s; trying again in %g s, then less and less often", self.error, self._delay)
            self._report({"event": "error", "error": self.error})
        elif not quiet:
            log.debug("%s (again; next try in %g s)", self.error, self._delay)
        self._delay = min(self._delay * 2, self.max_retry_s)

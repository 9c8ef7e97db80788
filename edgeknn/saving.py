"""Keeping the store's file up to date: after ``store.autosave_s`` of unsaved changes, on request and
at shutdown. A failed save is kept as ``error`` (the state's error) until a save succeeds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from edgeknn.store import KnnStore

log = logging.getLogger(__name__)


class Saver:
    """Saves one store to one file; ``report`` hears an ``error`` event when a save fails."""

    def __init__(self, store: KnnStore, path: Path, autosave_s: float, report: Callable[[dict], None]):
        self.store, self.path, self.autosave_s, self._report = store, Path(path), autosave_s, report
        self.dirty_since: float | None = None  # when the first unsaved change happened
        self.error = ""

    def changed(self) -> None:
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()

    def save(self) -> bool:
        try:
            self.store.save(self.path)
        except OSError as e:
            self.error = f"cannot save {self.path}: {e.strerror or e}"
            log.error("%s", self.error)
            self._report({"event": "error", "error": self.error})
            return False
        self.dirty_since, self.error = None, ""
        log.info("saved %d examples to %s", sum(self.store.counts().values()), self.path)
        return True

    def autosave(self) -> None:
        if self.dirty_since is not None and time.monotonic() - self.dirty_since >= self.autosave_s:
            self.save()

    def flush(self) -> None:
        """Save if anything is unsaved (shutdown)."""
        if self.dirty_since is not None:
            self.save()

"""Refitting a store's head beside the frame loop, so that a change costs the loop milliseconds (issue 20).

A delete, a forget or an import marks the head stale. Without a refitter the next classify fits it
on the loop (0.2 s of CPU at 3 000 examples, seconds under load, and the loop neither predicts nor
pings the watchdog meanwhile). With one (``beside``: the daemon's store), the matcher copies the
fit's sample of rows on the loop (a few MB, milliseconds) and ``fit_head`` runs on a thread of its
own; the loop goes on classifying with the previous fit and swaps the new one in, between two
frames, once it is done. At most one fit runs: a change meanwhile leaves the head stale, so one
more starts when this one is in (changes coalesce).

What a prediction uses meanwhile: the index (``scan.py``) and the rows are current at once (a
deleted example's rows are gone: it is never a neighbour and never decides the unknown answer),
and a class left without examples can never win; only the head's weights are those of the rows
before the change, until the new fit is swapped in. When classes were added, removed or renamed,
the weights follow the classes by name (``head.remapped``: a new class has none and cannot win
until the refit, from scratch, is in). With no fit at all and many rows (an import into an empty
store) the nearest examples vote until the first fit, beside the loop too, is in.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from edgeknn.store import head as heads
from edgeknn.store.head import Fit

log = logging.getLogger(__name__)


class Refitter:
    """One head fit at a time on its own thread; the loop starts it (``start``) and takes it (``take``)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: Fit | None = None
        self.failed = False  # a fit raised (logged): the matcher fits on the loop again
        self.fits = 0  # fits done beside the loop and taken

    @property
    def running(self) -> bool:
        """A fit was started and not yet taken (it may be over: ``take`` says)."""
        return self._thread is not None

    def start(
        self,
        rule: str,
        center: np.ndarray | None,
        rows: np.ndarray,
        labels: np.ndarray,
        present: np.ndarray,
    ) -> None:
        """Fit on a thread (``head.fit_head``) on the loop's copies, which it never touches."""
        if self._thread is not None:
            raise RuntimeError("a refit is already running")
        self._result = None

        def run() -> None:
            try:
                self._result = heads.fit_head(rule, center, rows, labels, present)
            except Exception:
                log.exception("refitting the head beside the loop failed; fitting on the loop from now on")
                self.failed = True

        self._thread = threading.Thread(target=run, name="edgeknn-refit", daemon=True)
        self._thread.start()

    def take(self) -> Fit | None:
        """The finished fit, once (None while it runs, or when none was started or it failed)."""
        thread = self._thread
        if thread is None or thread.is_alive():
            return None
        self._thread, result, self._result = None, self._result, None
        if result is not None:
            self.fits += 1
        return result

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running fit to end (tests, a final save); True when none runs."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()


def beside(store: object) -> Refitter:
    """Make ``store`` (a ``KnnStore``) refit its head beside the loop from now on; the daemon's does."""
    matcher = store._matcher  # type: ignore[attr-defined]
    if matcher.refitter is None:
        matcher.refitter = Refitter()
    return matcher.refitter

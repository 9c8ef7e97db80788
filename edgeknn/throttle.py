"""Log lines that a flood cannot multiply: the first of a burst is logged, the rest summed up.

A command flood (thousands of refused or busy requests) must not write thousands of log lines: the
SD card and the journal pay for each. ``Throttle.log`` logs at once when the last line is older than
``interval_s``, else counts; the next line logged says how many were left out meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time


class Throttle:
    """At most one line per ``interval_s`` for one kind of message, with a count of those left out."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0):
        self._log, self._interval = logger, interval_s
        self._lock = threading.Lock()  # the loop and paho's thread may both log
        self._last = -float("inf")
        self.skipped = 0

    def log(self, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                self.skipped += 1
                return
            self._last, skipped, self.skipped = now, self.skipped, 0
        if skipped:
            message += " (and %d more like it since the last one logged)"
            args = (*args, skipped)
        self._log.log(level, message, *args)

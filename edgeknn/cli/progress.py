"""A progress counter for long commands (eval, teach of folders, bench), on a terminal only.

One line on stderr rewritten with ``\\r``; nothing at all when stderr is a pipe, a file or the
journal, so scripts and logs see only the results.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``progress(done)`` shows ``what: done/total``, at most every ``every`` seconds and at the end."""

    def __init__(self, what: str, total: int, stream: TextIO | None = None, every: float = 0.2):
        self.what, self.total, self.every = what, total, every
        self.stream = sys.stderr if stream is None else stream
        self.shown = _is_tty(self.stream)
        self._last = 0.0
        self._text = ""
        self._width = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        if not self.shown:
            return
        now = time.monotonic()
        if done < self.total and now - self._last < self.every:
            return
        self._last = now
        self._write(f"{self.what}: {done}/{self.total}")

    def say(self, line: str) -> None:
        """Print a line of its own on the stream (a skipped file), the counter redrawn after it."""
        text = self._text if self._width else ""
        self.clear()
        print(line, file=self.stream, flush=True)
        if text:
            self._write(text)

    def clear(self) -> None:
        """Erase the counter line (before the results are printed)."""
        if self.shown and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def _write(self, text: str) -> None:
        self._text = text
        pad = " " * max(0, self._width - len(text))
        self.stream.write("\r" + text + pad)
        self.stream.flush()
        self._width = len(text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False

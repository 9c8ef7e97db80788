"""The panel's controls as typed lines, for a desk with a USB webcam and no buttons.

Like the GPIO panel it never touches the store: each line becomes a command passed to ``submit``
(the daemon's queue), and the main loop runs it between frames.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from edgeknn.commands import AddExample, Command, ForgetClass, Reset, Save
from edgeknn.outputs import Output, Reading

log = logging.getLogger(__name__)

KEYBOARD_HELP = """\
edgeknn keys (type one, then Enter):
  1..{n}   add an example of that class ({names})
  f1..f{n} forget that class
  reset    forget every class
  s        save the store now
  ?        this help"""


class KeyboardPanel(Output):
    """The panel's controls as typed lines.

    One command per line (Enter sends it), so a terminal, a pipe and a test's StringIO behave the
    same; ``?`` lists them. A reader thread submits the commands; end of input stops it quietly.
    The stable label is logged when it changes. Key n acts on class slot n-1, whatever its name: the
    commands carry the slot, and the names shown come from the latest state.
    """

    def __init__(self, classes: list[str], submit: Callable[[Command], None], stream: TextIO | None = None):
        self._classes = list(classes)
        self._submit = submit
        self._label: str | None = None
        self._closed = False
        if stream is None:  # one reader of stdin per process: a reload's new panel takes its lines
            self._thread = _STDIN.attach(self)
        else:
            self._thread = threading.Thread(target=_read, args=(stream, lambda: self), name="edgeknn-keys")
            self._thread.daemon = True
            self._thread.start()

    def _line(self, line: str) -> None:
        try:
            command = self._parse(line.strip().lower())
            if command is not None:
                self._submit(command)
        except Exception:
            log.exception("keyboard: %r failed", line.strip())

    def _parse(self, text: str) -> Command | None:
        if not text:
            return None
        if text in ("?", "h", "help"):
            names = ", ".join(f"{n}={name}" for n, name in enumerate(self._classes, 1))
            print(KEYBOARD_HELP.format(n=len(self._classes), names=names), file=sys.stderr)
            return None
        if text == "s":
            return Save(source="keyboard")
        if text == "reset":
            return Reset(source="keyboard")
        forget = text.startswith("f")
        number = text[1:] if forget else text
        if number.isdigit() and 1 <= int(number) <= len(self._classes):
            slot = int(number) - 1
            if forget:
                return ForgetClass(slot=slot, source="keyboard")
            return AddExample(slot=slot, count=1, source="keyboard")
        print(f"edgeknn: unknown key {text!r}; type ? for help", file=sys.stderr)
        return None

    def show(self, reading: Reading) -> None:
        if reading.label != self._label:
            self._label = reading.label
            log.info("stable label: %s", reading.label)

    def state(self, state: dict) -> None:
        """Take the class of each slot from ``classes`` (renamed, added, removed)."""
        classes = state.get("classes")
        if isinstance(classes, dict | list):
            self._classes = list(classes)

    def event(self, event: dict) -> None:
        if event.get("event") == "example_added":
            log.info("example added: %s (%s)", event.get("class"), event.get("count", "?"))

    def close(self) -> None:
        """Ignore further input; the reader thread is a daemon and ends with the process."""
        self._closed = True


def _read(stream: TextIO, panel: Callable[[], KeyboardPanel | None]) -> None:
    """Hand each line of ``stream`` to the panel open now; end quietly at end of input."""
    try:
        for line in stream:
            current = panel()
            if current is None or current._closed:
                if stream is not sys.stdin:
                    return
                continue
            current._line(line)
    except (OSError, ValueError):  # stdin closed or not readable (a service, pytest)
        pass


class _StdinReader:
    """The process's one reader of stdin: a thread blocked in a read cannot be stopped, so panels
    (one per reload) attach to it rather than each leaving a thread behind."""

    def __init__(self) -> None:
        self.panel: KeyboardPanel | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def attach(self, panel: KeyboardPanel) -> threading.Thread:
        """Send stdin's lines to ``panel`` from now on; return the reader thread."""
        with self._lock:
            self.panel = panel
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_read, args=(sys.stdin, lambda: self.panel), name="edgeknn-keys", daemon=True
                )
                self._thread.start()
            return self._thread


_STDIN = _StdinReader()

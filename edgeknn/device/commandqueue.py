"""The daemon's one command queue: buttons, MQTT and the web page put commands on it from their own
threads; the loop runs them between frames through its table of handlers, and every one is answered.

The queue is bounded and the loop runs a bounded number per step, so a flood of commands can take
neither the loop's memory nor its time: past the bound a request is answered ``busy`` at once.
Refusals are counted (``busy_refusals`` goes into the state) and logged through a ``Throttle``.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import Any

from edgeknn.commands import Command, Result
from edgeknn.throttle import Throttle

MAX_QUEUED_COMMANDS = 200  # commands waiting for the loop; past that a request is answered "busy"
COMMANDS_PER_STEP = 20  # commands the loop runs between two frames, so that a flood cannot stall it

Handlers = dict[type, Callable[[Any], Result | None]]  # a handler returns None when it replies later


class CommandQueue(queue.Queue[Command]):
    """Commands waiting for the loop; ``run`` routes each through ``handlers`` (a command's type → its
    handler) and replies with the result. ``log`` is the daemon's logger."""

    def __init__(self, handlers: Handlers, log: logging.Logger):
        super().__init__(maxsize=MAX_QUEUED_COMMANDS)
        self.handlers, self._log = handlers, log
        self.busy_refusals = 0  # commands refused because the queue or the pending examples were full
        self._refusals = Throttle(log)

    def submit(self, command: Command) -> None:
        """Queue a command (thread-safe); a full queue answers ``busy`` at once instead of growing."""
        try:
            self.put_nowait(command)
        except queue.Full:
            self.reply(command, Result(False, f"busy: {MAX_QUEUED_COMMANDS} commands already wait"))

    def run(self, limit: int = COMMANDS_PER_STEP) -> None:
        """Run up to ``limit`` queued commands (on the loop's thread)."""
        for _ in range(limit):
            try:
                command = self.get_nowait()
            except queue.Empty:
                return
            try:
                self._run_one(command)
            except Exception as e:  # a command must never take the loop down
                self._log.exception("command %s failed", type(command).__name__)
                self.reply(command, Result(False, f"internal error: {e}"))

    def refuse_waiting(self, why: str) -> None:
        """Answer every command still queued with ``why``: the loop is stopping or reloading, and a
        request must not wait for a reply that never comes."""
        while True:
            try:
                command = self.get_nowait()
            except queue.Empty:
                return
            self.reply(command, Result(False, why))

    def reply(self, command: Command, result: Result) -> None:
        """Answer ``command`` (if it asked); count and log a refusal."""
        if command.reply is not None:
            try:
                command.reply(result)
            except Exception:
                self._log.exception("reply to %s failed", type(command).__name__)
        if not result.ok:
            if result.error.startswith("busy:"):
                self.busy_refusals += 1
            name, source = type(command).__name__, command.source
            self._refusals.log(logging.WARNING, "%s from %s refused: %s", name, source, result.error)

    def _run_one(self, command: Command) -> None:
        handler = self.handlers.get(type(command))
        if handler is None:
            result: Result | None = Result(False, f"unknown command {type(command).__name__}")
        else:
            result = handler(command)
        if result is not None:  # None: an AddExample replies once its examples are added
            self.reply(command, result)

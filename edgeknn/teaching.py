"""The commands that change what the device knows: add examples, forget, rename, reset.

They run on the loop thread between frames (the loop owns the store). An ``AddExample`` waits
for fresh frames: each of its ``count`` examples is the next frame the loop classifies. A frame
serves at most ADDS_PER_FRAME pending commands (the oldest first), one example each, so a frame's
cost is bounded however many wait; and at most MAX_PENDING_EXAMPLES wait: past that a request is
answered ``busy``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgeknn.commands import (
    MAX_EXAMPLES_PER_COMMAND,
    AddExample,
    Command,
    ForgetClass,
    RenameClass,
    Reset,
    Result,
)
from edgeknn.store import KnnStore

MAX_PENDING_EXAMPLES = 2 * MAX_EXAMPLES_PER_COMMAND  # examples waiting for frames, all commands together
ADDS_PER_FRAME = 8  # pending commands one frame serves (a held button may ask faster than frames come)


class Teacher:
    """Runs teaching commands on one store; ``changed`` marks it unsaved, ``event``/``reply`` report."""

    def __init__(
        self,
        store: KnnStore,
        changed: Callable[[], None],
        event: Callable[[dict, Command], None],
        reply: Callable[[Command, Result], None],
    ):
        self.store, self._changed, self._event, self._reply = store, changed, event, reply
        self.pending: list[list] = []  # [AddExample, examples still to add] waiting for fresh frames

    def _unknown(self, name: str) -> Result:
        return Result(False, f"class: unknown class {name!r}")

    def queue_examples(self, command: AddExample) -> Result | None:
        """Queue the command for the next frames; its reply comes once they are added."""
        if command.class_name not in self.store.classes:
            return self._unknown(command.class_name)
        count = max(1, command.count)
        waiting = sum(remaining for _, remaining in self.pending)
        if waiting + count > MAX_PENDING_EXAMPLES:
            return Result(
                False,
                f"busy: {waiting} examples already wait for frames (at most {MAX_PENDING_EXAMPLES}); "
                "try again once they are added",
            )
        self.pending.append([command, count])
        return None

    def forget_class(self, command: ForgetClass) -> Result:
        if command.class_name not in self.store.classes:
            return self._unknown(command.class_name)
        removed = self.store.forget(command.class_name)
        self._changed()
        self._event({"event": "class_forgotten", "class": command.class_name, "removed": removed}, command)
        return Result(True, detail={"class": command.class_name, "removed": removed})

    def rename_class(self, command: RenameClass) -> Result:
        try:
            self.store.rename(command.class_name, command.new_name)
        except (KeyError, ValueError) as e:
            return Result(False, f"class: cannot rename: {e}")
        self._changed()
        detail = {"class": command.class_name, "new_name": command.new_name}
        self._event({"event": "class_renamed", **detail}, command)
        return Result(True, detail=detail)

    def reset(self, command: Reset) -> Result:
        self.store.reset()
        self.pending.clear()
        self._changed()
        self._event({"event": "reset"}, command)
        return Result(True)

    def add_pending(self, views: np.ndarray) -> None:
        """Add this frame's views as one example of each of the first ADDS_PER_FRAME pending AddExamples."""
        for item in self.pending[:ADDS_PER_FRAME]:
            command, remaining = item
            if command.class_name not in self.store.classes:  # renamed or reset meanwhile
                self.pending.remove(item)
                self._reply(command, self._unknown(command.class_name))
                continue
            count = self.store.add(command.class_name, views)
            item[1] = remaining - 1
            self._event({"event": "example_added", "class": command.class_name, "count": count}, command)
            if item[1] <= 0:
                self.pending.remove(item)
                self._reply(command, Result(True, detail={"class": command.class_name, "count": count}))
        self._changed()

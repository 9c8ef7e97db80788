"""The commands that change what the device knows: add examples, forget, rename, reset.

They run on the loop thread between frames (the loop owns the store). An ``AddExample`` waits
for fresh frames: each of its ``count`` examples is the next frame the loop classifies.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgeknn.commands import AddExample, Command, ForgetClass, RenameClass, Reset, Result
from edgeknn.store import KnnStore


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
        self.pending.append([command, max(1, command.count)])
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
        """Add this frame's views to every pending AddExample (one example per fresh frame)."""
        for item in list(self.pending):
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

"""The commands that change what the device knows: classes (add, remove, rename, forget, reset) and
examples (add, delete, list, import).

They run on the loop thread between frames (the loop owns the store). An ``AddExample`` waits
for fresh frames: each of its ``count`` examples is the next frame the loop classifies. A frame
serves at most ADDS_PER_FRAME pending commands (the oldest first), one example each, so a frame's
cost is bounded however many wait; and at most MAX_PENDING_EXAMPLES wait: past that a request is
answered ``busy``.

A held button asks for an example every ``1 / hold_rate`` seconds, whatever the frame rate. Where
frames come slower than that (a busy or small device: each added frame is embedded in several views),
its asks would pile up and the next frame would serve them all: copies of one frame, not the
several moments of the class the person meant to show. So a held button's repeated ask (``held``)
for a class that already has one from the same panel waiting for its frame joins that one: a hold
adds at most one example per frame, and nothing is left to add after the release. Separate presses
(a button, a key typed twice) are each an example, as a person means them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

import numpy as np

from edgeknn.commands import (
    MAX_EXAMPLES_PER_COMMAND,
    AddClass,
    AddExample,
    Command,
    DeleteExample,
    ForgetClass,
    ImportExamples,
    LendExamples,
    ListExamples,
    RemoveClass,
    RenameClass,
    Reset,
    Result,
)
from edgeknn.store.knn import KnnStore, fitted_center, give_back, lend
from edgeknn.store.names import class_name_error

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

    def refuse_pending(self, why: str) -> None:
        """Answer the AddExamples still waiting for frames with ``why`` (the loop is stopping)."""
        for command, _ in self.pending:
            self._reply(command, Result(False, why))
        self.pending.clear()

    def _unknown(self, name: str) -> Result:
        return Result(False, f"class: unknown class {name!r}")

    def _class_of(self, command: AddExample | ForgetClass) -> str | Result:
        """The class a command means: the one now in its ``slot`` (a button's), else ``class_name``;
        or why there is none."""
        if command.slot is None:
            return command.class_name
        n = len(self.store.classes)
        if not 0 <= command.slot < n:
            return Result(False, f"slot: no class in slot {command.slot + 1} (the device has {n} classes)")
        return self.store.classes[command.slot]

    def queue_examples(self, command: AddExample) -> Result | None:
        """Queue the command for the next frames; its reply comes once they are added."""
        name = self._class_of(command)
        if isinstance(name, Result):
            return name
        if name not in self.store.classes:
            return self._unknown(name)
        if command.held and self._waiting_from(command.source, name):
            return Result(True, detail={"class": name, "count": self.store.counts()[name], "joined": True})
        command = dataclasses.replace(command, class_name=name, slot=None)  # a rename updates it
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

    def _waiting_from(self, source: str, name: str) -> bool:
        """Whether an example of ``name`` asked from ``source`` still waits for its frame."""
        return any(command.source == source and command.class_name == name for command, _ in self.pending)

    def forget_class(self, command: ForgetClass) -> Result:
        name = self._class_of(command)
        if isinstance(name, Result):
            return name
        if name not in self.store.classes:
            return self._unknown(name)
        removed = self.store.forget(name)
        self._changed()
        self._event({"event": "class_forgotten", "class": name, "removed": removed}, command)
        return Result(True, detail={"class": name, "removed": removed})

    def rename_class(self, command: RenameClass) -> Result:
        problem = class_name_error(command.new_name)  # every source: the page's names come unchecked
        if problem:
            return Result(False, f"new_name: {problem}")
        try:
            self.store.rename(command.class_name, command.new_name)
        except (KeyError, ValueError) as e:
            return Result(False, f"class: cannot rename: {e}")
        for item in self.pending:  # examples still waiting for frames follow their class to its new name
            if item[0].class_name == command.class_name:
                item[0] = dataclasses.replace(item[0], class_name=command.new_name)
        self._changed()
        detail = {"class": command.class_name, "new_name": command.new_name}
        self._event({"event": "class_renamed", **detail}, command)
        return Result(True, detail=detail)

    def add_class(self, command: AddClass) -> Result:
        """A new empty class in the next slot (its button and LED, if the panel has that many)."""
        problem = class_name_error(command.class_name)
        if problem:
            return Result(False, f"class: {problem}")
        try:
            slot = self.store.add_class(command.class_name)
        except ValueError as e:
            return Result(False, f"class: {e}")
        self._changed()
        detail = {"class": command.class_name, "slot": slot}
        self._event({"event": "class_added", **detail}, command)
        return Result(True, detail=detail)

    def remove_class(self, command: RemoveClass) -> Result:
        """Remove a class and its examples; the classes after it move down one slot."""
        if command.class_name not in self.store.classes:
            return self._unknown(command.class_name)
        removed = self.store.remove_class(command.class_name)
        # Examples still waiting for frames go with their class: a new class of the same name, added
        # before those frames come, must not receive them.
        self._refuse_pending_of(command.class_name, f"class: {command.class_name!r} was removed")
        self._changed()
        detail = {"class": command.class_name, "removed": removed}
        self._event({"event": "class_removed", **detail}, command)
        return Result(True, detail=detail)

    def delete_example(self, command: DeleteExample) -> Result:
        try:
            name = self.store.delete_example(command.example)
        except KeyError:
            return Result(False, f"example: no example {command.example} (list_examples gives the ids)")
        self._changed()
        detail = {"example": command.example, "class": name, "count": self.store.counts()[name]}
        self._event({"event": "example_deleted", **detail}, command)
        return Result(True, detail=detail)

    def list_examples(self, command: ListExamples) -> Result:
        """Every example (of one class): id, class, time added (ISO 8601 UTC), whether it has a picture."""
        if command.class_name is not None and command.class_name not in self.store.classes:
            return self._unknown(command.class_name)
        examples = [
            {"id": e.id, "class": e.class_name, "added": _iso(e.added), "picture": e.has_picture}
            for e in self.store.examples(command.class_name)
        ]
        return Result(True, detail={"examples": examples})

    def import_examples(self, command: ImportExamples) -> Result | None:
        """The page's upload: the archive's examples added (or replacing the store's), all or none (one
        line why); never an example of the store evicted. Nothing when the page stopped waiting."""
        from edgeknn.store import exchange

        if not command.claim.take():
            return Result(False, "import: the page stopped waiting for it; nothing was imported")
        before = list(self.store.classes)
        try:
            detail = exchange.apply(self.store, command.export, command.mode)
        except ValueError as e:
            return Result(False, f"import: {e}")
        if command.mode == "replace":  # examples waiting for frames never land in a class made anew
            for name in before:
                self._refuse_pending_of(name, f"class: {name!r} was replaced by an import")
        # answered before the state is published: that refits the head on the new rows (seconds at
        # thousands of examples, still on this thread: issue 20, finding 3): the reply need not wait
        self._reply(command, Result(True, detail=detail))
        self._changed()
        event = {k: detail[k] for k in ("mode", "added", "skipped", "removed")}
        self._event({"event": "examples_imported", **event}, command)
        return None

    def _refuse_pending_of(self, name: str, why: str) -> None:
        """Answer (refused: ``why``) and drop the AddExamples still waiting for frames for ``name``."""
        for item in [item for item in self.pending if item[0].class_name == name]:
            self.pending.remove(item)
            self._reply(item[0], Result(False, why))

    def lend_examples(self, command: LendExamples) -> Result:
        """The store's examples for the page's download or a fleet's pack, written on their thread
        (``knn.lend``), and the centre the head was fitted with (the pack names it)."""
        lent = lend(self.store)
        center = fitted_center(self.store)  # a fleet's leader publishes it beside the examples
        return Result(
            True, detail={"lent": lent, "give_back": partial(give_back, self.store, lent), "center": center}
        )

    def reset(self, command: Reset) -> Result:
        self.store.reset()
        self.refuse_pending("reset: every example was forgotten before these were added")
        self._changed()
        self._event({"event": "reset"}, command)
        return Result(True)

    def add_pending(self, views: np.ndarray, picture: bytes | None = None) -> None:
        """Add this frame's views (and its ``picture``, a JPEG) as one example of each of the first
        ADDS_PER_FRAME pending AddExamples."""
        for item in self.pending[:ADDS_PER_FRAME]:
            command, remaining = item
            if command.class_name not in self.store.classes:  # renamed or reset meanwhile
                self.pending.remove(item)
                self._reply(command, self._unknown(command.class_name))
                continue
            count = self.store.add(command.class_name, views, picture=picture)
            item[1] = remaining - 1
            self._event({"event": "example_added", "class": command.class_name, "count": count}, command)
            if item[1] <= 0:
                self.pending.remove(item)
                self._reply(command, Result(True, detail={"class": command.class_name, "count": count}))
        self._changed()


def _iso(ts: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC, like the ``ts`` of every MQTT payload."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

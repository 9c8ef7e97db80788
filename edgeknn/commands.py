"""Commands that teach the device (the class-name rule they follow is ``store.names``).

Buttons and MQTT never touch the store: they put one of these on the daemon's queue, and the main
loop runs it between frames. A command may carry ``reply``, called (from the main loop) with the
result, which is how an MQTT request gets its answer on ``<base>/cmd/result``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_EXAMPLES_PER_COMMAND = 100


@dataclass(frozen=True)
class Result:
    """What came of a command: ``ok`` and, when not, a one-line ``error``; ``detail`` for the reply."""

    ok: bool
    error: str = ""
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Command:
    """Base of every command: where it came from and whom to tell the result."""

    source: str = "api"
    reply: Callable[[Result], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class AddExample(Command):
    """Embed the newest frame ``count`` times (one per new frame) as examples of ``class_name``, or of
    the class in ``slot`` when given (a button: whatever that class is called when the loop runs it)."""

    class_name: str = ""
    count: int = 1
    slot: int | None = None
    held: bool = field(default=False, compare=False)  # a held button's repeated ask: joins one waiting


@dataclass(frozen=True, kw_only=True)
class ForgetClass(Command):
    """Forget every example of ``class_name`` (or of the class in ``slot``); the class stays."""

    class_name: str = ""
    slot: int | None = None


@dataclass(frozen=True, kw_only=True)
class AddClass(Command):
    """Make a new, empty class in the next slot (up to ``store.max_classes``)."""

    class_name: str


@dataclass(frozen=True, kw_only=True)
class RemoveClass(Command):
    """Remove a class and its examples; the classes after it move down one slot."""

    class_name: str


@dataclass(frozen=True, kw_only=True)
class DeleteExample(Command):
    """Delete one example (by the id ``ListExamples`` gives)."""

    example: int


@dataclass(frozen=True, kw_only=True)
class ListExamples(Command):
    """The examples of ``class_name`` (all when None): id, class, when added, whether it has a picture."""

    class_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class SelectClass(Command):
    """Choose the class Home Assistant's Add example acts on; kept across restarts."""

    class_name: str


@dataclass(frozen=True, kw_only=True)
class RenameClass(Command):
    class_name: str
    new_name: str


@dataclass(frozen=True, kw_only=True)
class Reset(Command):
    """Forget every example of every class."""


@dataclass(frozen=True, kw_only=True)
class Save(Command):
    """Write the store to disk now."""


@dataclass(frozen=True, kw_only=True)
class Snapshot(Command):
    """Save the newest frame as a JPEG in the state directory."""


@dataclass(frozen=True, kw_only=True)
class SetThreshold(Command):
    """Change the similarity below which the answer is the no-class one (None: automatic, calibrated
    from the store); kept across restarts."""

    value: float | None


class Claim:
    """Who settles a command that is slow to come: the loop, by running it (``take``), or the asker, by
    giving up first (``abandon``); whichever comes second is told no. So an import the page stopped
    waiting for never lands later, and one the loop took is always answered with its outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by: str | None = None

    def _settle(self, by: str) -> bool:
        with self._lock:
            self._by = self._by or by
            return self._by == by

    def take(self) -> bool:
        return self._settle("loop")

    def abandon(self) -> bool:
        return self._settle("asker")


@dataclass(frozen=True, kw_only=True)
class ImportExamples(Command):
    """Import an archive's examples (``exchange.read_import`` read and checked them off the loop): the
    page's upload. ``mode``: ``add`` (those the store does not have) or ``replace`` (the store's classes
    and examples become the archive's); refused, changing nothing, when it would evict any example."""

    export: Any  # exchange.Bundle
    mode: str = "add"
    claim: Claim = field(default_factory=Claim, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class LendExamples(Command):
    """The store's examples for the page's download (``knn.lend``): the reply's detail holds ``lent``
    and ``give_back``, to be called once the download is over (from any thread)."""

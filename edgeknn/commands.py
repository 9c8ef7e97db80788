"""Commands that teach the device, and the rule for class names.

Buttons and MQTT never touch the store: they put one of these on the daemon's queue, and the main
loop runs it between frames. A command may carry ``reply``, called (from the main loop) with the
result, which is how an MQTT request gets its answer on ``<base>/cmd/result``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLASS_NAME_RE = re.compile(r"[A-Za-z0-9_.\-][A-Za-z0-9 _.\-]{0,31}")
CLASS_NAME_HELP = "1-32 characters of letters, digits, space, '_', '-', '.' (not starting with a space)"
MAX_EXAMPLES_PER_COMMAND = 100


def class_name_error(name: Any) -> str | None:
    """Why ``name`` is not a valid class name, or None.

    The rule: 1-32 characters from letters, digits, space, '_', '-', '.', not starting with a
    space. It keeps names safe inside MQTT topics (no '+', '#', '/'), Home Assistant entity ids,
    log lines and file names, and free of control or look-alike unicode characters.
    """
    if not isinstance(name, str):
        return "expected a string"
    if not CLASS_NAME_RE.fullmatch(name):
        return f"expected {CLASS_NAME_HELP}"
    return None


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
    """Embed the newest frame ``count`` times (one per new frame) as examples of ``class_name``."""

    class_name: str
    count: int = 1


@dataclass(frozen=True, kw_only=True)
class ForgetClass(Command):
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
    """Change the similarity below which the answer is ``unknown``."""

    value: float

"""The value checkers of the configuration's keys, and ``key()``, the field that carries one.

A checker takes a parsed TOML value and returns ``None`` when it is acceptable, else what was
expected (``"expected an integer 1..65535"``); the loader adds the key path and the value got.
They live apart from the sections so that the sections read as a list of keys, and so that other
validators (the MQTT commands take ``integer`` and ``number``) reuse them without the sections.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import field
from typing import Any

from edgeknn.store.names import CLASS_NAME_HELP, class_name_error


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[Any], str | None]:
    """A check for an integer in lo..hi (true/false are not integers); MQTT commands use it too."""

    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return _expect_int(lo, hi)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return _expect_int(lo, hi)
        return None

    return check


def _expect_int(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"expected an integer {lo}..{hi}"
    if lo is not None:
        return f"expected an integer >= {lo}"
    return "expected an integer"


def number(lo: float | None = None, hi: float | None = None) -> Callable[[Any], str | None]:
    """A check for a number in lo..hi, not NaN (true/false are not numbers); MQTT commands use it too."""

    def check(v: Any) -> str | None:
        text = "expected a number" + (
            f" {lo}..{hi}" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
        )
        if isinstance(v, bool) or not isinstance(v, int | float):
            return text
        if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):  # v != v: NaN
            return text
        return None

    return check


def _threshold(v: Any) -> str | None:
    """store.threshold: "auto" (calibrated from the store) or a number -1..1."""
    return None if v == "auto" or not number(-1.0, 1.0)(v) else 'expected a number -1.0..1.0 or "auto"'


def _str(choices: tuple[str, ...] | None = None, nonempty: bool = False):
    def check(v: Any) -> str | None:
        if choices is not None and v not in choices:
            return "expected one of " + ", ".join(f'"{c}"' for c in choices)
        if not isinstance(v, str):
            return "expected a string"
        if nonempty and not v:
            return "expected a non-empty string"
        return None

    return check


def _mqtt_id(pattern: str, help: str) -> Callable[[Any], str | None]:
    """A check for an MQTT name: empty (the default) or ``pattern`` (no wildcard, slash or NUL)."""

    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return "expected a string"
        return None if not v or re.fullmatch(pattern, v) else f"expected {help}"

    return check


def _max_len(limit: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return "expected a string"
        return None if len(v.encode("utf-8")) <= limit else f"expected at most {limit} bytes"

    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def _pins(v: Any) -> str | None:
    """GPIO pins: BCM numbers (17) or gpiozero pin names ("GPIO17", "BOARD11")."""
    ok = isinstance(v, list) and all(
        (isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 53) or (isinstance(p, str) and p)
        for p in v
    )
    return None if ok else 'expected a list of GPIO pins (BCM numbers 0..53 or names like "GPIO17")'


def _pin_or_none(v: Any) -> str | None:
    if v == "" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 53) or isinstance(v, str):
        return None
    return 'expected a GPIO pin (BCM number 0..53, a name like "GPIO17", or "" for none)'


def _class_names(v: Any) -> str | None:
    if not isinstance(v, list) or not v or len(v) > 32:
        return "expected a list of 1..32 class names"
    for name in v:
        if class_name_error(name):
            return f"expected class names of {CLASS_NAME_HELP}, not {json.dumps(name)}"
    if len(set(v)) != len(v):
        return "expected distinct class names"
    return None


def _str_list(v: Any) -> str | None:
    return (
        None if isinstance(v, list) and all(isinstance(s, str) for s in v) else "expected a list of strings"
    )


def key(default: Any, check, doc: str = ""):
    """A config field: its default, its validator and a one-line description."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"check": check, "doc": doc})
    return field(default=default, metadata={"check": check, "doc": doc})

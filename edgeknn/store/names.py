"""Class names: the rule every class name follows, wherever it comes from (a button, MQTT, the page,
an import, a store file), and the no-class answer that no class may be called.
"""

from __future__ import annotations

import re
from typing import Any

UNKNOWN = "unrecognized"  # the no-class answer ("unknown" is a reserved state in Home Assistant)

CLASS_NAME_RE = re.compile(r"[A-Za-z0-9_.\-][A-Za-z0-9 _.\-]{0,31}")
CLASS_NAME_HELP = "1-32 characters of letters, digits, space, '_', '-', '.' (not starting with a space)"
# The no-class answer, and the states Home Assistant reserves ("None" too): never a class's name.
RESERVED_NAMES = frozenset(n.casefold() for n in (UNKNOWN, "unknown", "unavailable", "none"))


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
    if name.casefold() in RESERVED_NAMES:
        return f"expected a name that is not reserved ({', '.join(sorted(RESERVED_NAMES))})"
    return None

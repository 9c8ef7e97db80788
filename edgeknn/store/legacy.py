"""The JSON export of edgeknn before the archive (``archive.py``), still read by every import.

``parse_export`` reads and checks it whole (rows as text, pictures as base64) and refuses it with one
line; ``exchange.read_import`` turns it into what an archive gives.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np

from edgeknn.store.examples import time_error
from edgeknn.store.names import class_name_error
from edgeknn.store.pictures import MAX_PICTURE_BYTES


@dataclass(frozen=True)
class Imported:
    """One example of an export: its views (rows), its picture (JPEG) and when it was added."""

    class_name: str
    views: np.ndarray
    picture: bytes | None
    added: float | None


@dataclass(frozen=True)
class Export:
    model_id: str
    classes: list[str]  # every class of the export, those without examples too, in slot order
    examples: list[Imported]


def parse_export(raw: bytes) -> Export:
    """The examples of an export file; ValueError with one line saying what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    except RecursionError:  # "[[[[..." from a hostile upload: one line, not a traceback
        raise ValueError("not JSON (nested too deeply)") from None
    if not isinstance(data, dict) or data.get("format", "edgeknn-examples") != "edgeknn-examples":
        raise ValueError('not an edgeknn export (no "format": "edgeknn-examples")')
    model_id, rows = data.get("model_id"), data.get("examples")
    pictures, added = data.get("pictures") or {}, data.get("added") or {}
    if not isinstance(model_id, str) or not isinstance(rows, list):
        raise ValueError("not an edgeknn export (model_id or examples missing)")
    if not isinstance(pictures, dict) or not isinstance(added, dict):
        raise ValueError("not an edgeknn export (pictures and added are objects)")
    classes = data.get("classes") or []
    groups: dict[tuple[str, int], list] = {}
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError("not an edgeknn export (an example is not an object)")
        name, example, vector = row.get("class"), row.get("example", 0), row.get("vector")
        if class_name_error(name):
            raise ValueError(f"invalid class name {name!r}")
        if isinstance(example, bool) or not isinstance(example, int):
            raise ValueError(f"example: expected an integer, got {example!r}")
        groups.setdefault((str(name), example), []).append(vector)
    if not isinstance(classes, list) or any(class_name_error(c) for c in classes):
        raise ValueError("classes: expected a list of class names")
    examples = []
    for (name, example), vectors in groups.items():
        try:
            views = np.array(vectors, np.float32)
        except (ValueError, TypeError):
            raise ValueError(f"example {example}: expected vectors of numbers") from None
        if views.ndim != 2 or not np.isfinite(views).all():
            raise ValueError(f"example {example}: expected vectors of finite numbers, all of one length")
        text, when = pictures.get(str(example)), added.get(str(example))
        try:
            picture = base64.b64decode(text, validate=True) if isinstance(text, str) else None
        except (binascii.Error, ValueError):
            raise ValueError(f"example {example}: its picture is not base64") from None
        if picture is not None and (not picture.startswith(b"\xff\xd8") or len(picture) > MAX_PICTURE_BYTES):
            raise ValueError(
                f"example {example}: its picture is not a JPEG of at most {MAX_PICTURE_BYTES} bytes"
            )
        problem = None if when is None else time_error(when)
        if problem:
            raise ValueError(f"example {example}: added: {problem}")
        examples.append(Imported(name, views, picture, None if when is None else float(when)))
    names = list(dict.fromkeys([*classes, *(e.class_name for e in examples)]))
    return Export(model_id, names, examples)

"""`edgeknn classify --source URI`: a classifier model on a live camera (or a replay), in the terminal.

For a person at a desk trying a model before it goes on the device. On a terminal one line is
rewritten in place with the current top-k; into a pipe or a file one line is written per change of
the top-1 label, so a log stays short and readable.
"""

from __future__ import annotations

import json
import shutil
import sys
from typing import TextIO

from edgeknn.camera.sources import CameraError
from edgeknn.camera.uri import check_source, source_opener
from edgeknn.cli.errors import InputError, UsageError
from edgeknn.model.classifier import Classifier, Label

FPS = 10.0  # what a camera is asked for: the terminal needs no more


def describe(labels: list[Label]) -> str:
    return ", ".join(f"{x.label} ({x.confidence:.2f})" for x in labels)


def classify_live(
    classifier: Classifier, uri: str, top: int, as_json: bool = False, out: TextIO | None = None
) -> int:
    """Classify every frame of ``uri`` until it ends (a replay without loop) or Ctrl-C (to stdout)."""
    out = out or sys.stdout
    try:
        opener = source_opener(uri, classifier.model.input_size, FPS)
        check_source(uri)
    except ValueError as e:
        raise UsageError(f"--source: {e}") from None
    except CameraError as e:
        raise InputError(f"--source: {e}") from None
    try:
        source = opener()
    except CameraError as e:
        raise InputError(f"--source: {e}") from None
    live = out.isatty()
    last, frame = None, 0
    try:
        while True:
            try:
                image = source.read()
            except EOFError:
                return 0
            except CameraError as e:
                raise InputError(f"--source: {e}") from None
            frame += 1
            labels = classifier.classify(image, top=top)
            if live:
                width = shutil.get_terminal_size().columns - 1
                out.write("\r\x1b[K" + f"{frame}: {describe(labels)}"[:width])
                out.flush()
            elif labels[0].label != last:
                if as_json:
                    out.write(json.dumps({"frame": frame, "results": [vars(x) for x in labels]}) + "\n")
                else:
                    out.write(f"{frame}: {describe(labels)}\n")
                out.flush()
            last = labels[0].label
    finally:
        source.close()
        if live:
            out.write("\n")

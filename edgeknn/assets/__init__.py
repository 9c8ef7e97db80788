"""The files the package carries so that a first try needs no network: the default model and the demo photos.

``DEFAULT_MODEL`` is the registry's default named model, byte for byte (its sha256 is checked where it is
chosen); ``DEMO_PHOTOS`` holds ``<class>/<photo>`` folders of the sign-digit photos that ``edgeknn demo``
replays. Where they come from and their licence: ``ATTRIBUTION.md`` beside this file.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
DEFAULT_MODEL = FOLDER / "mobilenet_v1_0.75_192_quant.tflite"
DEMO_PHOTOS = FOLDER / "demo"
DEMO_CLASSES = ("1", "2", "5")  # the digits the demo photos show, in the order a replay plays them

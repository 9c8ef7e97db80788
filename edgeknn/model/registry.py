"""The named models: each pinned to a URL and a sha256, so a fresh device finds its model by itself.

``MODELS`` names the MobileNets that ``model.name`` may choose, each pinned to one commit of
google-coral/test_data and its sha256; ``download`` fetches them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

COMMIT = "104342d2d3480b3e66203073dac24f4e2dbb4c41"  # google-coral/test_data "Release Grouper", 2021-07-26
URL_BASE = f"https://github.com/google-coral/test_data/raw/{COMMIT}"
URL_BASE_ENV = "EDGEKNN_MODEL_URL_BASE"  # tests only: serve the files from a local folder instead


@dataclass(frozen=True)
class NamedModel:
    """A model ``model.name`` can choose: its file (the same name in test_data and in
    ``<state_dir>/models``), size and sha256, and what it is."""

    name: str
    file: str
    size: int
    sha256: str
    about: str

    @property
    def url(self) -> str:
        """Where ``edgeknn model fetch`` gets it: test_data at the pinned commit (``$EDGEKNN_MODEL_URL_BASE``
        replaces that base in tests)."""
        return f"{os.environ.get(URL_BASE_ENV) or URL_BASE}/{self.file}"


MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            "mobilenet_v1_1.0_224",
            "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite",
            3251736,
            "f409ef4f73fcbb9667841965623c5c8524aac33d41b9bf5f3667161fb4a76319",
            "MobileNet v1 1.0 224x224 embedding extractor, 1024-d (Coral's k-NN and imprinting examples)",
        ),
        NamedModel(
            "mobilenet_v1_0.75_192",
            "mobilenet_v1_0.75_192_quant.tflite",
            2652542,
            "41daeb22fdcf947e0e5ec32373aa9df7c31f3ef45dbd0ef7b5940fbce3c20f6a",
            "MobileNet v1 0.75 192x192 classifier, its 768-d pooled features",
        ),
        NamedModel(
            "mobilenet_v1_0.5_160",
            "mobilenet_v1_0.5_160_quant.tflite",
            1392846,
            "3cc6d2ca460abd2e0f699a6d0d2550c6b61c6e3b0e27a3616e384ea74cb86f43",
            "MobileNet v1 0.5 160x160 classifier, its 512-d pooled features",
        ),
        NamedModel(
            "mobilenet_v1_0.25_128",
            "mobilenet_v1_0.25_128_quant.tflite",
            525598,
            "cb273c23ee76374b05b9583177e28aa19744858a7679c56a250e83d0333da785",
            "MobileNet v1 0.25 128x128 classifier, its 256-d pooled features (the smallest)",
        ),
        NamedModel(
            "mobilenet_v2_1.0_224",
            "mobilenet_v2_1.0_224_quant.tflite",
            3610798,
            "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776",
            "MobileNet v2 1.0 224x224 classifier, its 1280-d pooled features",
        ),
    )
}
# As accurate as the 1.0/224 extractor on the sign digits at less than half its invoke (README, Performance).
DEFAULT_NAME = "mobilenet_v1_0.75_192"


def by_sha256(sha256: str) -> NamedModel | None:
    """The named model with this identity (a store records its model's sha256), if any."""
    return next((m for m in MODELS.values() if m.sha256 == sha256), None)


def packaged(model: NamedModel) -> Path | None:
    """The copy of ``model`` inside the package (``edgeknn/assets``), if it ships one: the default does,
    so a first start needs no network. The file is the pinned one byte for byte (tests check its sha256)."""
    from edgeknn import assets

    return (
        assets.DEFAULT_MODEL
        if model.file == assets.DEFAULT_MODEL.name and assets.DEFAULT_MODEL.is_file()
        else None
    )


def by_file(path: Path | str) -> NamedModel | None:
    """The named model whose file name ``path`` has, if any."""
    return next((m for m in MODELS.values() if m.file == Path(path).name), None)


# The default named model's file and identity.
DEFAULT_MODEL_FILE = MODELS[DEFAULT_NAME].file
DEFAULT_MODEL_SHA256 = MODELS[DEFAULT_NAME].sha256

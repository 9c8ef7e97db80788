"""Shared fixtures: paths to the real models and photos in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(REPO.parent / "shared") if (REPO.parent / "shared").is_dir() else Path("/work/shared")
MODELS = SHARED / "models"
DATA = SHARED / "data"
EXTRACTOR = MODELS / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
HEAD = MODELS / "mobilenet_quant_v1_224_head_layers.tflite"
V2 = MODELS / "mobilenet_v2_1.0_224_quant.tflite"
TINY = MODELS / "mobilenet_v1_0.25_128_quant.tflite"
LABELS = MODELS / "imagenet_labels.txt"
PHOTOS = DATA / "test_photos"
DIGITS = DATA / "sign_language_digits"


@pytest.fixture(scope="session")
def shared() -> Path:
    assert SHARED.is_dir(), f"{SHARED} is missing: the tests need ../shared beside the repository"
    return SHARED

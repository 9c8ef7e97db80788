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


@pytest.fixture
def factory():
    """gpiozero's MockFactory: pins a test presses and LEDs it reads, as on a Pi; reset after the test."""
    from gpiozero.pins.mock import MockFactory

    f = MockFactory()
    yield f
    f.reset()


# --- MQTT: a real Mosquitto per test (edgeknn.bench.broker) and a recording client (tests/mqttclient.py) ---


@pytest.fixture(scope="session")
def mosquitto() -> str:
    """The mosquitto binary. The MQTT tests fail without it, rather than skip: CI installs it (.ci/run)
    and the README lists it. Tests that start their own broker say so with ``rig.needs_mosquitto``."""
    from edgeknn.bench.broker import find_mosquitto

    found = find_mosquitto()
    if found is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto): the MQTT tests need it")
    return found


@pytest.fixture
def broker(tmp_path: Path, mosquitto: str):
    """A started Mosquitto on a free port on 127.0.0.1 with anonymous access; stopped by its PID after."""
    from edgeknn.bench.broker import Broker

    b = Broker(tmp_path / "broker").start()
    yield b
    b.kill()


@pytest.fixture
def subscriber():
    """A factory: ``subscriber(port, ["topic/#"])`` gives a recording test client, closed after the test."""
    from mqttclient import Subscriber

    made: list[Subscriber] = []

    def make(port: int, topics: list[str], **kw) -> Subscriber:
        made.append(Subscriber(port, topics, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()

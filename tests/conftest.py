"""Shared fixtures, and where the tests find their models and photos.

The package carries the default model and the demo photos (``edgeknn/assets``): the device tests run on
those, so a fresh clone runs them with nothing beside it. The larger sets (every named model, the 2 062
sign-digit photos, the test photos) are found in ``../shared`` beside the repository, else in
``$EDGEKNN_DATA``, else in the cache ``edgeknn data fetch`` fills; a test that needs them and finds none
is skipped with one reason line naming that command (``needs_data``). Never a fixed path elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeknn import assets
from edgeknn.cli.data import FETCHED, default_cache

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path | None:
    """``../shared`` beside the repository, else ``$EDGEKNN_DATA``, else the cache once `edgeknn data
    fetch` has filled it whole (its stamp: a fetch cut short leaves folders, not the stamp), else None."""
    for candidate in (REPO.parent / "shared", os.environ.get("EDGEKNN_DATA")):
        if candidate and (Path(candidate) / "models").is_dir():
            return Path(candidate)
    return default_cache() if (default_cache() / FETCHED).is_file() else None


ROOT = data_root()
HAVE_DATA = ROOT is not None
SHARED = ROOT or REPO.parent / "shared"  # absent: the paths below do not exist, and needs_data skips
MODELS = SHARED / "models"
DATA = SHARED / "data"
EXTRACTOR = MODELS / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
HEAD = MODELS / "mobilenet_quant_v1_224_head_layers.tflite"
V2 = MODELS / "mobilenet_v2_1.0_224_quant.tflite"
TINY = MODELS / "mobilenet_v1_0.25_128_quant.tflite"
LABELS = MODELS / "imagenet_labels.txt"
PHOTOS = DATA / "test_photos"
TM = MODELS / "teachable_machine"  # made, not downloaded: only ../shared or $EDGEKNN_DATA holds it
# The model the device tests run on: the packaged default, there on every checkout.
MODEL = assets.DEFAULT_MODEL
# Every sign-digit photo; without the larger sets, the demo photos: the first 20 of the digits 1, 2 and 5,
# the same files, which is what most tests use (rig.CLASSES).
DIGITS = DATA / "sign_language_digits" if HAVE_DATA else assets.DEMO_PHOTOS
NO_DATA = (
    "needs the models and photo sets: none in ../shared, $EDGEKNN_DATA or the cache; "
    "run `edgeknn data fetch` to download them"
)
# A test (or, as ``pytestmark``, a module) that needs the larger sets: skipped with one reason without them.
# ``needs_data(path)``: that path too (the Teachable Machine export, which the cache lacks).
needs_data = pytest.mark.needs_data


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_data: needs ../shared, $EDGEKNN_DATA or `edgeknn data fetch`")


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("needs_data")
    if marker is None:
        return
    if not HAVE_DATA:
        pytest.skip(NO_DATA)
    missing = [Path(p) for p in marker.args if not Path(p).exists()]
    if missing:
        pytest.skip(
            f"needs {missing[0].relative_to(SHARED)}, which `edgeknn data fetch` does not download: "
            "only ../shared or $EDGEKNN_DATA holds it"
        )


@pytest.fixture(scope="session")
def shared() -> Path:
    if not HAVE_DATA:
        pytest.skip(NO_DATA)
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


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def phone_chromium(scale: int):
    """Headless Debian Chromium as a 390x844 phone with ``scale`` device pixels per CSS pixel (a
    fixture's body: yields the driver, quits it after). Fails, not skips, without it: .ci/run installs it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium and chromium-driver are missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=390,844"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    metrics = {"width": 390, "height": 844, "deviceScaleFactor": scale, "mobile": True}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    yield driver
    driver.quit()

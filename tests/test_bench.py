"""`edgeknn bench`: every promised number is there and sane (no timing assertions: they would flake)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import tomllib

import pytest
from conftest import EXTRACTOR

from edgeknn import config
from edgeknn.bench.broker import MosquittoSub, find_binary, find_mosquitto
from edgeknn.bench.inputs import decode_frames, synthetic_frames
from edgeknn.bench.process import to_toml
from edgeknn.bench.report import table

REQUIRED = [
    "invoke_ms",
    "raw_fps",
    "pipeline_fps",
    "pipeline_ratio",
    *(f"knn_us_{n}" for n in (1000, 10_000, 100_000)),
    *(f"knn_us_uint8_{n}" for n in (1000, 10_000, 100_000)),
    "uint8_agreement",
    "add_us",
    "add_us_1000",
    "add_us_10000",
    "startup_s",
    "store_load_ms",
    "rss_mb",
]
MQTT = ["frame_to_publish_ms_p50", "frame_to_publish_ms_p99"]


@pytest.fixture(scope="module")
def results() -> dict:
    if not EXTRACTOR.exists():
        pytest.skip(f"{EXTRACTOR} is missing")
    command = [sys.executable, "-c", "import sys; from edgeknn.cli import main; sys.exit(main())"]
    done = subprocess.run(
        [*command, "bench", "--json", "--quick", "--model", str(EXTRACTOR)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got:\n{done.stdout}"
    return json.loads(lines[0])


def test_every_key_is_a_positive_number(results):
    keys = REQUIRED + (MQTT if find_mosquitto() else [])
    missing = [k for k in keys if k not in results]
    assert not missing, f"missing keys: {missing}"
    for key, value in results.items():
        assert isinstance(value, int | float) and not isinstance(value, bool), key
        assert math.isfinite(value), key
    for key in keys:
        assert results[key] > 0, key


def test_numbers_agree_with_each_other(results):
    assert results["raw_fps"] == pytest.approx(1000 / results["invoke_ms"], rel=1e-3)
    assert results["pipeline_ratio"] == pytest.approx(results["pipeline_fps"] / results["raw_fps"], rel=1e-3)
    assert results["add_us"] == results["add_us_10000"]
    assert results["uint8_agreement"] >= 0.99
    assert results["uint8_agreement_knn"] >= 0.99
    assert results["store_mb_uint8_100000"] * 4 == pytest.approx(results["store_mb_100000"])
    assert results["rss_mb"] >= results["rss_ready_mb"] > 0
    if find_mosquitto():
        assert results["frame_to_publish_ms_p99"] >= results["frame_to_publish_ms_p50"]
        assert results["published_share"] > 0.9, "most classified frames reached the subscriber"


def test_the_table_names_every_measure_and_marks_missed_targets():
    results = {"threads": 2.0, "pipeline_ratio": 0.5, "knn_us_1000": 50.0, "rss_mb": 100.0}
    text = table(results, EXTRACTOR, None)
    lines = text.splitlines()
    assert "synthetic images" in lines[0]
    assert any(line.startswith("pipeline_ratio") and "MISSED" in line for line in lines)
    assert any(line.startswith("knn_us_1000") and "MISSED" not in line for line in lines)
    assert any(line.startswith("rss_mb") and "MISSED" not in line for line in lines)


def test_the_subprocess_config_is_the_config_it_was_made_from(tmp_path):
    cfg = config.replace(
        config.Config(),
        **{
            "classes": ["cup", "pen"],
            "store.rule": "tfjs",
            "mqtt.enabled": False,
            "camera.source": "replay:x",
        },
    )
    text = to_toml(config.to_dict(cfg))
    assert config.from_dict(tomllib.loads(text)) == cfg


def test_synthetic_frames_are_replayable(tmp_path):
    from edgeknn.imagefiles import find_images

    folder = synthetic_frames(tmp_path / "frames", count=6)
    frames = decode_frames(folder, (224, 224))
    assert len(find_images(folder)) == 6 == len(frames)
    assert all(f.dtype.name == "uint8" and f.shape[2] == 3 for f in frames)


def test_mosquitto_sub_stamps_the_arrival_of_each_frame(broker, subscriber, tmp_path):
    if find_binary("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed")
    topic = "bench/prediction"
    subscriber(broker.port, [topic]).publish(topic, json.dumps({"frame": 7}), retain=True)
    before = time.time()
    sub = MosquittoSub.start(broker.address, topic, tmp_path / "arrivals.txt", count=1)
    assert sub is not None
    assert sub.ended(10), "mosquitto_sub gets the retained message and ends"
    arrivals = sub.arrivals()
    assert list(arrivals) == [7]
    assert before - 1 <= arrivals[7] <= time.time() + 1

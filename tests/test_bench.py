"""`edgeknn bench`: every promised number is there and sane (no timing assertions: they would flake)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import tomllib

import pytest
from conftest import EXTRACTOR, needs_data

from edgeknn import config
from edgeknn.bench.broker import MosquittoSub, find_binary, find_mosquitto
from edgeknn.bench.inputs import decode_frames, synthetic_frames
from edgeknn.bench.process import to_toml
from edgeknn.bench.report import table
from edgeknn.model.registry import DEFAULT_NAME

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
    command = [sys.executable, "-c", "import sys; from edgeknn.cli.main import main; sys.exit(main())"]
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


NAMES = ("model", "compared_model", "side_by_side")  # the values that are not numbers


@needs_data
def test_every_key_is_a_positive_number(results):
    keys = REQUIRED + (MQTT if find_mosquitto() else [])
    missing = [k for k in keys if k not in results]
    assert not missing, f"missing keys: {missing}"
    for key, value in results.items():
        if key in NAMES:
            continue
        assert isinstance(value, int | float) and not isinstance(value, bool), key
        assert math.isfinite(value), key
    for key in keys:
        assert results[key] > 0, key


@needs_data
def test_numbers_agree_with_each_other(results):
    assert results["raw_fps"] == pytest.approx(1000 / results["invoke_ms"], rel=1e-3)
    assert results["pipeline_ratio_min"] <= results["pipeline_ratio"] <= results["pipeline_ratio_max"]
    assert results["add_us"] == results["add_us_10000"]
    assert results["uint8_agreement"] >= 0.99
    assert results["uint8_agreement_knn"] >= 0.99
    assert results["store_mb_uint8_100000"] * 4 == pytest.approx(results["store_mb_100000"])
    assert results["rss_mb"] >= results["rss_ready_mb"] > 0
    if find_mosquitto():
        assert results["frame_to_publish_ms_p99"] >= results["frame_to_publish_ms_p50"]
        assert results["published_share"] > 0.9, "most classified frames reached the subscriber"


@needs_data
def test_both_models_side_by_side_in_one_run(results):
    """The bench's model (--model: the 1.0/224 extractor) and, by default, the default model beside it."""
    assert results["model"] == "mobilenet_v1_1.0_224" and results["compared_model"] == DEFAULT_NAME
    side = results["side_by_side"]
    assert list(side) == ["mobilenet_v1_1.0_224", DEFAULT_NAME]
    for name, values in side.items():
        assert set(values) == {
            "invoke_ms",
            "raw_fps",
            "pipeline_fps",
            "pipeline_ratio",
            "startup_s",
            "rss_mb",
        }, name
        assert all(isinstance(v, float) and v > 0 for v in values.values()), name
    assert side["mobilenet_v1_1.0_224"]["invoke_ms"] == results["invoke_ms"]
    assert results["invoke_ratio"] > 0, "both interpreters, invokes alternating in one process"


def test_pipeline_ratio_is_the_median_of_three_parts_so_one_noisy_part_does_not_decide_it():
    from edgeknn.bench.pipeline import DaemonRun

    run = DaemonRun(embedder=None)  # type: ignore[arg-type]
    # three parts of raw invokes (s) and loop steps (s); the second part's loop was slowed by a neighbour
    run.invokes = [0.010] * 4 + [0.010] * 4 + [0.012] * 4
    run.steps = [0.0105] * 6 + [0.030] * 6 + [0.0125] * 6
    run.parts = [(4, 6), (8, 12), (12, 18)]
    ratios = run.part_ratios()
    assert ratios == pytest.approx([0.010 / 0.0105, 0.010 / 0.030, 0.012 / 0.0125])
    assert sorted(ratios)[1] == pytest.approx(0.952, abs=1e-3), "the median part, not the noisy one"


@needs_data
def test_the_table_names_every_measure_and_marks_missed_targets():
    results = {"threads": 2.0, "pipeline_ratio": 0.5, "knn_us_1000": 50.0, "rss_mb": 100.0}
    text = table(results, EXTRACTOR, None)
    lines = text.splitlines()
    assert "synthetic images" in lines[0]
    assert any(line.startswith("pipeline_ratio") and "MISSED" in line for line in lines)
    assert any(line.startswith("knn_us_1000") and "MISSED" not in line for line in lines)
    assert any(line.startswith("rss_mb") and "MISSED" not in line for line in lines)
    side = {"a": {"invoke_ms": 2.0, "rss_mb": 90.0}, "b": {"invoke_ms": 5.0, "rss_mb": 100.0}}
    lines = table({**results, "model": "a", "side_by_side": side}, EXTRACTOR, None).splitlines()
    assert lines[-3].split() == ["side", "by", "side", "invoke_ms", "rss_mb"]
    assert lines[-2].split() == ["a", "2", "90"] and lines[-1].split() == ["b", "5", "100"]


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


@needs_data
def test_the_web_page_costs_one_viewer_against_none(results):
    """Issue 15: the loop's rate with a viewer on the live view and the event stream, and none, in one
    run; no JPEG while nobody watches; `edgeknn run`'s memory with a viewer and without."""
    for key in ("pipeline_fps_web_none", "pipeline_fps_web_viewer", "web_viewer_ratio", "web_jpeg_fps"):
        assert results[key] > 0, key
    assert results["web_jpeg_none"] == 0, "no viewer, no JPEG"
    assert results["pipeline_ratio_web_viewer"] == pytest.approx(
        results["pipeline_fps_web_viewer"] * results["invoke_ms"] / 1000, rel=1e-3
    )
    assert results["rss_web_viewer_mb"] > 0 and results["rss_web_none_mb"] > 0

"""A trained classifier on the device (issue 14): Teachable Machine exports and ImageNet models.

The real TM export in ../shared/models/teachable_machine (uint8 and float, its labels.txt and its 22
sample images) and the real MobileNet v2 ImageNet classifier, on the real interpreter: labels files,
the input convention of each exporter, `edgeknn run` publishing the model's own top-k over a real
Mosquitto, LEDs on gpiozero's MockFactory, refused teaching, and `edgeknn classify --source`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXTRACTOR, HEAD, LABELS, PHOTOS, TM, V2, needs_data
from rig import BUTTONS, LEDS, Running, Scene, make_config, needs_mosquitto, wait_for

from edgeknn.camera.sources import replay_images
from edgeknn.cli import main as cli
from edgeknn.cli.classifylive import classify_live
from edgeknn.commands import AddExample, ForgetClass, Reset, Result, Save, SetThreshold
from edgeknn.device.build import Fatal, build
from edgeknn.imagefiles import load_rgb
from edgeknn.model.classifier import (
    Classifier,
    ModelClasses,
    ScoreReader,
    fit_labels,
    open_model,
    read_labels,
)
from edgeknn.model.embedder import Embedder
from edgeknn.model.tflite import Model, ModelError, parse_labels
from edgeknn.store.names import UNKNOWN

TM_UINT8, TM_FLOAT = TM / "model.tflite", TM / "model_unquant.tflite"
SAMPLES = TM / "samples"
TM_LABELS = ["Class 1", "Class 2"]


def sample_class(path: Path) -> str:
    """classK_N.png shows Class K (the TM README)."""
    return f"Class {path.name[len('class')]}"


def class_folders(root: Path) -> dict[str, Path]:
    """A folder per TM class under ``root``, of links to its samples (for the rig's Scene)."""
    folders = {}
    for name in TM_LABELS:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for photo in sorted(SAMPLES.iterdir()):
            if sample_class(photo) == name:
                (folder / photo.name).symlink_to(photo)
        folders[name] = folder
    return folders


def tm_config(tmp_path: Path, model: Path = TM_UINT8, **overrides):
    return make_config(tmp_path, **{"model.path": str(model), "panel.kind": "none", **overrides})


# --- labels files ----------------------------------------------------------------------------------


@needs_data(TM)
@pytest.mark.parametrize(
    ("raw", "labels"),
    [
        (b"\xef\xbb\xbf0 Tanpa Topi\r\n1 Topi\r\n", ["Tanpa Topi", "Topi"]),  # Notepad: BOM and CRLF
        (b"\xef\xbb\xbfTanpa Topi\nTopi\n", ["Tanpa Topi", "Topi"]),  # BOM, plain lines
        (b"0 Tanpa Topi\r\n1 Topi", ["Tanpa Topi", "Topi"]),  # CRLF, no final line end
        (b"cat\r\ndog\r\n\r\n", ["cat", "dog"]),  # plain, CRLF, a blank line
        (b"0 Class 1\n1 Class 2\n", ["Class 1", "Class 2"]),  # TM's own
    ],
)
def test_labels_files_with_bom_crlf_numbered_and_plain_lines(tmp_path, raw, labels):
    path = tmp_path / "labels.txt"
    path.write_bytes(raw)
    assert read_labels(path) == labels
    assert Classifier(TM_FLOAT, labels=path).labels == labels


def test_a_bom_alone_is_not_a_label():
    assert parse_labels("\ufeff0 a\n1 b\n") == ["a", "b"]


@needs_data(TM)
@pytest.mark.parametrize("lines", [["Class 1"], ["Class 1", "Class 2", "Class 3"]], ids=["short", "long"])
def test_labels_of_the_wrong_count_are_one_clear_error(tmp_path, lines):
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(f"{i} {x}" for i, x in enumerate(lines)) + "\n")
    with pytest.raises(ModelError) as info:
        Classifier(TM_UINT8, labels=path)
    assert str(info.value) == f"{path}: {len(lines)} labels for a model with 2 outputs"


@needs_data
def test_background_is_prepended_only_for_imagenet_sized_models():
    imagenet = read_labels(LABELS)
    assert fit_labels(imagenet[1:], 1001, "x") == imagenet
    with pytest.raises(ModelError, match="1 labels for a model with 2 outputs"):
        fit_labels(["Class 2"], 2, "x")
    with pytest.raises(ModelError, match="999 labels for a model with 1001 outputs"):
        fit_labels(imagenet[2:], 1001, "x")


@needs_data(TM)
def test_labels_txt_beside_the_model_is_found(tmp_path):
    assert Classifier(TM_UINT8).labels == TM_LABELS  # TM's zip: labels.txt beside model.tflite
    alone = tmp_path / "model.tflite"
    alone.symlink_to(TM_UINT8)
    with pytest.raises(ModelError, match="no labels"):
        Classifier(alone)


@needs_data(TM)
def test_a_device_with_labels_that_do_not_fit_stops_with_one_line(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("just one\n")
    with pytest.raises(Fatal) as info:
        build(tm_config(tmp_path, **{"model.labels": str(path)}), opener=Scene({"x": SAMPLES}).opener)
    assert str(info.value) == f"{path}: 1 labels for a model with 2 outputs"


# --- input conventions per exporter -----------------------------------------------------------------


def input_tensor(model: Model, image: np.ndarray) -> np.ndarray:
    model.set_input(image)
    return model.interpreter.get_tensor(model.input.index)[0]


def older_tm_export(tmp_path: Path) -> Path:
    """TM's uint8 model with the input quantization of older TM exports (scale 1/255, zero point 0).

    The input tensor's scale (0.00772...) and zero point (125, an int64 vector of length 1) are patched
    in a copy of the flatbuffer: the graph is the real one, only the input's quantization changes.
    """
    data = bytearray(TM_UINT8.read_bytes())
    scale = np.float32(0.007720107678323984).tobytes()
    zero_point = np.uint32(1).tobytes() + np.int64(125).tobytes()
    zp_at = data.find(zero_point)
    assert zp_at > 0 and data.find(zero_point, zp_at + 1) < 0, "one zero-point vector of 125"
    scale_at = data.find(scale, zp_at)
    assert scale_at > 0
    data[zp_at + 4 : zp_at + 12] = np.int64(0).tobytes()
    data[scale_at : scale_at + 4] = np.float32(1 / 255).tobytes()
    path = tmp_path / "older_tm.tflite"
    path.write_bytes(data)
    return path


@needs_data(TM)
def test_older_tm_uint8_export_gets_the_raw_pixels(tmp_path):
    model = Model(older_tm_export(tmp_path))
    assert (model.input.dtype, model.input.zero_point) == ("uint8", 0)
    assert model.input.scale == pytest.approx(1 / 255)
    image = load_rgb(SAMPLES / "class1_0.png")
    # TM's own code feeds the raw pixels; pycoral's rule would give clip(2x - 255), zeroing x < 128.
    assert np.array_equal(input_tensor(model, image), model.prepare(image))


@needs_data(TM)
def test_current_tm_uint8_export_gets_its_own_scale_and_zero_point():
    model = Model(TM_UINT8)
    scale, zp = model.input.scale, model.input.zero_point
    image = load_rgb(SAMPLES / "class2_3.png")
    want = np.clip(np.round((model.prepare(image) / 127.5 - 1) / scale + zp), 0, 255).astype(np.uint8)
    assert np.array_equal(input_tensor(model, image), want)


@needs_data(TM)
def test_float_export_gets_minus_one_to_one():
    model = Model(TM_FLOAT)
    image = load_rgb(SAMPLES / "class1_4.png")
    want = model.prepare(image).astype(np.float32) / np.float32(127.5) - 1
    assert np.allclose(input_tensor(model, image), want, atol=1e-6)


@needs_data(TM)
@pytest.mark.parametrize("path", [TM_UINT8, TM_FLOAT], ids=["uint8", "float"])
def test_tm_exports_classify_their_samples(path):
    classifier = Classifier(path)
    right = [
        classifier.classify(load_rgb(p), top=1)[0].label == sample_class(p) for p in sorted(SAMPLES.iterdir())
    ]
    assert sum(right) == len(right) == 22


# --- which kind of model ------------------------------------------------------------------------------


@needs_data(TM)
def test_kind_auto_detection(tmp_path):
    tm = open_model(TM_UINT8)
    assert isinstance(tm, ScoreReader) and tm.labels == TM_LABELS and tm.dim == 2
    assert type(open_model(EXTRACTOR)) is Embedder
    assert type(open_model(V2)) is Embedder, "an ImageNet-sized classifier stays a k-NN embedder by default"
    v2 = open_model(V2, kind="classifier")
    assert isinstance(v2, ScoreReader) and len(v2.labels) == 1001
    assert Embedder(TM_UINT8).dim == 100, (
        "teach/predict/eval on a TM export: its features, not 2 probabilities"
    )
    tm_as_embedder = open_model(TM_FLOAT, kind="embedder")
    assert type(tm_as_embedder) is Embedder and tm_as_embedder.dim == 100  # the last Dense's input
    alone = tmp_path / "model.tflite"
    alone.symlink_to(TM_UINT8)
    assert type(open_model(alone)) is Embedder, "no labels: used as an embedder"
    with pytest.raises(ModelError, match="no labels"):
        open_model(alone, kind="classifier")


@needs_data(TM)
def test_model_classes_answer_unknown_below_the_confidence_threshold():
    classes = ModelClasses(TM_LABELS, "id", threshold=0.7)
    assert classes.top_k == 2, "a small model: every label"
    low = classes.classify(np.array([0.4, 0.6], np.float32))
    assert low.label == UNKNOWN and list(low.scores) == ["Class 2", "Class 1"]
    classes.threshold = 0.5
    assert classes.classify(np.array([0.4, 0.6], np.float32)).label == "Class 2"
    assert ModelClasses(read_labels(LABELS), "id").top_k == 3, "ImageNet-sized: 3, as ml5"


# --- the device -------------------------------------------------------------------------------------------


def run_edgeknn(tmp_path: Path, port: int, model: Path, source: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "edgeknn.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path}"\n[mqtt]\npublish = "every_frame"\nkeepalive = 5\n'
        "[stabilizer]\nframes = 1\n"
    )
    skip = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "INVOCATION_ID", "JOURNAL_STREAM")
    env = {k: v for k, v in os.environ.items() if k not in skip}
    return subprocess.run(
        [sys.executable, "-m", "edgeknn", "run", "--config", str(cfg), "--model", str(model),
         "--source", source, "--mqtt", f"127.0.0.1:{port}", "--device-id", "test", "--panel", "none"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**env, "HOME": str(tmp_path)},
    )  # fmt: skip


@needs_data(TM)
@needs_mosquitto
@pytest.mark.parametrize("model", [TM_UINT8, TM_FLOAT], ids=["uint8", "float"])
def test_run_publishes_the_tm_models_own_top_k(tmp_path, broker, subscriber, model):
    sub = subscriber(broker.port, ["edgeknn/test/#"])
    done = run_edgeknn(tmp_path, broker.port, model, f"replay:{SAMPLES}?fps=10&loop=0")
    assert done.returncode == 0, done.stderr
    files = replay_images(SAMPLES)  # frame N is the N-th image of the replay
    wait_for(
        lambda: (
            sub.on("edgeknn/test/availability")[-1:]
            and sub.on("edgeknn/test/availability")[-1].text == "offline"
        )
    )
    predictions = [json.loads(m.payload) for m in sub.on("edgeknn/test/prediction")]
    assert len(predictions) >= 11, f"only {len(predictions)} predictions: {done.stderr}"
    right = 0
    for p in predictions:
        assert [r["label"] for r in p["results"]] == sorted(TM_LABELS, key=lambda x: -p["scores"][x])
        assert sum(r["confidence"] for r in p["results"]) == pytest.approx(1, abs=0.01)
        right += p["results"][0]["label"] == sample_class(files[p["frame"] - 1])
    print(f"{model.name}: top-1 = the sample's class on {right} of {len(predictions)} frames")
    assert right >= 0.9 * len(predictions)
    state = json.loads(sub.on("edgeknn/test/state")[-1].payload)
    assert state["classes"] == {"Class 1": 0, "Class 2": 0} and state["rule"] == "model"
    assert not (tmp_path / "store.npz").exists(), "a classifier model has no store to write"


@needs_data
def test_imagenet_model_on_the_device_agrees_with_classify(tmp_path, capsys):
    source = f"replay:{PHOTOS}?fps=4&loop=0"
    cfg = make_config(
        tmp_path,
        **{"model.path": str(V2), "model.kind": "classifier", "model.labels": str(LABELS),
           "panel.kind": "none", "camera.source": source, "stabilizer.frames": 1},
    )  # fmt: skip
    run = Running(build(cfg))
    assert wait_for(lambda: not run.thread.is_alive(), 120), "the replay did not end"
    run.stop()
    files = replay_images(PHOTOS)
    seen = {files[r.frame - 1].name: r for r in run.recorder.readings}
    assert len(seen) >= 3, list(seen)
    assert cli.main(["classify", *[str(PHOTOS / name) for name in seen], "--model", str(V2),
                     "--labels", str(LABELS), "--json", "--top", "3"]) == 0  # fmt: skip
    cli_top = {
        Path(d["file"]).name: d["results"] for d in map(json.loads, capsys.readouterr().out.splitlines())
    }
    for name, reading in seen.items():
        assert len(reading.results) == 3
        assert reading.results[0][0] == cli_top[name][0]["label"], name
        assert reading.label == reading.results[0][0]


@needs_data(TM)
def test_extractor_and_head_side_by_side_give_the_knn_label_and_the_imagenet_top_k(tmp_path, capsys):
    cfg = make_config(
        tmp_path,
        **{"model.path": str(EXTRACTOR), "model.head": str(HEAD), "model.labels": str(LABELS),
           "panel.kind": "none", "camera.source": f"replay:{PHOTOS}?fps=4&loop=0", "stabilizer.frames": 1},
    )  # fmt: skip
    run = Running(build(cfg))
    assert type(run.daemon.embedder) is Embedder and run.daemon.store.rule != "model", "still the k-NN"
    assert wait_for(lambda: not run.thread.is_alive(), 120), "the replay did not end"
    run.stop()
    files = replay_images(PHOTOS)
    seen = {files[r.frame - 1].name: r for r in run.recorder.readings}
    assert len(seen) >= 3, list(seen)
    assert cli.main(["classify", *[str(PHOTOS / name) for name in seen], "--model", str(EXTRACTOR),
                     "--head", str(HEAD), "--labels", str(LABELS), "--json"]) == 0  # fmt: skip
    cli_top = {
        Path(d["file"]).name: d["results"] for d in map(json.loads, capsys.readouterr().out.splitlines())
    }
    for name, reading in seen.items():
        assert reading.label == UNKNOWN, "nothing taught: the k-NN knows nothing yet"
        assert len(reading.results) == 3 and reading.results[0][0] == cli_top[name][0]["label"], name
    with pytest.raises(Fatal, match="model.head: only beside an embedder"):
        build(tm_config(tmp_path, **{"model.head": str(HEAD)}), opener=Scene({"x": SAMPLES}).opener)


@needs_data(TM)
def test_leds_follow_the_mapped_labels_and_buttons_only_refuse(tmp_path, factory, caplog):
    scene = Scene(class_folders(tmp_path / "photos"))
    cfg = tm_config(tmp_path, **{"panel.kind": "gpio", "panel.led_labels": ["Class 2"]})
    caplog.set_level(logging.WARNING)
    run = Running(build(cfg, opener=scene.opener, pin_factory=factory))
    leds = [factory.pin(p) for p in LEDS]
    try:
        scene.shown = "Class 2"
        assert wait_for(lambda: run.daemon.stabilizer.label == "Class 2")
        assert wait_for(lambda: [p.state for p in leds] == [True, False, False]), "LED 0 lights for Class 2"
        scene.shown = "Class 1"
        assert wait_for(lambda: run.daemon.stabilizer.label == "Class 1")
        assert wait_for(lambda: not leds[0].state), "Class 1 has no LED: none lit"
        assert run.classified(10)
        assert not any(p.state for p in leds), [p.state for p in leds]
        # A button, pressed twice, teaches nothing and says so once.
        for _ in range(2):
            factory.pin(BUTTONS[0]).drive_low()
            assert wait_for(lambda: "cannot be taught" in caplog.text)
            factory.pin(BUTTONS[0]).drive_high()
            assert run.classified(3)
        assert caplog.text.count("cannot be taught") == 1, caplog.text
        assert run.daemon.store.counts() == {"Class 1": 0, "Class 2": 0}
    finally:
        run.stop()


@needs_data(TM)
def test_leds_default_to_the_labels_in_order_and_a_wrong_label_is_refused(tmp_path, factory):
    scene = Scene(class_folders(tmp_path / "photos"))
    run = Running(
        build(tm_config(tmp_path, **{"panel.kind": "gpio"}), opener=scene.opener, pin_factory=factory)
    )
    leds = [factory.pin(p) for p in LEDS]
    try:
        for i, name in enumerate(TM_LABELS):
            scene.shown = name
            assert wait_for(lambda i=i: [p.state for p in leds] == [j == i for j in range(3)]), name
    finally:
        run.stop()
    with pytest.raises(
        Fatal, match=r"panel.led_labels: 'Topi' is not a label of the model \(Class 1, Class 2\)"
    ):
        build(tm_config(tmp_path, **{"panel.led_labels": ["Topi"]}), opener=scene.opener)


@needs_data(TM)
def test_teaching_commands_are_refused_with_one_clear_error(tmp_path):
    scene = Scene(class_folders(tmp_path / "photos"))
    run = Running(build(tm_config(tmp_path, model=TM_FLOAT), opener=scene.opener))
    results: list[Result] = []
    try:
        assert run.classified()
        for command in (
            AddExample(class_name="Class 1", count=1, reply=results.append),
            ForgetClass(class_name="Class 1", reply=results.append),
            Reset(reply=results.append),
            Save(reply=results.append),
        ):
            run.daemon.submit(command)
        assert wait_for(lambda: len(results) == 4)
        assert all(not r.ok and "model_unquant.tflite is a classifier model" in r.error for r in results)
        assert "cannot be taught" in results[0].error
        # The threshold is a probability here: above every top-1, the answer is unknown.
        run.daemon.submit(SetThreshold(value=0.9999, reply=results.append))
        assert wait_for(lambda: len(results) == 5) and results[-1].ok
        assert wait_for(lambda: run.daemon.stabilizer.label == UNKNOWN)
    finally:
        run.stop()
    assert not (tmp_path / "store.npz").exists()


# --- edgeknn classify --source ----------------------------------------------------------------------------


@needs_data(TM)
def test_classify_source_prints_one_line_per_change_into_a_pipe(capsys):
    rc = cli.main(
        ["classify", "--source", f"replay:{SAMPLES}?fps=0&loop=0", "--model", str(TM_UINT8), "--json"]
    )
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    files = replay_images(SAMPLES)
    assert [x["results"][0]["label"] for x in lines] == ["Class 1", "Class 2"]
    assert [sample_class(files[x["frame"] - 1]) for x in lines] == ["Class 1", "Class 2"]


@needs_data(TM)
def test_classify_source_refreshes_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    assert classify_live(Classifier(TM_FLOAT), f"replay:{SAMPLES}?fps=0&loop=0", 2, out=out) == 0
    shown = out.getvalue()
    assert shown.count("\r\x1b[K") == 22 and shown.endswith("\n") and shown.count("\n") == 1
    assert shown.split("\r\x1b[K")[-1].startswith("22: Class 2 (")


@needs_data(TM)
def test_classify_source_errors_are_one_line(capsys):
    assert cli.main(["classify", "--source", "bogus:1", "--model", str(TM_UINT8)]) == 2
    assert cli.main(["classify", "--model", str(TM_UINT8)]) == 2
    assert cli.main(["classify", "--source", "replay:/nonexistent", "--model", str(TM_UINT8)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("edgeknn: ") for line in err), err

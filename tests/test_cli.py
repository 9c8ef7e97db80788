"""The `edgeknn` command in-process (exit codes, one-line errors) on real models and photos."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, EXTRACTOR, MODEL, MODELS, PHOTOS, TINY, needs_data
from httpserve import serve

from edgeknn import config
from edgeknn.bench.broker import free_port
from edgeknn.cli.evaluate import auroc
from edgeknn.cli.main import main
from edgeknn.imagefiles import find_images, load_rgb
from edgeknn.model.registry import DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256
from edgeknn.model.tflite import sha256_of
from edgeknn.store import archive
from edgeknn.store.knn import KnnStore

CLASSES = ("0", "3", "5", "7")
PER_CLASS = 6


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No /etc/edgeknn/edgeknn.toml and no ~/.local/state: every default points into tmp_path."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-config.toml")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # eval's embeddings


def run(capsys, *argv) -> tuple[int, str, str]:
    """Run `edgeknn argv` in-process; a failure must be one line on stderr that starts `edgeknn: `."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if rc != 0:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgeknn: "), err
    return rc, out, err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 classes x 6 real sign-digit photos (symlinks; the 3024x3024 ones left out)."""
    root = tmp_path_factory.mktemp("digits")
    for name in CLASSES:
        (root / name).mkdir()
        small = [p for p in find_images(DIGITS / name) if p.stat().st_size < 100_000]
        for p in small[:PER_CLASS]:
            (root / name / p.name).symlink_to(p)
    return root


def photos(dataset: Path, name: str) -> list[Path]:
    return sorted((dataset / name).iterdir())


@pytest.fixture(scope="module")
def taught(tmp_path_factory, dataset) -> Path:
    """A store taught by the CLI: classes zero (3 photos of 0) and five (3 photos of 5)."""
    folder = tmp_path_factory.mktemp("taught")
    store, empty_config = folder / "store.npz", folder / "edgeknn.toml"
    empty_config.write_text("")
    for cls, digit in (("zero", "0"), ("five", "5")):
        files = [str(p) for p in photos(dataset, digit)[:3]]
        common = ["--store", str(store), "--model", str(TINY), "--config", str(empty_config)]
        assert main(["teach", *files, "--class", cls, *common]) == 0
    return store


@pytest.fixture
def store_copy(tmp_path, taught) -> Path:
    path = tmp_path / "copy.npz"
    shutil.copy(taught, path)
    return path


# --- eval ----------------------------------------


@needs_data
def test_eval_json(capsys, dataset):
    rc, out, _ = run(capsys, "eval", dataset, "--model", TINY, "--shots", "1,2", "--seeds", "2", "--json")
    assert rc == 0
    assert len(out.splitlines()) == 1
    result = json.loads(out)
    assert result["model"] == str(TINY)
    assert result["default_rule"] == "softmax"
    assert set(result["rules"]) == {"softmax", "tfjs"}
    for per_shot in result["rules"].values():
        assert set(per_shot) == {"1", "2"}
        for cell in per_shot.values():
            assert set(cell) == {"mean", "std", "per_seed"}
            assert 0.0 <= cell["mean"] <= 1.0 and 0.0 <= cell["std"] <= 0.5
            seeds = cell["per_seed"]
            assert len(seeds) == 2 and cell["mean"] == pytest.approx(sum(seeds) / 2, abs=1e-4)
    assert "open_set" not in result


@needs_data
def test_eval_open_set_reports_the_unknown_answer(capsys, dataset, tmp_path):
    """1, 2 and half the classes taught (4 classes: half is 2, reported once), per scenario and shot
    count each figure's mean and spread over the seeds; the embeddings are cached for the next run."""
    cache = tmp_path / "cache"
    argv = ["eval", dataset, "--model", TINY, "--shots", "1,2", "--seeds", "2", "--seen", "1"]
    rc, out, _ = run(capsys, *argv, "--open-set", "--json", "--cache", str(cache))
    assert rc == 0
    result = json.loads(out)
    assert result["protocol"] == "device" and result["taught"] == {"1": 1, "2": 2}
    assert set(result["open_set"]) == {"softmax", "tfjs"}
    for scenarios in result["open_set"].values():
        assert set(scenarios) == {"1", "2"}
        for per_shot in scenarios.values():
            assert set(per_shot) == {"1", "2"}
            for cell in per_shot.values():
                assert set(cell) == {"auroc", "rejected", "right", "right_closed", "kept", "threshold"}
                for key in ("auroc", "rejected", "right", "right_closed"):
                    assert 0.0 <= cell[key]["mean"] <= 1.0 and cell[key]["std"] >= 0.0
                assert cell["right"]["mean"] <= cell["right_closed"]["mean"]
    assert len(list(cache.iterdir())) == 1, "one cache file: these photos, this model"
    rc, out, _ = run(capsys, *argv, "--open-set", "--cache", str(cache))  # the table, from the cache
    assert rc == 0 and "AUROC" in out and "rejected" in out and "kept" in out


@needs_data
def test_eval_old_protocol_and_a_class_subset(capsys, dataset, tmp_path):
    argv = ["eval", dataset, "--model", TINY, "--shots", "1", "--seeds", "1", "--json"]
    rc, out, _ = run(capsys, *argv, "--protocol", "queries", "--classes", "0,3", "--no-cache")
    assert rc == 0
    result = json.loads(out)
    assert result["protocol"] == "queries" and result["classes"] == ["0", "3"]
    rc, _, err = run(capsys, *argv, "--classes", "0,nine", "--no-cache")
    assert rc != 0 and "nine" in err and "Traceback" not in err


@needs_data
def test_eval_one_rule(capsys, dataset):
    rc, out, _ = run(
        capsys,
        "eval",
        dataset,
        "--model",
        TINY,
        "--shots",
        "2",
        "--seeds",
        "1",
        "--rule",
        "nearest",
        "--json",
    )
    assert rc == 0 and set(json.loads(out)["rules"]) == {"nearest"}


@needs_data
def test_eval_prints_a_table(capsys, dataset):
    rc, out, _ = run(
        capsys, "eval", dataset, "--model", TINY, "--shots", "1", "--seeds", "1", "--rule", "tfjs"
    )
    assert rc == 0
    assert out.splitlines()[0].startswith(f"{dataset}: {len(CLASSES) * PER_CLASS} photos, 4 classes")
    assert any(line.startswith("tfjs ") for line in out.splitlines())


@needs_data
@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--shots", "1,x"], "--shots"),
        (["--shots", "0"], "--shots"),
        (["--shots", str(PER_CLASS)], "--shots"),
        (["--seeds", "0"], "--seeds"),
    ],
)
def test_eval_bad_usage(capsys, dataset, args, culprit):
    rc, _, err = run(capsys, "eval", dataset, "--model", TINY, *args)
    assert rc == 2 and culprit in err


@needs_data
def test_eval_on_a_folder_without_classes(capsys, tmp_path):
    (tmp_path / "only").mkdir()
    rc, _, err = run(capsys, "eval", tmp_path, "--model", TINY)
    assert rc == 1 and str(tmp_path) in err and "at least 2 class folders" in err


def test_auroc_on_hand_made_scores():
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([True, True, False, False])) == 0.0
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([True, False, True, False])) == 0.5
    # one tie across the classes counts half: pairs (p, n) = (3,1) (3,2) (2,1) (2,2)
    assert auroc(np.array([3.0, 2.0, 2.0, 1.0]), np.array([True, True, False, False])) == 0.875
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([True, True])))


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(60), 1)  # many ties
    positive = rng.random(60) < 0.4
    pairs = [(p > n) + 0.5 * (p == n) for p in scores[positive] for n in scores[~positive]]
    assert auroc(scores, positive) == pytest.approx(np.mean(pairs))


def test_auroc_accepts_zero_one_labels():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75


# --- teach and predict ----------------------------------------


@needs_data
def test_teach_then_predict(capsys, dataset, taught):
    store = KnnStore.load(taught, sha256_of(TINY))
    assert store.counts() == {"zero": 3, "five": 3}
    assert len(store) == 6 * 6, "the default rule stores six views per example"
    for cls, digit in (("zero", "0"), ("five", "5")):
        for path in photos(dataset, digit)[:3]:
            rc, out, _ = run(capsys, "predict", path, "--store", taught, "--model", TINY, "--json")
            assert rc == 0
            result = json.loads(out)
            assert result["file"] == str(path)
            assert result["label"] == cls
            nearest = result["neighbours"][0]
            assert nearest["similarity"] == pytest.approx(1.0, abs=1e-3), "a taught photo is in the store"
            assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-3)
            assert nearest["class"] == cls
            k_nearest = [n["similarity"] for n in result["neighbours"]]  # similarity: their mean
            assert len(k_nearest) == 3 and result["similarity"] == pytest.approx(np.mean(k_nearest), abs=1e-3)


@needs_data
def test_teach_reports_the_count_and_predict_prints_text(capsys, dataset, tmp_path):
    store = tmp_path / "s.npz"
    rc, out, _ = run(capsys, "teach", dataset / "3", "--store", store, "--class", "three", "--model", TINY)
    assert rc == 0 and out == f"{store}: class 'three' now has {PER_CLASS} examples ({PER_CLASS} added)\n"
    photo = photos(dataset, "3")[0]
    rc, out, _ = run(capsys, "predict", photo, "--store", store, "--model", TINY)
    assert rc == 0 and out.startswith(f"{photo}: three (1.00, similarity 0.")  # its 3 nearest's mean


@needs_data
def test_teach_with_a_bad_class_name(capsys, dataset, tmp_path):
    rc, _, err = run(
        capsys, "teach", dataset / "0", "--store", tmp_path / "s.npz", "--class", "a/b", "--model", TINY
    )
    assert rc == 2 and "--class" in err and "'a/b'" in err
    assert not (tmp_path / "s.npz").exists()


@needs_data
def test_teach_into_a_store_of_another_model(capsys, dataset, store_copy):
    rc, _, err = run(
        capsys,
        "teach",
        photos(dataset, "0")[0],
        "--store",
        store_copy,
        "--class",
        "zero",
        "--model",
        EXTRACTOR,
    )
    assert (
        rc == 1
        and str(store_copy) in err
        and sha256_of(TINY)[:12] in err
        and sha256_of(EXTRACTOR)[:12] in err
    )


@needs_data
def test_predict_without_a_store(capsys, dataset, tmp_path):
    rc, _, err = run(
        capsys, "predict", photos(dataset, "0")[0], "--store", tmp_path / "none.npz", "--model", TINY
    )
    assert rc == 1 and f"{tmp_path / 'none.npz'}: store file not found" in err


@needs_data
def test_predict_with_a_corrupt_store(capsys, dataset, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all" * 10)
    rc, _, err = run(capsys, "predict", photos(dataset, "0")[0], "--store", bad, "--model", TINY)
    assert rc == 1 and str(bad) in err


# --- store info / forget / rename / export / import ----------------------------------------


@needs_data
def test_store_info(capsys, taught):
    rc, out, _ = run(capsys, "store", "info", taught)
    assert rc == 0
    assert f"model: {sha256_of(TINY)}" in out
    assert "rows: 36 of 256 values (uint8)" in out, "store.storage auto: a quantized extractor's rows"
    assert "pictures: 6 of 6 examples (can be re-embedded: yes)" in out
    assert "  zero: 3 examples" in out and "  five: 3 examples" in out


@needs_data
def test_store_info_with_the_wrong_model(capsys, taught):
    rc, _, err = run(capsys, "store", "info", taught, "--model", EXTRACTOR)
    assert rc == 1 and str(taught) in err


def test_store_info_of_a_missing_or_corrupt_store(capsys, tmp_path):
    rc, _, err = run(capsys, "store", "info", tmp_path / "none.npz")
    assert rc == 1 and "store file not found" in err
    (tmp_path / "bad.npz").write_bytes(b"\x00" * 100)
    rc, _, err = run(capsys, "store", "info", tmp_path / "bad.npz")
    assert rc == 1 and str(tmp_path / "bad.npz") in err


@needs_data
def test_store_forget(capsys, store_copy):
    rc, out, _ = run(capsys, "store", "forget", store_copy, "zero", "--model", TINY)
    assert rc == 0 and "forgot 3 examples of 'zero'" in out
    assert KnnStore.load(store_copy, sha256_of(TINY)).counts() == {"zero": 0, "five": 3}


@needs_data
def test_store_forget_an_unknown_class(capsys, store_copy):
    before = store_copy.read_bytes()
    rc, _, err = run(capsys, "store", "forget", store_copy, "seven")
    assert rc == 2 and "'seven'" in err and "zero, five" in err
    assert store_copy.read_bytes() == before


@needs_data
def test_store_rename(capsys, store_copy):
    rc, out, _ = run(capsys, "store", "rename", store_copy, "zero", "nought")
    assert rc == 0 and "renamed 'zero' to 'nought'" in out
    assert KnnStore.load(store_copy, sha256_of(TINY)).counts() == {"nought": 3, "five": 3}


@needs_data
@pytest.mark.parametrize(
    ("old", "new", "culprit"),
    [
        ("zero", "a/b", "'a/b'"),
        ("zero", " lead", "' lead'"),
        ("seven", "x", "'seven'"),
        ("zero", "five", "five"),
    ],
)
def test_store_rename_refused(capsys, store_copy, old, new, culprit):
    before = store_copy.read_bytes()
    rc, _, err = run(capsys, "store", "rename", store_copy, old, new)
    assert rc == 2 and culprit in err
    assert store_copy.read_bytes() == before


@needs_data
def test_store_export_and_import(capsys, taught, tmp_path):
    exported = tmp_path / "examples.tar"
    rc, out, _ = run(capsys, "store", "export", taught, exported)
    size = exported.stat().st_size
    assert (
        rc == 0
        and out == f"{exported}: 6 examples of 2 classes (uint8 rows), 6 with their picture, {size} bytes\n"
    )
    manifest = archive.Reader(exported.open("rb")).manifest
    assert manifest.model_id == sha256_of(TINY) and manifest.dim == 256 and len(manifest.examples) == 6
    assert size < 6 * (6 * 256 * 4 + 20_000), "rows and pictures as bytes, not JSON text"
    target = tmp_path / "imported.npz"
    rc, out, _ = run(capsys, "store", "import", target, exported)
    assert rc == 0 and out == f"{target}: imported 6 examples, 6 with their picture\n"
    original, imported = (KnnStore.load(p, sha256_of(TINY)) for p in (taught, target))
    assert imported.counts() == original.counts() and len(imported) == len(original)
    assert [imported.picture(e.id) for e in imported.examples()] == [
        original.picture(e.id) for e in original.examples()
    ]
    assert np.array_equal(imported.rows(), original.rows())
    rc, out, _ = run(capsys, "store", "export", taught, tmp_path / "half.tar", "--rows", "float16")
    assert rc == 0 and "float16 rows" in out
    rc, out, _ = run(capsys, "store", "export", taught, tmp_path / "full.tar", "--rows", "float32")
    assert rc == 0 and "float32 rows" in out
    assert (tmp_path / "half.tar").stat().st_size < (tmp_path / "full.tar").stat().st_size


def test_store_import_of_something_else(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    rc, _, err = run(capsys, "store", "import", tmp_path / "s.npz", bad)
    assert rc == 1 and str(bad) in err and "not an edgeknn export" in err  # a bad file: 1, as a missing one
    assert not (tmp_path / "s.npz").exists()
    bad.write_text("[" * 100_000)  # nested deeper than the parser goes: one line, not a traceback
    rc, _, err = run(capsys, "store", "import", tmp_path / "s.npz", bad)
    assert rc == 1 and "not an edgeknn export" in err and len(err.strip().splitlines()) == 1, err


def test_store_import_with_a_bad_class_name(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"model_id": "m", "examples": [{"class": "a+b", "example": 0, "vector": [1, 0]}]})
    )
    rc, _, err = run(capsys, "store", "import", tmp_path / "s.npz", bad)
    assert rc == 1 and "'a+b'" in err  # in the file, not on the command line


@pytest.mark.parametrize(
    "examples",
    [
        [
            {"class": "a", "example": 0, "vector": [1.0, 0.0]},
            {"class": "b", "example": 1, "vector": [1.0, 0.0, 0.0]},
        ],
        [{"class": "a", "example": 0}],
        [7],
    ],
    ids=["ragged-vectors", "no-vector", "not-an-object"],
)
def test_store_import_of_a_malformed_export(capsys, tmp_path, examples):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_id": "m", "examples": examples}))
    rc, _, err = run(capsys, "store", "import", tmp_path / "s.npz", bad)
    assert rc != 0 and str(bad) in err
    assert not (tmp_path / "s.npz").exists()


@needs_data
def test_store_import_into_a_store_of_another_model(capsys, taught, store_copy, tmp_path):
    exported = tmp_path / "examples.json"
    data = {"model_id": "f" * 64, "examples": [{"class": "x", "example": 0, "vector": [0.1] * 256}]}
    exported.write_text(json.dumps(data))
    before = store_copy.read_bytes()
    rc, _, err = run(capsys, "store", "import", store_copy, exported)
    assert rc == 1 and str(store_copy) in err and "ffffffffffff" in err
    assert store_copy.read_bytes() == before


def test_store_without_an_action_prints_help(capsys):
    assert main(["store"]) == 2
    assert "usage: edgeknn" in capsys.readouterr().out


# --- classify ----------------------------------------


@needs_data
def test_classify_a_photo(capsys):
    rc, out, _ = run(capsys, "classify", PHOTOS / "cat.bmp", "--model", TINY, "--top", "3")
    assert rc == 0 and out.startswith(f"{PHOTOS / 'cat.bmp'}: Egyptian cat (")
    rc, out, _ = run(capsys, "classify", PHOTOS / "parrot.jpg", PHOTOS / "cat.bmp", "--model", TINY, "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["results"][0]["label"] for x in lines] == ["macaw", "Egyptian cat"]
    assert len(lines[0]["results"]) == 5 and set(lines[0]["results"][0]) == {"label", "confidence"}


@needs_data
def test_classify_missing_file(capsys, tmp_path):
    rc, out, err = run(capsys, "classify", tmp_path / "nope.jpg", "--model", TINY)
    assert rc == 1 and out == "" and f"{tmp_path / 'nope.jpg'}: no such file" in err


@needs_data
def test_classify_a_file_that_is_not_an_image(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    rc, _, err = run(capsys, "classify", text, "--model", TINY)
    assert rc == 1 and str(text) in err and "not an image" in err
    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    rc, _, err = run(capsys, "classify", fake, "--model", TINY)
    assert rc == 1 and str(fake) in err and "not an image" in err


@needs_data
def test_classify_an_empty_folder(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(capsys, "classify", empty, "--model", TINY)
    assert rc == 1 and f"{empty}: no image files" in err


@needs_data
def test_classify_with_a_missing_model(capsys, tmp_path):
    rc, _, err = run(capsys, "classify", PHOTOS / "cat.bmp", "--model", tmp_path / "m.tflite")
    assert rc == 1 and f"{tmp_path / 'm.tflite'}: model file not found" in err


@needs_data
def test_classify_bad_top(capsys):
    rc, _, err = run(capsys, "classify", PHOTOS / "cat.bmp", "--model", TINY, "--top", "0")
    assert rc == 2 and "--top" in err


# --- help, version, model info ----------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["classify"],
        ["teach"],
        ["predict"],
        ["eval"],
        ["bench"],
        ["store"],
        ["store", "info"],
        ["store", "export"],
        ["store", "import"],
        ["store", "forget"],
        ["store", "rename"],
        ["model"],
        ["model", "info"],
        ["model", "fetch"],
    ],
    ids=lambda c: " ".join(c) or "edgeknn",
)
def test_help_for_every_command(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: edgeknn {' '.join(command)}".rstrip())


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: edgeknn" in capsys.readouterr().out


@needs_data
def test_model_info_prints_the_backend(capsys):
    rc, out, _ = run(capsys, "model", "info", TINY)
    assert rc == 0
    info = json.loads(out)
    assert info["backend"] == "ai_edge_litert"
    assert info["inputs"][0]["shape"] == [1, 128, 128, 3]


def test_model_info_of_a_file_that_is_not_a_model(capsys, tmp_path):
    bad = tmp_path / "m.tflite"
    bad.write_bytes(b"\x00" * 64)
    rc, _, err = run(capsys, "model", "info", bad)
    assert rc == 1 and f"{bad}: not a TFLite model" in err


@needs_data
def test_console_script():
    script = Path(sys.executable).parent / "edgeknn"
    script = script if script.exists() else Path(shutil.which("edgeknn") or "edgeknn")
    done = subprocess.run(
        [str(script), "model", "info", str(TINY)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["backend"] == "ai_edge_litert"
    done = subprocess.run(
        [str(script), "model", "info", "/nonexistent.tflite"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("edgeknn: /nonexistent.tflite: model file not found")
    assert "Traceback" not in done.stderr


# --- model fetch ----------------------------------------


@pytest.fixture(scope="module")
def model_server():
    """A local HTTP server serving ../shared/models (read-only) on a free port."""
    with serve(MODELS) as base:
        yield base


@needs_data
def test_model_fetch(capsys, tmp_path, model_server):
    dest = tmp_path / "models" / DEFAULT_MODEL_FILE
    rc, out, _ = run(
        capsys, "model", "fetch", "--url", f"{model_server}/{DEFAULT_MODEL_FILE}", "--dest", dest
    )
    assert rc == 0
    assert out == f"{dest}: sha256 {DEFAULT_MODEL_SHA256} verified\n"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == DEFAULT_MODEL_SHA256
    assert dest.read_bytes() == (MODELS / DEFAULT_MODEL_FILE).read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == [DEFAULT_MODEL_FILE]


@needs_data
def test_model_fetch_default_destination_is_the_state_folder(capsys, tmp_path, model_server):
    rc, out, _ = run(capsys, "model", "fetch", "--url", f"{model_server}/{DEFAULT_MODEL_FILE}")
    assert rc == 0
    dest = tmp_path / "state" / "models" / DEFAULT_MODEL_FILE
    assert dest.exists() and out.startswith(f"{dest}: ")


@needs_data
def test_model_fetch_checksum_mismatch_leaves_nothing(capsys, tmp_path, model_server):
    dest = tmp_path / "models" / DEFAULT_MODEL_FILE
    url = f"{model_server}/{DEFAULT_MODEL_FILE}"
    rc, out, err = run(capsys, "model", "fetch", "--url", url, "--dest", dest, "--sha256", "0" * 64)
    assert rc == 1 and out == ""
    assert "checksum mismatch" in err and url in err and DEFAULT_MODEL_SHA256 in err
    assert list(dest.parent.iterdir()) == [], "neither the file nor a .part is left"


@needs_data
def test_model_fetch_does_not_replace_a_good_file_with_a_bad_download(capsys, tmp_path, model_server):
    dest = tmp_path / DEFAULT_MODEL_FILE
    shutil.copy(EXTRACTOR, dest)  # another model where the default belongs
    url = f"{model_server}/{TINY.name}"
    rc, _, err = run(capsys, "model", "fetch", "--url", url, "--dest", dest)
    assert rc == 1 and "checksum mismatch" in err
    assert sha256_of(dest) == sha256_of(EXTRACTOR)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


@needs_data
def test_model_fetch_not_found(capsys, tmp_path, model_server):
    dest = tmp_path / "m.tflite"
    rc, _, err = run(capsys, "model", "fetch", "--url", f"{model_server}/missing.tflite", "--dest", dest)
    assert rc == 1 and "download failed" in err and "missing.tflite" in err
    assert list(tmp_path.iterdir()) == []


def test_model_fetch_unreachable(capsys, tmp_path):
    dest = tmp_path / "m.tflite"
    url = f"http://127.0.0.1:{free_port()}/m.tflite"
    rc, _, err = run(capsys, "model", "fetch", "--url", url, "--dest", dest)
    assert rc == 1 and err.startswith(f"edgeknn: {url}: download failed")
    assert list(tmp_path.iterdir()) == []


def test_model_fetch_with_a_malformed_url(capsys, tmp_path):
    rc, _, err = run(capsys, "model", "fetch", "--url", "not-a-url", "--dest", tmp_path / "m.tflite")
    assert rc == 1 and "not-a-url" in err
    assert list(tmp_path.iterdir()) == []


# --- first contact (issue 21): probabilities from the graph, a bad file in a list, --threshold, help ---


@needs_data
def test_classify_with_the_default_model_gives_its_own_probabilities(capsys):
    """The packaged default's uint8 softmax sums to 0.95 on grace_hopper: it was softmaxed again (0.0015)."""
    rc, out, _ = run(capsys, "classify", PHOTOS / "grace_hopper.bmp", "--json")
    best = json.loads(out)["results"][0]
    assert rc == 0 and best["label"] == "military uniform" and best["confidence"] >= 0.3, best


def test_a_softmax_output_is_told_from_the_graph():
    from edgeknn.model.classifier import Classifier, outputs_probabilities

    classifier = Classifier(MODEL)
    model = classifier.model
    assert outputs_probabilities(model.interpreter, model.output) and classifier.probabilities_out
    photo = sorted((DIGITS / "5").iterdir())[0]
    top = classifier.classify(load_rgb(photo, 1024), top=1)[0]
    raw = model.tensor(model.output).reshape(-1)  # the model's own answer, as its uint8 output says
    assert top.confidence == pytest.approx(float(raw.max()))


@needs_data
def test_classify_skips_a_bad_file_in_a_list_and_classifies_the_rest(capsys, tmp_path):
    notes = tmp_path / "README.md"
    notes.write_text("# not a photo\n")
    first, second = sorted((DIGITS / "1").iterdir())[:2]
    rc, out, err = run(capsys, "classify", first, notes, second, "--json")
    assert (
        rc == 1
        and err == f"edgeknn: skipped {notes}: not an image file (expected a suffix like .jpg or .png)\n"
    )
    assert [json.loads(line)["file"] for line in out.splitlines()] == [str(first), str(second)]
    renamed = tmp_path / "fake.jpg"  # an image suffix, not an image: skipped when read
    renamed.write_text("hello")
    store = demo_store(tmp_path)
    capsys.readouterr()
    rc, out, err = run(capsys, "predict", first, renamed, "--store", store, "--json")
    assert rc == 1 and len(out.splitlines()) == 1 and f"skipped {renamed}: not an image" in err


def demo_store(tmp_path: Path) -> Path:
    """A store taught by the CLI on the default model: 3 demo photos each of 1 and 5."""
    store = tmp_path / "demo.npz"
    if not store.exists():
        for digit in ("1", "5"):
            files = [str(p) for p in sorted((DIGITS / digit).iterdir())[:3]]
            assert main(["teach", *files, "--class", f"d{digit}", "--store", str(store)]) == 0
    return store


@needs_data
def test_predict_threshold(capsys, tmp_path):
    store = demo_store(tmp_path)
    capsys.readouterr()
    held_out = sorted((DIGITS / "5").iterdir())[10]
    answers = {}
    for threshold in ("1.0", "-1", "auto"):
        rc, out, _ = run(capsys, "predict", held_out, "--store", store, "--threshold", threshold, "--json")
        assert rc == 0
        answers[threshold] = json.loads(out)["label"]
    assert answers["1.0"] == "unrecognized" and answers["-1"] in ("d1", "d5"), answers
    with pytest.raises(SystemExit) as info:
        main(["predict", str(held_out), "--store", str(store), "--threshold", "2"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert info.value.code == 2 and "--threshold" in err and "'2'" in err


def test_every_argument_of_every_command_has_help():
    import argparse

    from edgeknn.cli.main import build_parser

    def missing(parser: argparse.ArgumentParser, name: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    found += missing(p, f"{name} {sub}")
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction) and not action.help:
                found.append(f"{name}: {action.option_strings[0] if action.option_strings else action.dest}")
        return found

    assert missing(build_parser(), "edgeknn") == []

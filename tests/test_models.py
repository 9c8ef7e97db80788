"""Named models: `model.name`, `edgeknn model fetch NAME` / `model list`, and installs that keep their model.

Downloads come from a local HTTP server serving ../shared/models (the files are byte for byte those
of google-coral/test_data at the pinned commit), reached through $EDGEKNN_MODEL_URL_BASE.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import EXTRACTOR, MODELS, PHOTOS, TINY, needs_data
from httpserve import FileHandler, serve

from edgeknn import assets, config
from edgeknn.cli.main import main
from edgeknn.model.embedder import Embedder
from edgeknn.model.registry import DEFAULT_NAME, URL_BASE, URL_BASE_ENV, by_file, by_sha256
from edgeknn.model.registry import MODELS as NAMED
from edgeknn.model.tflite import sha256_of
from edgeknn.store.knn import KnnStore

OLD_DEFAULT = NAMED["mobilenet_v1_1.0_224"]  # the default model before the faster one
SMALL = NAMED["mobilenet_v1_0.25_128"]  # the quickest to download and load


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No /etc/edgeknn/edgeknn.toml and no ~/.local/state: every default points into tmp_path."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-config.toml")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.delenv(URL_BASE_ENV, raising=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    """`edgeknn argv` in-process; a failure is one line on stderr."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if rc != 0:
        assert len(err.splitlines()) == 1 and err.startswith("edgeknn: "), err
    return rc, out, err


@pytest.fixture
def mirror(monkeypatch) -> Iterator[str]:
    """../shared/models served over HTTP, and $EDGEKNN_MODEL_URL_BASE pointing there."""
    with serve(MODELS) as base:
        monkeypatch.setenv(URL_BASE_ENV, base)
        yield base


@needs_data
def test_the_registry_pins_every_shared_model_by_commit_and_sha256():
    assert DEFAULT_NAME in NAMED and OLD_DEFAULT.file == EXTRACTOR.name
    for m in NAMED.values():
        path = MODELS / m.file
        assert path.stat().st_size == m.size and sha256_of(path) == m.sha256, m.name
        assert m.url == f"{URL_BASE}/{m.file}"
        assert m.url.startswith(
            "https://github.com/google-coral/test_data/raw/104342d2d3480b3e66203073dac24f4e2dbb4c41/"
        )
        assert by_sha256(m.sha256) is m and by_file(path) is m


@needs_data
def test_fetch_a_named_model_then_list_shows_it_downloaded(capsys, tmp_path, mirror):
    rc, out, _ = run(capsys, "model", "fetch", SMALL.name)
    dest = tmp_path / "state" / "models" / SMALL.file
    assert rc == 0 and out == f"{dest}: sha256 {SMALL.sha256} verified\n"
    assert dest.read_bytes() == (MODELS / SMALL.file).read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [SMALL.file], "no .part left behind"
    assert FileHandler.requests == [f"/{SMALL.file}"]

    rc, out, _ = run(capsys, "model", "list", "--json")
    rows = {r["name"]: r for r in map(json.loads, out.splitlines())}
    assert list(rows) == list(NAMED)
    assert rows[SMALL.name]["downloaded"] == "yes" and rows[OLD_DEFAULT.name]["downloaded"] == "no"
    assert [n for n, r in rows.items() if r["default"]] == [DEFAULT_NAME]
    assert [n for n, r in rows.items() if r["configured"]] == [DEFAULT_NAME]
    assert all(r["bytes"] == NAMED[n].size and r["sha256"] == NAMED[n].sha256 for n, r in rows.items())

    rc, out, _ = run(capsys, "model", "fetch", SMALL.name)  # already there: no second download
    assert rc == 0 and out.endswith("verified (already there)\n") and len(FileHandler.requests) == 1


@needs_data
def test_fetch_without_a_name_gets_the_configured_one(capsys, tmp_path, mirror):
    conf = tmp_path / "edgeknn.toml"
    conf.write_text(f'[model]\nname = "{SMALL.name}"\n')
    rc, out, _ = run(capsys, "model", "fetch", "--config", conf)
    assert rc == 0 and (tmp_path / "state" / "models" / SMALL.file).is_file()
    rc, out, _ = run(capsys, "model", "list", "--config", conf)
    line = next(line for line in out.splitlines() if line.startswith(SMALL.name))
    assert "downloaded: yes" in line and line.endswith("configured")


@needs_data
def test_a_bad_checksum_is_refused_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(TINY, wrong / NAMED["mobilenet_v1_0.5_160"].file)  # another model under that name
    with serve(wrong) as base:
        monkeypatch.setenv(URL_BASE_ENV, base)
        rc, out, err = run(capsys, "model", "fetch", "mobilenet_v1_0.5_160")
    assert rc == 1 and out == ""
    assert (
        "checksum mismatch" in err and NAMED["mobilenet_v1_0.5_160"].sha256 in err and sha256_of(TINY) in err
    )
    assert not (tmp_path / "state" / "models").exists() or not any((tmp_path / "state" / "models").iterdir())


@needs_data
def test_an_interrupted_download_leaves_nothing_and_the_next_one_completes(capsys, tmp_path, mirror):
    folder = tmp_path / "state" / "models"
    FileHandler.cut = {SMALL.file}
    rc, _, err = run(capsys, "model", "fetch", SMALL.name)
    assert rc == 1 and "download failed" in err and f"connection closed after {SMALL.size // 2} bytes" in err
    assert list(folder.iterdir()) == [], "neither the file nor a .part is left"
    FileHandler.cut = set()
    rc, out, _ = run(capsys, "model", "fetch", SMALL.name)
    assert rc == 0 and sha256_of(folder / SMALL.file) == SMALL.sha256


def test_an_unknown_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:  # argparse's choices: exit 2 with the known names
        main(["model", "fetch", "mobilenet_v9"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "mobilenet_v9" in err and DEFAULT_NAME in err


@needs_data
def test_config_model_name_path_and_default(tmp_path):
    base = config.replace(config.load(None), state_dir=str(tmp_path / "state"))
    assert base.named_model().name == DEFAULT_NAME
    assert base.model_path() == assets.DEFAULT_MODEL, "the default ships in the package"
    named = config.replace(base, **{"model.name": SMALL.name})
    assert named.model_path() == tmp_path / "state" / "models" / SMALL.file
    wins = config.replace(named, **{"model.path": str(EXTRACTOR)})
    assert wins.model_path() == EXTRACTOR
    conf = tmp_path / "bad.toml"
    conf.write_text('[model]\nname = "mobilenet_v9"\n')
    with pytest.raises(config.ConfigError) as info:
        config.load(conf)
    assert "model.name" in str(info.value.errors) and DEFAULT_NAME in str(info.value.errors)


def store_of(embedder: Embedder, path: Path) -> None:
    store = KnnStore(embedder.dim, embedder.identity)
    store.add("one", np.eye(embedder.dim, dtype=np.float32)[0])
    store.save(path)


@needs_data
def test_an_install_keeps_the_model_its_store_was_made_with(capsys, tmp_path):
    """An existing install (model.name unset, a store made with the old default, that model in the
    state folder) goes on with that model after the default changes, instead of being refused."""
    state = tmp_path / "state"
    (state / "models").mkdir(parents=True)
    shutil.copy(EXTRACTOR, state / "models" / OLD_DEFAULT.file)
    store_of(Embedder(EXTRACTOR), state / "store.npz")
    cfg = config.replace(config.load(None), state_dir=str(state))
    assert cfg.named_model() is OLD_DEFAULT and cfg.model_path() == state / "models" / OLD_DEFAULT.file
    rc, out, _ = run(
        capsys,
        "predict",
        "--store",
        state / "store.npz",
        PHOTOS / "cat.bmp",
    )
    assert rc == 0 and ": one (" in out, "the 1024-d store answers with its own model"
    rc, out, _ = run(capsys, "model", "list")
    line = next(line for line in out.splitlines() if line.startswith(OLD_DEFAULT.name))
    assert "downloaded: yes" in line and line.endswith(" configured"), line


@needs_data
def test_choosing_the_new_default_for_an_old_store_is_refused_in_one_line(capsys, tmp_path):
    """model.name = the new default, a store of the old one without pictures: one line, no traceback."""
    state = tmp_path / "state"
    (state / "models").mkdir(parents=True)
    shutil.copy(MODELS / NAMED[DEFAULT_NAME].file, state / "models")
    store_of(Embedder(EXTRACTOR), state / "store.npz")
    conf = tmp_path / "edgeknn.toml"
    conf.write_text(f'state_dir = "{state}"\n[model]\nname = "{DEFAULT_NAME}"\n')
    photo = PHOTOS / "cat.bmp"
    rc, _, err = run(capsys, "predict", "--config", conf, "--store", state / "store.npz", photo)
    assert rc == 1 and str(state / "store.npz") in err and OLD_DEFAULT.sha256[:12] in err


@needs_data
def test_teach_and_predict_without_model_use_the_model_their_store_was_made_with(capsys, tmp_path):
    """`predict --store S` with model.name unset: the named model S records, not the default."""
    models = tmp_path / "state" / "models"
    models.mkdir(parents=True)
    shutil.copy(TINY, models / SMALL.file)
    store = tmp_path / "tiny.npz"
    store_of(Embedder(TINY), store)
    rc, out, _ = run(capsys, "predict", "--store", store, PHOTOS / "cat.bmp", "--json")
    assert rc == 0 and json.loads(out)["label"] == "one"
    (models / SMALL.file).unlink()  # gone: the one line names that model's file, URL and sha256
    rc, _, err = run(capsys, "predict", "--store", store, PHOTOS / "cat.bmp")
    assert rc == 1 and str(models / SMALL.file) in err and SMALL.url in err and SMALL.sha256 in err

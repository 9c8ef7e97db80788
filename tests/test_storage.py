"""``store.storage = "auto"`` (the default): uint8 rows for a quantized extractor, float32 for a float
model; an existing float32 store keeps working (converted on load, saved and reloaded as uint8)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import MODEL, TINY, TM, needs_data

from edgeknn import assets, config, jpeg
from edgeknn.device.build import open_store
from edgeknn.imagefiles import find_images, load_rgb
from edgeknn.model.embedder import Embedder
from edgeknn.model.reembed import reembed
from edgeknn.store import lock as storelock
from edgeknn.store.knn import KnnStore, StoreSettings, storage_for

ID = "a" * 64


def rows(n: int, dim: int, seed: int = 0, negative: bool = False) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    v = v if negative else np.abs(v)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_the_packaged_extractor_is_uint8_and_the_default_is_auto():
    assert Embedder(MODEL).storage == "uint8"
    assert config.Config().store.storage == "auto"
    assert config.Config().store.settings("uint8").embedding == "uint8"


@needs_data(TM / "model_unquant.tflite")
def test_a_float_teachable_machine_model_keeps_float32():
    embedder = Embedder(TM / "model_unquant.tflite")
    assert embedder.storage == "float32"
    store = KnnStore(embedder.dim, embedder.identity, config.Config().store.settings(embedder.storage))
    assert store.storage == "float32"


def test_auto_follows_the_model_for_a_new_store():
    auto = StoreSettings(storage="auto")
    assert KnnStore(8, ID, dataclasses.replace(auto, embedding="uint8")).storage == "uint8"
    assert KnnStore(8, ID, auto).storage == "float32"
    assert KnnStore(8, ID, StoreSettings(storage="float32", embedding="uint8")).storage == "float32"
    assert KnnStore(8, ID, StoreSettings(embedding="uint8")).storage == "float32"  # None: as before


def test_storage_for_a_file():
    u8 = StoreSettings(storage="auto", embedding="uint8")
    f32 = StoreSettings(storage="auto")
    assert storage_for(u8, "float32", rows(3, 4)) == "uint8"
    assert storage_for(u8, "float32", rows(3, 4, negative=True)) == "float32", "negative rows stay float"
    assert storage_for(u8, "uint8", None) == "uint8"
    assert storage_for(f32, "uint8", None) == "uint8", "nothing to gain by widening"
    assert storage_for(f32, "float32", rows(3, 4)) == "float32"
    assert storage_for(StoreSettings(storage="float32", embedding="uint8"), "uint8", None) == "float32"


def test_a_float32_store_converts_on_load_saves_and_reloads_as_uint8(tmp_path):
    old = KnnStore(16, ID, StoreSettings(storage="float32"))
    for i, name in enumerate(["a", "b", "c"] * 6):
        old.add(name, rows(6, 16, seed=i), added=1000.0 + 60 * i)
    path = tmp_path / "store.npz"
    old.save(path)
    auto = StoreSettings(storage="auto", embedding="uint8")
    loaded = KnnStore.load(path, ID, auto, 16)
    assert loaded.storage == "uint8" and loaded.nbytes == old.nbytes // 4
    assert loaded.counts() == old.counts() and loaded.examples() == old.examples()
    np.testing.assert_allclose(loaded.rows(), old.rows(), atol=3e-3)
    queries = rows(40, 16, seed=99)
    assert [loaded.classify(q).label for q in queries] == [old.classify(q).label for q in queries]
    loaded.add("a", rows(6, 16, seed=50))
    loaded.save(path)
    again = KnnStore.load(path, ID, auto, 16)
    assert again.storage == "uint8" and len(again) == len(old) + 6
    np.testing.assert_array_equal(again.rows(), loaded.rows())
    as_float = KnnStore.load(path, ID, StoreSettings(storage="float32"), 16)  # an explicit setting still wins
    assert as_float.storage == "float32"
    np.testing.assert_allclose(as_float.rows(), loaded.rows(), atol=1e-6)


@needs_data(TINY)
def test_the_device_converts_an_old_float32_store_and_reembeds_for_a_float_model(tmp_path):
    """`edgeknn run`'s store: an old float32 file loads as uint8 for a quantized extractor; a model
    change re-embeds it into the new model's storage (float32 for a float model)."""
    quantized = Embedder(TINY)
    photos = [load_rgb(p, max_side=256) for p in find_images(assets.DEMO_PHOTOS)][:4]
    old = KnnStore(quantized.dim, quantized.identity, StoreSettings(storage="float32"))
    for i, image in enumerate(photos):
        old.add(f"c{i % 2}", quantized.embed_views(image), jpeg.encode(image), added=1000.0 + 60 * i)
    path = tmp_path / "store.npz"
    old.save(path)
    cfg = config.from_dict({"state_dir": str(tmp_path), "store": {"path": str(path)}})
    store = open_store(cfg, quantized, path)
    storelock.release(path)
    assert store.storage == "uint8" and store.counts() == old.counts()
    if not (TM / "model_unquant.tflite").exists():
        pytest.skip("the float Teachable Machine model is only in ../shared")
    float_model = Embedder(TM / "model_unquant.tflite")
    rebuilt = reembed(store, float_model, cfg.store.settings(float_model.storage))
    assert rebuilt.storage == "float32" and rebuilt.counts() == old.counts()

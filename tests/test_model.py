"""model.py and classifier.py on the real TFLite interpreter and the real models and photos in ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import EXTRACTOR, HEAD, LABELS, PHOTOS, TINY, V2, needs_data
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgeknn.imagefiles import load_rgb
from edgeknn.model.classifier import Classifier, read_labels
from edgeknn.model.embedder import Embedder, augmented_views
from edgeknn.model.registry import DEFAULT_MODEL_FILE
from edgeknn.model.registry import MODELS as NAMED
from edgeknn.model.tflite import (
    Model,
    ModelError,
    _input_lut,
    crop_and_resize,
    load_interpreter,
    parse_labels,
    sha256_of,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def photo(name: str) -> np.ndarray:
    return load_rgb(PHOTOS / name, max_side=1024)


def solid(h: int, w: int, colour) -> np.ndarray:
    image = np.empty((h, w, 3), np.uint8)
    image[:] = colour
    return image


@pytest.fixture(scope="module")
def v2_classifier() -> Classifier:
    return Classifier(V2)


@pytest.fixture(scope="module")
def pair_classifier() -> Classifier:
    return Classifier(EXTRACTOR, labels=LABELS, head=HEAD)


@pytest.fixture(scope="module")
def extractor() -> Embedder:
    return Embedder(EXTRACTOR)


@pytest.fixture(scope="module")
def tiny() -> Model:
    return Model(TINY)


# --- top-1 on known photos -------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(("name", "label"), [("cat.bmp", "Egyptian cat"), ("parrot.jpg", "macaw")])
def test_v2_classifier_with_labels_from_its_metadata(v2_classifier, name, label):
    assert len(v2_classifier.labels) == 1001 and v2_classifier.labels[0] == "background"
    top = v2_classifier.classify(photo(name), top=3)
    assert len(top) == 3
    assert top[0].label == label and top[0].confidence > 0.5
    assert top[0].confidence >= top[1].confidence >= top[2].confidence


@needs_data
@pytest.mark.parametrize(("name", "label"), [("cat.bmp", "Egyptian cat"), ("parrot.jpg", "macaw")])
def test_extractor_plus_head_with_a_labels_file(pair_classifier, name, label):
    assert pair_classifier.labels == read_labels(LABELS)
    top = pair_classifier.classify(photo(name), top=5)
    assert [x.label for x in top][0] == label and top[0].confidence > 0.5
    assert all(0.0 <= x.confidence <= 1.0 for x in top)


@needs_data
def test_classify_top_is_clipped_to_the_number_of_labels(pair_classifier):
    assert len(pair_classifier.classify(photo("cat.bmp"), top=5000)) == 1001


@needs_data
def test_classifier_needs_labels():
    with pytest.raises(ModelError, match=r"no labels"):
        Classifier(EXTRACTOR)


# --- labels files ----------------------------------------


def test_teachable_machine_labels_format():
    assert parse_labels("0 Class 1\n1 Class 2\n2 cup\n") == ["Class 1", "Class 2", "cup"]
    assert parse_labels("0: cat\n1: dog\n") == ["cat", "dog"]


def test_plain_labels_and_numbered_labels_that_are_not_an_index_are_kept():
    assert parse_labels("background\ntench, Tinca tinca\n\n") == ["background", "tench, Tinca tinca"]
    assert parse_labels("0\n1\n2\n") == ["0", "1", "2"]
    assert parse_labels("1 apple\n2 pear\n") == ["1 apple", "2 pear"], "not counting from 0: not an index"


@needs_data
def test_imagenet_labels_file():
    labels = read_labels(LABELS)
    assert len(labels) == 1001 and labels[0] == "background"


@needs_data
def test_labels_file_of_the_wrong_length(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("".join(f"{i} class {i}\n" for i in range(5)))
    with pytest.raises(ModelError) as info:
        Classifier(TINY, labels=path)
    assert str(path) in str(info.value) and "5 labels" in str(info.value) and "1001" in str(info.value)


@needs_data
def test_labels_without_background_get_it_prepended(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(read_labels(LABELS)[1:]))
    classifier = Classifier(TINY, labels=path)
    assert classifier.labels[0] == "background" and len(classifier.labels) == 1001


def test_missing_labels_file(tmp_path):
    with pytest.raises(ModelError, match=r"labels\.txt: labels file not found"):
        read_labels(tmp_path / "labels.txt")


@needs_data
def test_head_that_does_not_fit_the_model():
    with pytest.raises(ModelError) as info:
        Classifier(TINY, labels=LABELS, head=HEAD)
    assert str(HEAD) in str(info.value) and "1024" in str(info.value)


# --- embeddings ----------------------------------------


@needs_data
def test_extractor_embedding_is_a_unit_1024_float32_vector(extractor):
    assert not extractor.is_classifier
    assert extractor.dim == 1024
    assert extractor.identity == NAMED["mobilenet_v1_1.0_224"].sha256 == sha256_of(EXTRACTOR)
    vector = extractor.embed(photo("cat.bmp"))
    assert vector.dtype == np.float32 and vector.shape == (1024,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert (vector >= 0).all() and (vector > 0).mean() > 0.5, "ReLU6 features, mostly non-zero"


@needs_data
def test_embeddings_are_deterministic_and_tell_photos_apart(extractor):
    cat, parrot = photo("cat.bmp"), photo("parrot.jpg")
    a, b = extractor.embed(cat), extractor.embed(cat.copy())
    np.testing.assert_array_equal(a, b)
    assert float(a @ extractor.embed(parrot)) < float(a @ extractor.embed(cat[:, ::-1].copy()))


@needs_data
def test_v2_classifier_gives_its_1280_wide_penultimate():
    embedder = Embedder(V2)
    assert embedder.is_classifier
    assert embedder.dim == 1280
    assert embedder.feature.name == "MobilenetV2/Logits/AvgPool"
    vector = embedder.embed(photo("parrot.jpg"))
    assert vector.dtype == np.float32 and vector.shape == (1280,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


@needs_data
def test_tiny_classifier_gives_its_256_wide_penultimate():
    embedder = Embedder(TINY)
    assert embedder.is_classifier and embedder.dim == 256
    views = embedder.embed_views(photo("cat.bmp"))
    assert views.shape == (6, 256) and views.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(views, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(views[0], embedder.embed(photo("cat.bmp")), atol=1e-6)


# --- preprocessing ----------------------------------------


@pytest.mark.parametrize(
    ("h", "w"), [(300, 500), (500, 300), (1, 1), (3, 2), (2, 700), (2000, 3000), (128, 128), (129, 127)]
)
def test_crop_and_resize_keeps_a_solid_colour_and_the_shape(h, w):
    colour = (10, 200, 31)
    out = crop_and_resize(solid(h, w, colour), 128, 128)
    assert out.dtype == np.uint8 and out.shape == (128, 128, 3)
    assert (out == np.array(colour, np.uint8)).all()


def test_crop_and_resize_to_a_non_square_target():
    out = crop_and_resize(solid(480, 640, (1, 2, 3)), 96, 160)
    assert out.shape == (96, 160, 3) and (out == (1, 2, 3)).all()


def test_exact_size_is_returned_as_is():
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert crop_and_resize(image, 128, 128) is image


def framed(h: int, w: int) -> np.ndarray:
    """Red borders on the long sides, a blue centre square, and a green dot in the middle of it."""
    image = solid(h, w, RED)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image[top : top + side, left : left + side] = BLUE
    c = side // 10
    image[h // 2 - c : h // 2 + c, w // 2 - c : w // 2 + c] = GREEN
    return image


@pytest.mark.parametrize(("h", "w"), [(200, 400), (400, 200), (1200, 3000), (3000, 1200)])
def test_crop_and_resize_crops_the_centre(h, w):
    out = crop_and_resize(framed(h, w), 64, 64).astype(int)
    assert out.shape == (64, 64, 3)
    assert out[..., 0].max() == 0, "no red border survives the crop"
    assert tuple(out[32, 32]) == GREEN
    for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
        assert tuple(corner) == BLUE


def test_crop_and_resize_is_bilinear_between_known_values():
    image = np.zeros((2, 2, 3), np.uint8)
    image[:, 1] = 200
    out = crop_and_resize(image, 4, 4)
    row = out[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 200 and 0 < row[1] < row[2] < 200


@settings(max_examples=40, deadline=None, database=None)
@given(side=st.integers(1, 100), target=st.integers(101, 256), seed=st.integers(0, 2**16))
def test_upscaling_matches_pillows_bilinear(side, target, seed):
    image = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    ours = crop_and_resize(image, target, target).astype(int)
    pillow = np.asarray(Image.fromarray(image).resize((target, target), Image.Resampling.BILINEAR)).astype(
        int
    )
    assert np.abs(ours - pillow).max() <= 1


@settings(max_examples=60, deadline=None, database=None)
@given(
    h=st.integers(1, 700),
    w=st.integers(1, 700),
    th=st.integers(1, 160),
    tw=st.integers(1, 160),
    seed=st.integers(0, 2**16),
)
def test_crop_and_resize_shape_and_range(h, w, th, tw, seed):
    rng = np.random.default_rng(seed)
    low, high = rng.integers(0, 128), rng.integers(128, 256)
    image = rng.integers(low, high + 1, (h, w, 3), dtype=np.uint8)
    out = crop_and_resize(image, th, tw)
    assert out.dtype == np.uint8 and out.shape == (th, tw, 3)
    assert out.min() >= image.min() and out.max() <= image.max(), "interpolation never overshoots"


@needs_data
def test_model_prepare_rejects_what_is_not_rgb_uint8(tiny):
    with pytest.raises(ValueError, match="RGB uint8"):
        tiny.prepare(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        tiny.prepare(np.zeros((10, 10, 3), np.float32))
    assert tiny.prepare(solid(50, 80, BLUE)).shape == (128, 128, 3)


@needs_data
def test_input_lut_raw_pixels_when_quantization_already_maps_to_minus_one_one(tiny):
    assert _input_lut(np.uint8, 1 / 128, 128) is None
    assert _input_lut(np.uint8, 0.0, 0) is None, "unquantized uint8: raw pixels"
    assert tiny._lut is None, "the real models take raw pixels"


def test_input_lut_float32_maps_to_minus_one_one():
    lut = _input_lut(np.float32, 0.0, 0)
    assert lut.dtype == np.float32 and lut.shape == (256,)
    assert lut[0] == pytest.approx(-1.0) and lut[255] == pytest.approx(1.0)
    assert lut[128] == pytest.approx(128 / 127.5 - 1)
    assert (np.diff(lut) > 0).all()


def test_input_lut_int8_shifts_the_pixels():
    lut = _input_lut(np.int8, 1 / 128, 0)
    assert lut.dtype == np.int8 and lut.shape == (256,)
    shifted = np.arange(256) - 128
    assert np.abs(lut.astype(int) - shifted).max() <= 1
    assert lut[0] == -128 and lut[255] == 127


def test_input_lut_uint8_with_another_scale_gets_a_table():
    lut = _input_lut(np.uint8, 1 / 64, 64)  # [-1, 1] → 0..128
    assert lut is not None and lut.dtype == np.uint8
    assert lut[0] == 0 and lut[255] == 128


def test_augmented_views():
    image = framed(100, 160)
    views = augmented_views(image)
    assert len(views) == 6
    seen = views[0]
    assert seen.shape == (100, 100, 3) and (seen[..., 0] == 0).all(), "the centre square"
    np.testing.assert_array_equal(views[1], seen[:, ::-1])
    for corner in views[2:]:
        assert corner.shape == (80, 80, 3)
    np.testing.assert_array_equal(views[2], seen[:80, :80])
    np.testing.assert_array_equal(views[5], seen[20:, 20:])


def test_augmented_views_of_a_tiny_image():
    views = augmented_views(solid(1, 1, RED))
    assert len(views) == 6 and all(v.shape == (1, 1, 3) for v in views)


# --- loading ----------------------------------------


def test_missing_model_file(tmp_path):
    path = tmp_path / DEFAULT_MODEL_FILE
    with pytest.raises(ModelError) as info:
        Model(path)
    assert str(info.value).startswith(f"{path}: model file not found")


def test_not_a_tflite_file(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ModelError) as info:
        Model(path)
    assert str(info.value) == f"{path}: not a TFLite model (no TFL3 identifier)"


@needs_data
def test_truncated_tflite_file(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(TINY.read_bytes()[:50_000])
    with pytest.raises(ModelError) as info:
        Model(path)
    assert str(info.value).startswith(f"{path}: not a valid TFLite model")
    assert "\n" not in str(info.value)


@needs_data
def test_a_model_without_an_image_input():
    with pytest.raises(ModelError, match=r"expected an image input of shape \[1, H, W, 3\]"):
        Model(HEAD)


@needs_data
def test_load_interpreter_records_the_backend():
    interpreter, backend = load_interpreter(TINY.read_bytes(), str(TINY), threads=1)
    assert backend == "ai_edge_litert"
    assert list(interpreter.get_input_details()[0]["shape"]) == [1, 128, 128, 3]


@needs_data
def test_model_properties(tiny):
    assert tiny.backend == "ai_edge_litert"
    assert tiny.input_size == (128, 128)
    assert tiny.sha256 == sha256_of(TINY)
    assert tiny.input.dtype == "uint8" and tiny.input.zero_point == 128
    assert tiny.labels_from_metadata()[:2] == ["background", "tench, Tinca tinca"]


@needs_data
def test_describe_has_tensors_and_the_backend(tiny):
    info = json.loads(json.dumps(tiny.describe()))
    assert info["backend"] == "ai_edge_litert"
    assert info["path"] == str(TINY) and info["sha256"] == sha256_of(TINY)
    assert info["inputs"] == [
        {"name": "input", "shape": [1, 128, 128, 3], "dtype": "uint8", "scale": 0.0078125, "zero_point": 128}
    ]
    assert info["outputs"][0]["shape"] == [1, 1001]
    assert info["labels_in_metadata"] == 1001
    assert info["threads"] >= 1


@needs_data
def test_extractor_has_no_metadata_labels():
    assert Model(EXTRACTOR).describe()["labels_in_metadata"] == 0


@needs_data
def test_model_path_may_be_a_string():
    assert Model(str(TINY)).path == Path(TINY)


@needs_data
def test_the_inference_thread_gives_the_embedding_of_each_image_and_its_errors():
    from edgeknn.model.inference import InferenceThread

    embedder = Embedder(EXTRACTOR, threads=2)
    images = [photo("cat.bmp"), photo("parrot.jpg"), solid(120, 160, (0, 128, 255))]
    expected = [embedder.embed(image) for image in images]
    inference = InferenceThread(embedder)
    try:
        for image, vector in zip(images, expected, strict=True):
            inference.start(image)
            got, ms = inference.result()
            np.testing.assert_array_equal(got, vector)
            assert ms > 0
        inference.start(np.zeros((4, 4), np.uint8))  # not an RGB frame: the error comes from result()
        with pytest.raises(ValueError, match="RGB"):
            inference.result()
        inference.start(images[1])
        inference.wait()  # idle: the interpreter is free for this thread meanwhile
        np.testing.assert_array_equal(embedder.embed(images[0]), expected[0])
        np.testing.assert_array_equal(inference.result()[0], expected[1])
        with pytest.raises(RuntimeError):
            inference.start(images[0])
            inference.start(images[0])
    finally:
        inference.close()


@needs_data
def test_embed_views_calls_back_after_every_view():
    """The daemon pings systemd's watchdog between an added example's views: six invokes on an emulated
    or slow CPU outlasted WatchdogSec (seen under qemu), and systemd killed the daemon mid-teach."""
    embedder = Embedder(TINY)
    image = load_rgb(PHOTOS / "parrot.jpg", max_side=256)
    calls: list[int] = []
    views = embedder.embed_views(image, each=lambda: calls.append(len(calls)))
    assert len(calls) == len(views) == 6
    np.testing.assert_allclose(views, embedder.embed_views(image), rtol=1e-5, atol=1e-6)

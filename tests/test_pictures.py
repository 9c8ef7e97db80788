"""Examples keep their picture: class slots, listing and deleting examples, pictures on disk (one file
each, written once), old stores, damaged pictures, export/import, and re-embedding for another model."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, EXTRACTOR, MODELS, TINY, needs_data

from edgeknn import config
from edgeknn import jpeg as pictures
from edgeknn.cli.main import main
from edgeknn.device.build import Fatal, open_store
from edgeknn.device.saving import Saver
from edgeknn.imagefiles import find_images, load_rgb
from edgeknn.model.embedder import Embedder
from edgeknn.model.reembed import ReembedError, reembed
from edgeknn.model.tflite import Model
from edgeknn.store import file as storefile
from edgeknn.store import lock as storelock
from edgeknn.store import pictures as storepictures
from edgeknn.store.knn import KnnStore, StoreSettings

MODEL = "m" * 64
V1_HALF = MODELS / "mobilenet_v1_0.5_160_quant.tflite"


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Model-sized frames (224x224 RGB) of real sign-digit photos, as the camera hands them over."""
    model = Model(EXTRACTOR)
    paths = [find_images([DIGITS / str(d)])[i] for d in range(4) for i in range(2)]
    return [model.prepare(load_rgb(p, max_side=448)) for p in paths]


def taught(frames: list[np.ndarray], classes=("zero", "one", "two"), dim: int = 16) -> KnnStore:
    """A store with one example (random vector, real picture) per frame, classes taken in turn."""
    store = KnnStore(dim, MODEL, StoreSettings(rule="nearest"))
    rng = np.random.default_rng(0)
    for i, frame in enumerate(frames):
        store.add(classes[i % len(classes)], rng.random(dim, dtype=np.float32), pictures.encode(frame))
    return store


def picture_files(path: Path) -> dict[str, tuple[int, int]]:
    """Each picture file of the store at ``path``: (inode, mtime_ns), to tell a rewrite."""
    folder = storepictures.pictures_dir(path)
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.jpg"))}


@needs_data
def test_encode_makes_a_small_jpeg_of_the_frame(frames):
    data = pictures.encode(frames[0])
    assert data.startswith(b"\xff\xd8") and len(data) <= pictures.BUDGET
    back = pictures.decode(data)
    assert back.shape == frames[0].shape
    assert np.abs(back.astype(int) - frames[0]).mean() < 8  # the same picture, JPEG-close
    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert len(pictures.encode(noise)) <= pictures.BUDGET  # the worst case still fits (lower quality)


@needs_data
def test_add_list_and_delete_one_example_and_its_picture(tmp_path, frames):
    path = tmp_path / "store.npz"
    store = taught(frames[:3])
    store.add("two", np.ones(16, np.float32))  # an example without a picture
    listed = store.examples()
    assert [(e.id, e.class_name, e.has_picture) for e in listed] == [
        (0, "zero", True),
        (1, "one", True),
        (2, "two", True),
        (3, "two", False),
    ]
    assert all(abs(e.added - time.time()) < 60 for e in listed)
    assert [e.id for e in store.examples("two")] == [2, 3]
    store.save(path)
    assert sorted(picture_files(path)) == ["0.jpg", "1.jpg", "2.jpg"]
    assert store.delete_example(1) == "one"
    with pytest.raises(KeyError):
        store.delete_example(1)
    assert store.picture(1) is None and store.counts() == {"zero": 1, "one": 0, "two": 2}
    store.save(path)
    assert sorted(picture_files(path)) == ["0.jpg", "2.jpg"]  # its picture went with it
    loaded = KnnStore.load(path, MODEL)
    assert [e.id for e in loaded.examples()] == [0, 2, 3]
    assert loaded.picture(2) == pictures.encode(frames[2]) and loaded.picture(3) is None
    assert loaded.examples()[0].added == listed[0].added
    loaded.add("one", np.ones(16, np.float32))
    assert loaded.examples()[-1].id == 4  # ids are never reused
    with pytest.raises(ValueError, match="added"):
        loaded.add("one", np.ones(16, np.float32), added=float("inf"))  # (an import's bad time)
    with pytest.raises(ValueError, match="JPEG"):
        loaded.add("one", np.ones(16, np.float32), b"GIF89a")
    assert len(loaded.examples()) == 4  # a refused example changes nothing


@needs_data
def test_classes_are_slots_kept_in_the_store_file(tmp_path, frames):
    path = tmp_path / "store.npz"
    store = taught(frames[:3])
    assert store.add_class("fist") == 3
    with pytest.raises(ValueError, match="already exists"):
        store.add_class("fist")
    store.rename("one", "palm")
    assert store.classes == ["zero", "palm", "two", "fist"]  # renaming keeps the slot
    store.save(path)
    loaded = KnnStore.load(path, MODEL, StoreSettings(rule="nearest"))
    assert loaded.classes == ["zero", "palm", "two", "fist"]  # the class with no examples survives
    assert loaded.counts() == {"zero": 1, "palm": 1, "two": 1, "fist": 0}
    vector = loaded.rows()[2]  # the example of "two"
    assert loaded.remove_class("palm") == 1
    assert loaded.classes == ["zero", "two", "fist"]  # later slots move down
    assert loaded.classify(vector).label == "two"
    assert [(e.id, e.class_name) for e in loaded.examples()] == [(0, "zero"), (2, "two")]
    with pytest.raises(KeyError):
        loaded.remove_class("palm")
    full = KnnStore(4, MODEL, StoreSettings(max_classes=2))
    full.add_class("a")
    full.add_class("b")
    with pytest.raises(ValueError, match="max_classes"):
        full.add_class("c")


def write_format_1(path: Path, store: KnnStore) -> None:
    """The store file as edgeknn wrote it before pictures (format 1): its arrays, version and checksum."""
    arrays = {k: v for k, v in store.contents().items() if k in storefile.CONTENTS_V1}
    arrays = {"format_version": np.array(1), **arrays}
    arrays["checksum"] = np.array(storefile._checksum(arrays))
    with open(path, "wb") as f:
        storefile._write_npz(f, arrays)


@needs_data
def test_a_store_of_format_1_still_loads_and_is_saved_in_the_new_format(tmp_path, frames):
    path = tmp_path / "store.npz"
    old = KnnStore(16, MODEL, StoreSettings(rule="nearest"))
    rng = np.random.default_rng(3)
    for name in ("cup", "pen", "cup"):
        old.add(name, rng.random((2, 16), dtype=np.float32))
    old.ensure_class("empty")
    write_format_1(path, old)
    loaded = KnnStore.load(path, MODEL)
    assert loaded.classes == ["cup", "pen", "empty"] and loaded.counts() == {"cup": 2, "pen": 1, "empty": 0}
    assert [(e.id, e.class_name, e.has_picture) for e in loaded.examples()] == [
        (0, "cup", False),
        (1, "pen", False),
        (2, "cup", False),
    ]
    assert loaded.examples()[0].added == pytest.approx(path.stat().st_mtime)
    np.testing.assert_allclose(loaded.rows(), old.rows())
    loaded.add("pen", rng.random((2, 16), dtype=np.float32), pictures.encode(frames[0]))
    loaded.save(path)
    with np.load(path) as f:
        assert int(f["format_version"]) == storefile.FORMAT_VERSION
    again = KnnStore.load(path, MODEL)
    assert [e.has_picture for e in again.examples()] == [False, False, False, True]


@needs_data
def test_a_missing_or_damaged_picture_costs_only_that_picture(tmp_path, frames, caplog):
    path = tmp_path / "store.npz"
    store = taught(frames[:4])
    store.save(path)
    folder = storepictures.pictures_dir(path)
    (folder / "0.jpg").unlink()  # lost
    (folder / "1.jpg").write_bytes(b"\xff\xd8 cut short")  # truncated: the size differs
    damaged = bytearray((folder / "2.jpg").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, other bytes: the checksum tells
    (folder / "2.jpg").write_bytes(bytes(damaged))
    caplog.set_level(logging.WARNING)
    loaded = KnnStore.load(path, MODEL)
    assert len(loaded) == 4 and loaded.counts() == {"zero": 2, "one": 1, "two": 1}
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "2 of 4 pictures are missing or damaged (examples 0, 1)" in lines[0], lines
    assert [e.has_picture for e in loaded.examples()] == [False, False, True, True]
    assert loaded.picture(2) is None  # read: the checksum differs, said once
    assert loaded.picture(2) is None
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 2 and "picture of example 2" in lines[1] and "damaged" in lines[1], lines
    assert loaded.picture(3) == pictures.encode(frames[3])
    with pytest.raises(ReembedError, match="3 of 4 examples have no picture"):
        reembed(loaded, Embedder(TINY))
    loaded.save(path)  # the store no longer counts on them: their files go
    assert sorted(picture_files(path)) == ["3.jpg"]


@needs_data
def test_an_example_list_that_does_not_match_the_rows_is_a_damaged_store(tmp_path, frames):
    path = tmp_path / "store.npz"
    arrays = taught(frames[:2]).contents()
    arrays["examples"] = np.array([0, 5])
    storefile.write(path, arrays)
    with pytest.raises(storefile.StoreError, match="list of examples does not match") as info:
        KnnStore.load(path, MODEL)
    assert info.value.corrupt


@needs_data
def test_saving_after_one_more_example_writes_only_its_picture(tmp_path, frames):
    path = tmp_path / "store.npz"
    store = taught(frames[:6])
    saver = Saver(store, path, autosave_s=0.0, report=lambda event: None)
    saver.changed()
    saver.autosave()  # on the background thread, as the daemon saves
    saver.wait()
    before = picture_files(path)
    assert sorted(before) == [f"{i}.jpg" for i in range(6)]
    time.sleep(0.01)  # a rewrite would show a later mtime (and a new inode: written by rename)
    store.add("one", np.ones(16, np.float32), pictures.encode(frames[6]))
    saver.changed()
    saver.autosave()
    saver.wait()
    after = picture_files(path)
    assert sorted(after) == sorted([*before, "6.jpg"])
    assert {name: after[name] for name in before} == before  # none of the others was written again
    assert not saver.error
    store.delete_example(3)
    saver.changed()
    assert saver.save()  # (the save on request too)
    assert sorted(picture_files(path)) == ["0.jpg", "1.jpg", "2.jpg", "4.jpg", "5.jpg", "6.jpg"]
    assert KnnStore.load(path, MODEL).picture(6) == pictures.encode(frames[6])


@needs_data
def test_a_save_that_cannot_write_the_pictures_names_their_folder(tmp_path, frames):
    """A failing SD card or a wrong owner of ``store.npz.pictures``: the error says which file failed."""
    path = tmp_path / "store.npz"
    (tmp_path / "store.npz.pictures").write_text("not a folder")
    saver = Saver(taught(frames[:2]), path, autosave_s=0.0, report=lambda event: None, first_retry_s=0.0)
    saver.changed()
    assert not saver.save()
    assert "store.npz.pictures" in saver.error and "\n" not in saver.error, saver.error
    saver.autosave()  # the background write says the same
    saver.wait()
    assert saver.attempts == 2 and "store.npz.pictures" in saver.error, (saver.attempts, saver.error)
    (tmp_path / "store.npz.pictures").unlink()
    assert saver.save() and not saver.error and sorted(picture_files(path)) == ["0.jpg", "1.jpg"]


@needs_data
def test_pictures_can_be_read_from_another_thread_while_the_store_changes_and_saves(tmp_path, frames):
    path = tmp_path / "store.npz"
    store = taught(frames[:2])
    saver = Saver(store, path, autosave_s=0.0, report=lambda event: None)
    wanted = {i: pictures.encode(frames[i % len(frames)]) for i in range(60)}
    seen: list[object] = []
    done = threading.Event()

    def reader() -> None:  # as the web page does: by id, from its own thread
        while not done.is_set():
            for i in range(60):
                try:
                    data = store.picture(i)
                except Exception as e:  # noqa: BLE001 (the test's finding)
                    seen.append((i, repr(e)))
                    return
                if data is not None and data != wanted[i]:
                    seen.append((i, "wrong bytes"))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(2, 60):
            store.add("one", np.ones(16, np.float32), wanted[i])
            if i % 3 == 0:
                store.delete_example(i - 2)
            saver.changed()
            saver.autosave()
        saver.wait()
    finally:
        done.set()
        thread.join()
    assert seen == [] and not saver.error
    assert saver.flush()
    ids = [e.id for e in KnnStore.load(path, MODEL).examples()]
    assert sorted(picture_files(path)) == sorted(f"{i}.jpg" for i in ids)


@needs_data
def test_export_and_import_carry_the_pictures(tmp_path, frames, capsys):
    path, copy, export = tmp_path / "store.npz", tmp_path / "copy.npz", tmp_path / "backup.tar"
    store = taught(frames[:4])
    store.add_class("fist")  # no examples: still in the export
    store.add("two", np.ones(16, np.float32))  # no picture
    store.save(path)
    assert main(["store", "export", str(path), str(export)]) == 0
    out = capsys.readouterr().out
    assert "5 examples of 4 classes (float32 rows), 4 with their picture" in out, out
    assert main(["store", "import", str(copy), str(export)]) == 0
    assert "imported 5 examples, 4 with their picture" in capsys.readouterr().out
    back = KnnStore.load(copy, MODEL)
    assert back.classes == ["zero", "one", "two", "fist"]
    assert [(e.id, e.class_name, e.has_picture, e.added) for e in back.examples()] == [
        (e.id, e.class_name, e.has_picture, e.added) for e in store.examples()
    ], "into a new store: the same ids too"
    for mine, theirs in zip(back.examples(), store.examples(), strict=True):
        assert back.picture(mine.id) == store.picture(theirs.id)
    assert np.array_equal(back.rows(), store.rows()), "the store's own float32 rows: exact"
    assert main(["store", "import", str(copy), str(export)]) == 0
    assert "imported 0 examples, 4 with their picture, 5 already there" in capsys.readouterr().out
    assert main(["store", "import", str(copy), str(export), "--mode", "replace"]) == 0
    assert "5 removed (replace)" in capsys.readouterr().out
    assert KnnStore.load(copy, MODEL).counts() == back.counts()
    old_style = {  # an export made before the archive, and before pictures were kept: still read
        "format": "edgeknn-examples",
        "model_id": MODEL,
        "classes": store.classes,
        "examples": [
            {"class": store.classes[int(label)], "example": int(ex), "vector": row.tolist()}
            for row, label, ex in zip(store.rows(), store.labels(), store.example_ids(), strict=True)
        ],
    }
    export.write_text(json.dumps(old_style))
    assert main(["store", "import", str(tmp_path / "old.npz"), str(export)]) == 0
    assert [e.has_picture for e in KnnStore.load(tmp_path / "old.npz", MODEL).examples()] == [False] * 5


@needs_data
def test_cli_lists_and_deletes_examples(tmp_path, frames, capsys):
    path = tmp_path / "store.npz"
    taught(frames[:3]).save(path)
    assert main(["store", "examples", str(path), "--class", "one"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("1\tone\t") and lines[0].endswith("\tpicture")
    assert main(["store", "delete-example", str(path), "1"]) == 0
    assert "deleted example 1 of 'one'" in capsys.readouterr().out
    assert sorted(picture_files(path)) == ["0.jpg", "2.jpg"]
    assert main(["store", "delete-example", str(path), "1"]) == 2
    assert "no example 1" in capsys.readouterr().err
    assert main(["store", "delete-example", str(path), "x"]) == 2


Photos = list[tuple[str, Path]]  # (digit, photo file)


def digit_split(
    shots: int, tests: int, seed: int = 0
) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """Per sign digit, ``shots`` photos to teach and ``tests`` other ones to classify."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in sorted(p.name for p in DIGITS.iterdir() if p.is_dir()):
        files = find_images([DIGITS / digit])
        order = rng.permutation(len(files))
        train += [(digit, files[i]) for i in order[:shots]]
        test += [(digit, files[i]) for i in order[shots : shots + tests]]
    return train, test


def teach(store: KnnStore, embedder: Embedder, photos, keep_pictures: bool) -> None:
    """Teach as the daemon does: the camera's model-sized frame, its views, and its picture."""
    for digit, path in photos:
        frame = embedder.model.prepare(load_rgb(path, max_side=2 * max(embedder.model.input_size)))
        picture = pictures.encode(frame) if keep_pictures else None
        store.add(digit, embedder.embed_views(frame), picture)


def accuracy(store: KnnStore, vectors: list[np.ndarray], photos: Photos, closed_set: bool = False) -> float:
    """The share of ``photos`` (embedded: ``vectors``) answered right; ``closed_set``: never unknown."""
    for v in vectors:  # as evaluate.py: the store has seen the frames it classifies
        store.observe(v)
    store.threshold = -1.0 if closed_set else None
    return float(np.mean([store.classify(v).label == d for v, (d, _) in zip(vectors, photos, strict=True)]))


@needs_data
def test_a_store_reembedded_at_start_classifies_about_as_well_as_one_taught_with_that_model(tmp_path, caplog):
    """The must-show of issue 13: taught with the default extractor, started with MobileNet v1 0.5 160."""
    path = tmp_path / "store.npz"
    train, test = digit_split(shots=5, tests=40)
    extractor, half = Embedder(EXTRACTOR), Embedder(V1_HALF)
    first = KnnStore(extractor.dim, extractor.identity)
    first.add_class("spare")  # a class with no examples keeps its slot too
    teach(first, extractor, train, keep_pictures=True)
    first.save(path)

    caplog.set_level(logging.INFO)
    cfg = config.replace(config.Config(), state_dir=str(tmp_path), **{"model.path": str(V1_HALF)})
    reembedded = open_store(cfg, half, path)
    storelock.release(path)
    assert reembedded.model_id == half.identity and reembedded.dim == half.dim
    assert reembedded.classes == first.classes
    assert [(e.id, e.class_name, e.added) for e in reembedded.examples()] == [
        (e.id, e.class_name, e.added) for e in first.examples()
    ]
    lines = [r.getMessage() for r in caplog.records if "re-embedded" in r.getMessage()]
    assert len(lines) == 1 and f"re-embedded {len(train)} examples of 11 classes" in lines[0], lines
    assert storefile.model_id_of(path) == half.identity  # saved in place
    assert KnnStore.load(path, half.identity).picture(0) == first.picture(0)

    direct = KnnStore(half.dim, half.identity)
    teach(direct, half, train, keep_pictures=False)
    side = 2 * max(half.model.input_size)
    vectors = [half.embed(load_rgb(path, max_side=side)) for _, path in test]
    print(f"\nsign digits, 5 shots, {len(test)} held-out photos, {V1_HALF.name}: accuracy")
    for closed_set in (False, True):
        again, direct_accuracy = (accuracy(s, vectors, test, closed_set) for s in (reembedded, direct))
        kind = "closed set (threshold -1)" if closed_set else "default (calibrated unknown)"
        print(
            f"  {kind}: re-embedded from the extractor's pictures {again:.3f}, directly {direct_accuracy:.3f}"
        )
        assert direct_accuracy > 0.5  # the comparison means something
        assert again >= direct_accuracy - 0.1


@needs_data
def test_a_store_without_every_picture_is_refused_at_start_and_by_the_cli(tmp_path, frames, capsys):
    path = tmp_path / "store.npz"
    extractor = Embedder(EXTRACTOR)
    store = KnnStore(extractor.dim, extractor.identity)
    store.add("one", extractor.embed_views(frames[0]), pictures.encode(frames[0]))
    store.add("two", extractor.embed_views(frames[1]))  # no picture
    store.save(path)
    cfg = config.replace(config.Config(), state_dir=str(tmp_path))
    with pytest.raises(Fatal) as info:
        open_store(cfg, Embedder(TINY), path)
    message = str(info.value)
    assert "store was made with model" in message and "1 of 2 examples have no picture" in message
    assert "\n" not in message
    assert storefile.model_id_of(path) == extractor.identity  # left as it was
    assert main(["store", "reembed", str(path), "--model", str(TINY)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 of 2 examples have no picture" in err
    store.delete_example(1)
    store.save(path)
    assert main(["store", "reembed", str(path), "--model", str(TINY)]) == 0
    assert "re-embedded 1 examples of 2 classes" in capsys.readouterr().out
    tiny = KnnStore.load(path, Model(TINY).sha256)
    assert tiny.classes == ["one", "two"] and [e.id for e in tiny.examples()] == [0]
    assert os.path.exists(storepictures.picture_path(storepictures.pictures_dir(path), 0))

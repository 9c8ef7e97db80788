"""The per-frame scan (one row per example, a sketch, then a few exact scores) and the calibrated
unknown answer, on real embeddings of the sign-digit photos (the tiny model, all ten digits)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import DIGITS, EXTRACTOR, TINY, needs_data

from edgeknn.imagefiles import find_images, load_rgb
from edgeknn.model.embedder import Embedder
from edgeknn.store import scan
from edgeknn.store.knn import KnnStore, StoreSettings, threshold_calibration
from edgeknn.store.names import UNKNOWN

# Every test here embeds the sign digits with the tiny model: the larger sets.
pytestmark = needs_data

TAUGHT, ASKED = 8, 10  # photos per digit: taught (as the six views an example stores), then asked


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per digit: the views of TAUGHT photos (TAUGHT, 6, dim) and ASKED other photos (ASKED, dim)."""
    embedder = Embedder(TINY)
    out = {}
    for name in (str(d) for d in range(10)):
        files = [p for p in find_images(DIGITS / name) if p.stat().st_size < 100_000][: TAUGHT + ASKED]
        images = [load_rgb(p, max_side=256) for p in files]
        views = np.stack([embedder.embed_views(im) for im in images[:TAUGHT]])
        out[name] = (views, np.stack([embedder.embed(im) for im in images[TAUGHT:]]))
    return out


def taught(digits, names, storage="float32", threshold=None, **kw) -> KnnStore:
    store = KnnStore(256, "a" * 64, StoreSettings(storage=storage, threshold=threshold, **kw))
    for name in names:
        for views in digits[name][0]:  # each at a moment of its own (a minute apart)
            store.add(name, views, added=60.0 * len(store.examples()))
    for name in digits:  # the device observes every frame it sees
        for v in digits[name][1]:
            store.observe(v)
    return store


def asked(digits, names) -> np.ndarray:
    return np.concatenate([digits[name][1] for name in names])


def full_scan(store: KnnStore, queries: np.ndarray) -> np.ndarray:
    """The mean similarity of the k nearest examples by brute force: every example's first row (its
    frame), square-rooted, unit, centred on the fitted head's centre, unit; the query likewise."""
    store.fit()
    center = store._head.fitted.center

    def space(x):
        s = np.sqrt(np.maximum(x, 0))
        s /= np.linalg.norm(s, axis=-1, keepdims=True)
        s -= center
        return s / np.linalg.norm(s, axis=-1, keepdims=True)

    first = np.unique(store.example_ids(), return_index=True)[1]
    sims = space(queries) @ space(store.rows()[first]).T
    return -np.sort(-sims, axis=1)[:, : store.k].mean(axis=1)


@pytest.mark.parametrize("storage", ["float32", "uint8"])
def test_the_fast_path_answers_as_the_full_scan(digits, monkeypatch, storage):
    """Few candidates and a small sketch, so the coarse step really decides: the nearest
    similarity and the answer (unknown or not) agree with a brute-force scan on >= 99 %."""
    monkeypatch.setattr(scan, "_CANDIDATES", 12)
    monkeypatch.setattr(scan, "_RANK", 32)
    store = taught(digits, list(digits), storage)
    queries = asked(digits, list(digits))
    answers = [store.classify(q) for q in queries]
    assert len(store._index) == 10 * TAUGHT > scan._CANDIDATES
    exact = full_scan(store, queries)
    threshold = store.effective_threshold
    same_similarity = np.isclose([p.similarity for p in answers], exact, atol=1e-4)
    same_decision = [(p.label == UNKNOWN) == bool(e < threshold) for p, e in zip(answers, exact, strict=True)]
    assert same_similarity.mean() >= 0.99 and np.mean(same_decision) >= 0.99
    for p in answers:
        assert p.similarity == pytest.approx(np.mean([s for _, s in p.neighbours]), abs=1e-6)
        assert [s for _, s in p.neighbours] == sorted((s for _, s in p.neighbours), reverse=True)


def test_the_index_follows_removed_and_replaced_examples(digits, monkeypatch):
    """A full class (each new example takes its oldest's rows), a forgotten class and a deleted
    example: the scan still finds what a brute-force scan of the remaining examples finds."""
    monkeypatch.setattr(scan, "_CANDIDATES", 12)
    store = taught(digits, list(digits), capacity=TAUGHT)
    queries = asked(digits, list(digits))
    store.classify(queries[0])  # index everything first
    for views in digits["3"][0][:3]:  # class "3" is full: these replace its three oldest in place
        store.add("3", views[::-1])
    store.forget("5")
    store.delete_example(int(store.example_ids()[0]))
    sims = np.array([store.classify(q).similarity for q in queries])
    np.testing.assert_allclose(sims, full_scan(store, queries), atol=1e-4)


def test_a_calibrated_store_says_unknown_for_untaught_digits(digits):
    """Half the digits taught: the calibrated threshold answers unknown for the untaught ones far
    more often than threshold 0 does, and more often than for the taught ones."""
    store = taught(digits, ["0", "1", "2", "3", "4"])
    untaught, known = asked(digits, ["5", "6", "7", "8", "9"]), asked(digits, ["0", "1", "2", "3", "4"])

    def unknown_share(queries) -> float:
        return float(np.mean([store.classify(q).label == UNKNOWN for q in queries]))

    auto = unknown_share(untaught), unknown_share(known)
    assert store.threshold is None and store.effective_threshold > 0.0
    store.threshold = 0.0
    zero = unknown_share(untaught)
    assert auto[0] > zero and auto[0] > auto[1]


def test_the_threshold_follows_the_store_and_a_number_overrides_it(digits):
    store = taught(digits, ["0"])
    one = store.effective_threshold
    assert threshold_calibration(store) == "own class", "one class: calibrated from its own examples"
    for views in digits["1"][0]:
        store.add("1", views, added=60.0 * len(store.examples()))
    two = store.effective_threshold
    assert two != one, "recalibrated after a change"
    store.delete_example(int(store.example_ids()[0]))  # one of "0"
    assert store.effective_threshold != two, "recalibrated after a change"
    store.threshold = 0.75
    assert store.effective_threshold == 0.75
    assert store.classify(asked(digits, ["0"])[0]).similarity < 0.75
    assert store.classify(asked(digits, ["0"])[0]).label == UNKNOWN


def test_one_class_of_one_example_is_never_calibrated(digits):
    """Nothing to measure how close a photo of the class comes: 0, and the fallbacks say why."""
    store = KnnStore(256, "a" * 64, StoreSettings())
    store.add("0", digits["0"][0][0])
    assert store.effective_threshold == 0.0 and threshold_calibration(store) == "none"
    store.add("1", digits["1"][0][0])
    assert store.effective_threshold >= 0.0 and threshold_calibration(store) == "near misses"
    store.threshold = 0.5
    assert threshold_calibration(store) == "set"


def test_one_held_button_is_one_moment(digits):
    """The frames of one held button are near copies: measured against each other they would make
    the threshold far too strict for every other photo of the class (a device taught 3 classes by
    hold-to-record then answered them all unrecognized). Examples less than _MOMENT_S apart are one
    moment, and an example is only measured against its class's other moments."""
    store = KnnStore(256, "a" * 64, StoreSettings())
    for i, views in enumerate(digits["3"][0]):
        store.add("3", views, added=100.0 + 0.2 * i)  # one burst, a frame every 200 ms
    assert store.effective_threshold == 0.0 and threshold_calibration(store) == "none"
    for i, views in enumerate(digits["3"][0][:3]):
        store.add("3", views[::-1], added=100.0 + scan._MOMENT_S + 1.6 + 0.2 * i)  # a second go
    assert threshold_calibration(store) == "own class"
    labels, added = np.array([0, 0, 0, 1, 1, 0]), np.array([0.0, 1.0, 9.0, 1.0, 30.0, 10.0])
    assert scan.moments(labels, added).tolist() == [1, 1, 2, 3, 4, 2]


def watched(digits, names, frames: int, threshold=None) -> KnnStore:
    """A store that has seen ``frames`` frames of the room (the taught photos of every digit, in a
    shuffled order, cycled: never a photo it is asked about), then was taught ``names`` (TAUGHT
    examples each, each frame seen as it was added): a fast machine sees many frames, a slow one few."""
    store = KnnStore(256, "a" * 64, StoreSettings(threshold=threshold))
    room = np.concatenate([digits[name][0][:, 0] for name in digits])
    order = np.random.default_rng(0).permutation(len(room))
    for i in range(frames):
        store.observe(room[order[i % len(room)]])
    for name in names:
        for views in digits[name][0]:
            store.observe(views[0])
            store.add(name, views, added=60.0 * len(store.examples()))  # each a moment of its own
    return store


def test_one_taught_class_answers_unrecognized_for_the_others(digits):
    """Issue 22: with one class taught the threshold stayed 0 (no other class to calibrate
    against) and no other digit was ever unrecognized. Calibrated from the class's own examples,
    a good share is, whether the device saw the room for 80 frames or 900, and as much either
    way; most photos of the taught digit are still answered with it."""
    others = [d for d in digits if d != "3"]
    shares = []
    for frames in (80, 900):
        store = watched(digits, ["3"], frames)
        assert store.effective_threshold > 0.0 and threshold_calibration(store) == "own class"
        shares.append(np.mean([store.classify(q).label == UNKNOWN for q in asked(digits, others)]))
        right = np.mean([store.classify(q).label == "3" for q in asked(digits, ["3"])])
        assert shares[-1] >= 0.2 and right >= 0.8, (frames, shares[-1], right)
    assert abs(shares[0] - shares[1]) <= 0.15, shares


def test_the_unknown_answer_does_not_hang_on_how_many_frames_went_by(digits):
    """Issue 22, finding 5: the old threshold (near misses between classes) moved with the centre,
    the running mean of the frames seen, and so with how many frames a machine got through. Now,
    digits 0-4 taught after 80 or after 900 frames of the room: the same threshold within 0.05,
    above threshold 0, and the untaught digits unrecognized at least as often as with 0."""
    names, others = ["0", "1", "2", "3", "4"], ["5", "6", "7", "8", "9"]
    thresholds = []
    for frames in (80, 900):
        auto, zero = watched(digits, names, frames), watched(digits, names, frames, threshold=0.0)
        thresholds.append(auto.effective_threshold)
        share = [
            np.mean([s.classify(q).label == UNKNOWN for q in asked(digits, others)]) for s in (auto, zero)
        ]
        assert thresholds[-1] > 0.0 and share[0] >= share[1], (frames, thresholds[-1], share)
    assert abs(thresholds[0] - thresholds[1]) <= 0.05, thresholds


def test_a_taught_device_answers_unrecognized_for_untaught_digits(tmp_path):
    """The daemon on replayed photos, digits 0-4 taught (threshold: auto, the default): the photos
    of digits 7-9, shown for as many frames as they are photos, are answered unrecognized at least
    as often as with threshold 0, and the threshold is calibrated from the taught examples.
    Every 8th photo of each digit: consecutive ones come from one sitting (one hand, one light).

    Each digit is taught in two goes (4 examples each) more than _MOMENT_S apart: the threshold
    measures each example against its digit's other moment.

    Not hanging on the machine's speed (issue 22: it failed in CI under load): the device watches
    its room (other photos of every digit, none of those taught or shown later) from the start
    until at least 60 frames went by, so that however many frames a machine gets through, the
    centre is the room's with the taught frames in it, and the threshold comes from the
    examples' own similarities in that space (not near misses, which were 0 in some runs)."""
    from rig import Running, Scene, make_config, wait_for

    from edgeknn.commands import AddExample, Result, SetThreshold
    from edgeknn.device.build import build

    taught = [str(d) for d in range(5)]
    folders = {"room": tmp_path / "photos" / "room"}  # first: what the scene shows from the start
    folders["room"].mkdir(parents=True)
    for d in range(10):
        for photo in sorted(find_images(DIGITS / str(d)))[4::16]:
            (folders["room"] / f"{d}-{photo.name}").symlink_to(photo)
    for name, digits in [(d, [d]) for d in taught] + [("untaught", ["7", "8", "9"])]:
        folders[name] = tmp_path / "photos" / name
        folders[name].mkdir(parents=True)
        for d in digits:
            for photo in sorted(find_images(DIGITS / d))[::8]:
                (folders[name] / f"{d}-{photo.name}").symlink_to(photo)
    scene = Scene(folders)
    # On the extractor, as this was measured (the rig's device model is the packaged default since issue 21).
    overrides = {"classes": taught, "store.rule": "default", "panel.kind": "none"}
    overrides["model.path"] = str(EXTRACTOR)
    cfg = make_config(tmp_path, **overrides)
    assert cfg.store.threshold == "auto"
    run = Running(build(cfg, opener=scene.opener))
    try:
        assert run.classified(60, timeout=120), "the room: no frames"
        results: list[Result] = []
        started = time.monotonic()
        for go in range(2):  # each digit in two goes, as a person teaches from two moments
            if go:
                time.sleep(max(0.0, started + scan._MOMENT_S + 1.0 - time.monotonic()))
            for name in taught:
                scene.shown = name
                assert run.classified()
                asked = len(results) + 1
                run.daemon.submit(AddExample(class_name=name, count=4, source="test", reply=results.append))
                assert wait_for(lambda n=asked: len(results) >= n, 120), f"teaching {name}: no result"
                assert results[-1].ok, results[-1]

        def unrecognized_share() -> float:
            """This frame's own answer (the candidate while the stable label settles)."""
            scene.shown = "untaught"
            assert run.classified(3)  # past the frames in flight
            start, frames = run.recorder.frames, len(list(folders["untaught"].iterdir()))
            assert run.classified(frames, timeout=60)
            shown = run.recorder.readings[start : start + frames]
            return sum((r.candidate or r.label) == UNKNOWN for r in shown) / len(shown)

        auto = unrecognized_share()
        assert run.daemon.store.effective_threshold > 0.0
        assert run.daemon.state()["threshold_calibration"] in ("own class", "near misses")
        replies: list[Result] = []
        run.daemon.submit(SetThreshold(value=0.0, reply=replies.append))
        assert wait_for(lambda: replies) and replies[0].ok
        zero = unrecognized_share()
        assert auto >= zero and auto > 0.0, (auto, zero)
    finally:
        run.stop()

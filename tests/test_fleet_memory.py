"""A follower's memory while it loads a pack (issue 25: at most 60 MB more on a Pi Zero 2 W): the chunks go
to a file, the archive streams into a store built beside the live one, the pictures into a staging
folder. Measured with tracemalloc (numpy's arrays and Python's bytes are traced), never with a clock: the
pack's pictures are large, so holding them (or the pack) in memory shows at once. A real follower daemon,
a real Mosquitto; the pack is published as a leader publishes it (chunks first, then the manifest).
"""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import paho.mqtt.client as mqtt
from PIL import Image
from rig import CLASSES, Running, Scene, needs_mosquitto, photo_folders, wait_for
from test_fleet import fleet_config, publish, raw_client

from edgeknn.device.build import build
from edgeknn.fleet import pack
from edgeknn.store import exchange
from edgeknn.store.knn import KnnStore, StoreSettings

EXAMPLES = 120
PICTURES = 4  # distinct noisy JPEGs (~400 KB each), shared out over the examples


def noisy_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (420, 420, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def a_big_pack(model_id: str, dim: int, seed: int, damaged: bool = False) -> tuple[bytes, list[bytes]]:
    """An archive of EXAMPLES examples (6 float16 views each, a large JPEG each) as a leader exports it;
    ``damaged``: the last example's rows are not finite (found only at the end of the stream)."""
    store = KnnStore(dim, model_id, StoreSettings(capacity=EXAMPLES))
    pictures = [noisy_jpeg(seed * 10 + i) for i in range(PICTURES)]
    rng = np.random.default_rng(seed)
    for i in range(EXAMPLES):
        rows = np.abs(rng.standard_normal((6, dim), dtype=np.float32))
        store.add(CLASSES[i % len(CLASSES)], rows, pictures[i % PICTURES])
    out = io.BytesIO()
    exchange.export_store(store, out, "float16")
    data = bytearray(out.getvalue())
    if damaged:  # the last example's first value becomes NaN (its .rows member's data follows its header)
        at = data.rfind(f"examples/{EXAMPLES - 1}.rows".encode())
        data[at + 512 : at + 514] = np.array([np.nan], "<f2").tobytes()
    return bytes(data), pictures


def publish_pack(client: mqtt.Client, data: bytes, classes: list[str]) -> pack.Manifest:
    """Every chunk (retained), as the leader does; the manifest is left to the caller."""
    manifest = pack.make("kitchen", io.BytesIO(data), "-", classes, EXAMPLES)
    for index, chunk in pack.chunks_of(io.BytesIO(data), manifest):
        publish(client, f"edgeknn/kitchen/fleet/pack/{manifest.version}/{index}", chunk)
    return manifest


@needs_mosquitto
def test_a_follower_never_holds_the_pack_or_its_pictures_in_memory_and_refuses_a_bad_one_whole(
    tmp_path, broker
):
    photos = photo_folders(tmp_path)
    cfg = fleet_config(tmp_path, broker, "hall", follow="kitchen")
    follower = Running(build(cfg, opener=Scene(photos).opener))
    store = follower.daemon.store
    staging = lambda: sorted((tmp_path / "hall").glob("incoming-*"))  # noqa: E731
    raw = raw_client(broker.port)
    try:
        assert wait_for(lambda: follower.recorder.readings, 60), "the follower classifies no frame"
        data, pictures = a_big_pack(store.model_id, store.dim, seed=1)
        manifest = publish_pack(raw, data, CLASSES)
        picture_bytes = EXAMPLES * np.mean([len(p) for p in pictures])
        rows_bytes = EXAMPLES * 6 * store.dim * 4  # what the loaded store itself holds (float32)
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            publish(raw, "edgeknn/kitchen/fleet/manifest", manifest.to_json())
            assert wait_for(lambda: sum(store.counts().values()) == EXAMPLES, 120), store.counts()
            assert wait_for(lambda: not staging() and not follower.daemon.saver.dirty, 60), staging()
            peak = tracemalloc.get_traced_memory()[1] - start
        finally:
            tracemalloc.stop()
        sizes = f"pack {len(data) / 1e6:.1f} MB, rows {rows_bytes / 1e6:.1f} MB"
        print(f"traced peak {peak / 1e6:.1f} MB; {sizes}")

        # The store's new rows, the head's fit on a copy of them, a few MB besides (a chunk, a picture, the
        # frames): never the pack's ~EXAMPLES x 400 KB of pictures (the old follower peaked above them).
        assert peak < 2 * rows_bytes + picture_bytes / 3, (
            f"peak {peak / 1e6:.1f} MB while loading a pack of {len(data) / 1e6:.1f} MB "
            f"({picture_bytes / 1e6:.1f} MB of pictures, {rows_bytes / 1e6:.1f} MB of rows once stored)"
        )
        assert follower.daemon.state()["fleet"]["pack"] == manifest.version
        ids = [e.id for e in store.examples()]
        assert ids == list(range(EXAMPLES))  # the leader's ids
        assert [store.picture(i) for i in ids[:PICTURES]] == pictures  # copied from staging to the store
        assert (cfg.store_path().parent / f"{cfg.store_path().name}.pictures" / "0.jpg").read_bytes() == (
            pictures[0]
        )
        frames = len(follower.recorder.readings)
        # a pack damaged at its very end (every chunk as its manifest says): refused whole, nothing kept
        bad, _ = a_big_pack(store.model_id, store.dim, seed=2, damaged=True)
        manifest = publish_pack(raw, bad, CLASSES)
        publish(raw, "edgeknn/kitchen/fleet/manifest", manifest.to_json())
        assert wait_for(lambda: "not finite" in follower.daemon.state()["fleet"]["error"], 120)
        assert store.counts() == {name: EXAMPLES // 3 for name in CLASSES}
        assert store.picture(0) == pictures[0] and [e.id for e in store.examples()] == ids
        assert wait_for(lambda: not staging(), 30), staging()  # the half-built store's pictures went
        assert wait_for(lambda: len(follower.recorder.readings) > frames + 5, 60)  # still classifying
    finally:
        raw.loop_stop()
        follower.stop()


def small_archive(model_id: str, seed: int, examples: int) -> tuple[bytes, list[bytes]]:
    store = KnnStore(8, model_id, StoreSettings(capacity=50))
    pictures = [noisy_jpeg(seed * 100 + i)[:3000] + b"\xff\xd9" for i in range(examples)]
    rng = np.random.default_rng(seed)
    for i in range(examples):
        store.add(CLASSES[i % 2], np.abs(rng.standard_normal((6, 8), dtype=np.float32)), pictures[i])
    out = io.BytesIO()
    exchange.export_store(store, out, "float16")
    return out.getvalue(), pictures


def test_a_swap_leaves_an_export_in_flight_what_it_reads_and_a_save_takes_the_staged_pictures(tmp_path):
    from edgeknn.store import knn, staged

    live = KnnStore(8, "m" * 64, StoreSettings(capacity=50))
    old, _ = small_archive("m" * 64, 1, 3)
    exchange.apply(live, exchange.read_import(io.BytesIO(old)), "replace")
    live.save(tmp_path / "store.npz")
    before = io.BytesIO()
    exchange.export_store(live, before)
    lent = knn.lend(live)  # a download of the examples, under way
    lent_rows = lent.rows["rows"].copy()
    staging = lambda: sorted(tmp_path.glob("incoming-*"))  # noqa: E731
    for seed in (2, 3):  # two packs in a row, the first never saved: its staging folder goes all the same
        new, pictures = small_archive("m" * 64, seed, 5)
        built = staged.build(io.BytesIO(new), "m" * 64, 8, StoreSettings(capacity=50), tmp_path)
        exchange.apply(live, built, "replace")
        del built
        assert live.counts() == {"1": 3, "2": 2} and live.picture(4) == pictures[4]  # read from staging
    assert wait_for(lambda: len(staging()) == 1, 10), staging()
    assert np.array_equal(lent.rows["rows"], lent_rows)  # the export still reads the old rows, unchanged
    out = io.BytesIO()
    exchange.write_lent(out, lent)
    knn.give_back(live, lent)
    assert out.getvalue() == before.getvalue()  # the old examples, pictures and all
    live.save(tmp_path / "store.npz")
    assert wait_for(lambda: not staging(), 10), staging()  # copied beside the store file, then gone
    again = KnnStore.load(tmp_path / "store.npz", "m" * 64)
    assert [again.picture(i) for i in range(5)] == pictures
    assert sorted(p.name for p in (tmp_path / "store.npz.pictures").iterdir()) == [
        f"{i}.jpg" for i in range(5)
    ]

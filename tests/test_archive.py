"""The examples archive (store/archive.py) and importing it (store/exchange.py): an exact round trip, one
stream with bounded memory, every damage refused with one line, and imports that say what they do.

Stores are random unit rows with real photos as their pictures (encoded as the daemon encodes a frame).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS

from edgeknn import jpeg
from edgeknn.imagefiles import find_images, load_rgb
from edgeknn.store import archive, exchange
from edgeknn.store.archive import ArchiveError
from edgeknn.store.knn import KnnStore, StoreSettings, give_back, lend

MODEL = "a" * 64
DIM = 32


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Eight JPEGs of real sign-digit photos, as the daemon keeps an example's picture."""
    paths = [find_images([DIGITS / d])[i] for d in ("1", "2", "5") for i in range(3)][:8]  # the demo's too
    return [jpeg.encode(load_rgb(p, max_side=96)) for p in paths]


def make_store(photos: list[bytes], n: int = 12, storage: str = "float32", views: int = 6, **kw) -> KnnStore:
    store = KnnStore(DIM, MODEL, StoreSettings(storage=storage, **kw))
    for name in ("a", "b", "c"):
        store.add_class(name)
    rng = np.random.default_rng(1)
    for i in range(n):
        rows = np.abs(rng.standard_normal((views, DIM), dtype=np.float32))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        store.add("abc"[i % 3], rows, photos[i % len(photos)] if i % 4 else None, added=1.7e9 + i)
    return store


def archive_of(store: KnnStore, dtype: str | None = None) -> bytes:
    out = io.BytesIO()
    exchange.export_store(store, out, dtype)
    return out.getvalue()


def bundle_of(data: bytes, tmp_path: Path, **kw) -> exchange.Bundle:
    path = tmp_path / "in.tar"
    path.write_bytes(data)
    return exchange.read_import(path, **kw)


def same_examples(a: KnnStore, b: KnnStore, exact: bool = True) -> None:
    assert a.classes == b.classes and a.counts() == b.counts()
    assert [(e.id, e.class_name, e.added, e.has_picture) for e in a.examples()] == [
        (e.id, e.class_name, e.added, e.has_picture) for e in b.examples()
    ]
    assert np.array_equal(a.example_ids(), b.example_ids())
    if exact:
        assert np.array_equal(a.rows(), b.rows()), "rows restored bit for bit"
    else:
        assert np.allclose(a.rows(), b.rows(), atol=1e-3)
    for e in a.examples():
        assert a.picture(e.id) == b.picture(e.id), "pictures byte-identical"


@pytest.mark.parametrize("storage,dtype,exact", [("float32", None, True), ("uint8", None, True),
                                                 ("float32", "float16", False)])  # fmt: skip
def test_a_round_trip_into_an_empty_store_restores_it(photos, tmp_path, storage, dtype, exact):
    store = make_store(photos, storage=storage)
    data = archive_of(store, dtype)
    fresh = KnnStore(DIM, MODEL, StoreSettings(storage=storage))
    detail = exchange.apply(fresh, bundle_of(data, tmp_path, dim=DIM), "replace")
    assert detail["added"] == 12 and detail["removed"] == 0
    same_examples(store, fresh, exact)
    assert archive_of(store, dtype) == data, "the same examples make the same bytes"
    assert len(data) == archive.size(exchange.manifest_of(lend(store), dtype)), "its size known first"


def test_the_archive_is_a_plain_tar_in_order_with_compact_rows(photos):
    store = make_store(photos, storage="uint8")
    data = archive_of(store)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        rows = tar.getmember("examples/1.rows")
    assert names[0] == "manifest.json"
    first = [n for n in names if n.startswith("examples/0.") or n.startswith("examples/1.")]
    assert first == ["examples/0.rows", "examples/1.rows", "examples/1.jpg"], "example 0 has no picture"
    assert manifest["format"] == "edgeknn-archive" and manifest["dtype"] == "uint8"
    assert manifest["classes"] == ["a", "b", "c"] and len(manifest["examples"]) == 12
    assert rows.size == 6 * (DIM + 4), "uint8 rows and a float32 scale per row: no JSON numbers"


def test_writing_streams_and_a_change_meanwhile_leaves_the_lent_rows_alone(photos):
    """An export reads the store's rows without a copy, on another thread; the loop may delete and add
    meanwhile (a delete compacts the rows in place: it copies them first)."""
    store = make_store(photos)
    before = archive_of(store)
    lent = lend(store)
    store.delete_example(0)  # rewrites the stored rows in place
    store.add("a", np.eye(6, DIM, dtype=np.float32), added=1.8e9)
    chunks: list[bytes] = []

    class Sink(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[override]
            chunks.append(bytes(b))
            return len(b)

    exchange.write_lent(Sink(), lent)
    give_back(store, lent)
    assert b"".join(chunks) == before, "the export is of the store as lent"
    assert max(map(len, chunks)) <= 64 * 1024, "written in pieces, not as one buffer"


def damaged(data: bytes, edit) -> bytes:
    """The archive rebuilt with ``edit(members)`` applied: a list of [name, bytes] in order."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            members.append([info.name, tar.extractfile(info).read()])  # type: ignore[union-attr]
    edit(members)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def with_manifest(change):
    def edit(members):
        manifest = json.loads(members[0][1])
        change(manifest)
        members[0][1] = json.dumps(manifest).encode()

    return edit


def _set_example(key, value, index=1):
    return with_manifest(lambda m: m["examples"][index].__setitem__(key, value))


DAMAGES = {
    "time out of range": (_set_example("added", 1e300), "example 1: added"),
    "time not a number": (_set_example("added", "soon"), "example 1: added"),
    "class name breaking the rule": (
        with_manifest(lambda m: m["classes"].__setitem__(0, "a/#")),
        "class 'a/#'",
    ),
    "reserved class name": (
        with_manifest(lambda m: m["classes"].__setitem__(0, "unknown")),
        "class 'unknown'",
    ),
    "id not an integer": (_set_example("id", 1.5), "example id"),
    "id listed twice": (_set_example("id", 0), "example 0: listed twice"),
    "an unknown member": (lambda m: m.insert(2, ["examples/evil.sh", b"#!"]), "'examples/evil.sh'"),
    "members out of order": (lambda m: m.insert(1, m.pop(2)), "unexpected member"),
    "a member after the last example": (lambda m: m.append(["extra", b"x"]), "'extra'"),
    "rows cut short": (lambda m: m[1].__setitem__(1, m[1][1][:-4]), "examples/0.rows"),
    "rows not finite": (
        lambda m: m[1].__setitem__(1, np.full(6 * DIM, np.nan, "<f4").tobytes()),
        "not finite",
    ),
    "picture not a JPEG": (lambda m: m[3].__setitem__(1, b"GIF89a" + m[3][1][6:]), "examples/1.jpg"),
    "archive cut short": (lambda m: m.pop(), "cut short"),
    "no manifest": (lambda m: m.pop(0), "unexpected member"),
    "another format": (with_manifest(lambda m: m.__setitem__("format", "zip")), "not an edgeknn archive"),
    "views over the cap": (_set_example("views", 10_000), "views"),
    "picture larger than allowed": (_set_example("picture", {"size": 1 << 30, "crc32": 0}), "picture"),
}


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_archive_is_refused_with_one_line_naming_the_culprit(photos, tmp_path, kind):
    edit, culprit = DAMAGES[kind]
    data = damaged(archive_of(make_store(photos)), edit)
    with pytest.raises(ArchiveError) as refused:
        bundle_of(data, tmp_path, dim=DIM)
    assert culprit in str(refused.value) and "\n" not in str(refused.value)


def test_links_pax_headers_and_other_rows_are_refused_before_their_data_is_read(photos, tmp_path):
    good = archive_of(make_store(photos))
    for kind in (
        tarfile.SYMTYPE,
        tarfile.DIRTYPE,
        tarfile.XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.FIFOTYPE,
    ):
        out = io.BytesIO()
        info = tarfile.TarInfo("manifest.json")
        info.type, info.size = kind, 0
        out.write(info.tobuf(tarfile.USTAR_FORMAT) if kind != tarfile.XHDTYPE else _pax_bomb())
        with pytest.raises(ArchiveError, match="not a plain file"):
            bundle_of(out.getvalue() + good, tmp_path)
    with pytest.raises(ArchiveError, match="rows of 32 values, this device's model makes 64"):
        bundle_of(good, tmp_path, dim=64)
    with pytest.raises(ArchiveError, match="not a tar stream"):
        bundle_of(b"\x00\x01 not an archive" * 100, tmp_path)
    with pytest.raises(ArchiveError, match="at most 5 examples"):
        bundle_of(good, tmp_path, max_examples=5)
    with pytest.raises(ArchiveError, match="larger than 1000 bytes"):
        archive.Reader(io.BytesIO(good), max_bytes=1000)


def _pax_bomb() -> bytes:
    """A pax header claiming 1 GB: tarfile would read all of it into memory before any check of ours."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 1 << 30
    return info.tobuf(tarfile.USTAR_FORMAT)


# --- what an import does ------------------------------------------------------------------------


def test_adding_a_devices_own_download_back_adds_nothing(photos, tmp_path):
    """Finding 10: uploading the page's download back doubled every class (7/6/5 -> 14/12/10)."""
    store = make_store(photos)
    before = store.counts()
    detail = exchange.apply(store, bundle_of(archive_of(store), tmp_path), "add")
    assert detail["added"] == 0 and detail["skipped"] == 12
    assert store.counts() == before


def test_an_import_into_full_classes_is_refused_and_says_what_would_go(photos, tmp_path):
    """Finding 9: an upload into full classes answered ok and silently evicted the device's examples."""
    store = make_store(photos, n=6, capacity=2)
    data = archive_of(make_store(photos, n=6, capacity=2, views=6))
    later = with_manifest(lambda m: [e.__setitem__("added", e["added"] + 5) for e in m["examples"]])
    shifted = damaged(data, later)  # other examples than the device's (other times)
    before = [(e.id, e.added) for e in store.examples()]
    with pytest.raises(ValueError, match=r"class 'a' would have 4 examples, more than store.capacity \(2\): "
                       r"2 of the device's examples would go"):  # fmt: skip
        exchange.apply(store, bundle_of(shifted, tmp_path), "add")
    assert [(e.id, e.added) for e in store.examples()] == before, "nothing changed, nothing evicted"
    detail = exchange.apply(store, bundle_of(shifted, tmp_path), "replace")
    assert detail == {
        "mode": "replace",
        "added": 6,
        "skipped": 0,
        "removed": 6,
        "classes": {"a": 2, "b": 2, "c": 2},
    }


def test_replace_makes_the_archives_classes_and_keeps_ids_only_when_free(photos, tmp_path):
    store = KnnStore(DIM, MODEL, StoreSettings())
    for name in ("x", "y"):
        store.add_class(name)
    store.add("x", np.eye(6, DIM, dtype=np.float32))
    data = archive_of(make_store(photos))
    exchange.apply(store, bundle_of(data, tmp_path), "replace")
    assert store.classes == ["a", "b", "c"] and sum(store.counts().values()) == 12
    assert [e.id for e in store.examples()] == list(range(1, 13)), "id 0 was this device's: new ids"
    store.reset()  # no examples, but ids 0..12 were used: replace gives new ones, never one used before
    exchange.apply(store, bundle_of(data, tmp_path), "replace")
    assert [e.id for e in store.examples()] == list(range(13, 25))


def test_an_import_for_another_model_or_too_many_classes_changes_nothing(photos, tmp_path):
    store = KnnStore(DIM, "b" * 64, StoreSettings(max_classes=2))
    with pytest.raises(ValueError, match="another model"):
        exchange.apply(store, bundle_of(archive_of(make_store(photos)), tmp_path), "add")
    mine = KnnStore(DIM, MODEL, StoreSettings(max_classes=2))
    with pytest.raises(ValueError, match=r"3 classes would be more than store.max_classes \(2\)"):
        exchange.apply(mine, bundle_of(archive_of(make_store(photos)), tmp_path), "add")
    with pytest.raises(ValueError, match="mode: expected add or replace"):
        exchange.apply(mine, bundle_of(archive_of(make_store(photos)), tmp_path), "merge")
    assert mine.classes == [] and len(mine) == 0


def test_an_old_json_export_still_imports_and_its_times_are_checked(photos, tmp_path):
    """The JSON export before the archive is still read; Finding 13: `"added": {"0": 1e300}` was taken and
    broke every listing of the examples for good."""
    old = {
        "format": "edgeknn-examples",
        "model_id": MODEL,
        "classes": ["a"],
        "added": {"0": 1.7e9},
        "pictures": {},
        "examples": [{"class": "a", "example": 0, "vector": [1.0] + [0.0] * (DIM - 1)}],
    }
    store = KnnStore(DIM, MODEL, StoreSettings())
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert exchange.apply(store, exchange.read_import(path), "add")["added"] == 1
    old["added"] = {"0": 1e300}
    path.write_text(json.dumps(old))
    with pytest.raises(ArchiveError, match="example 0: added: expected a time in seconds from 1970 to 9999"):
        exchange.read_import(path)
    with pytest.raises(ValueError, match="added"):
        store.add("a", np.ones((1, DIM), np.float32), added=1e300)


def test_a_picture_gone_while_exporting_cuts_the_stream_which_no_reader_takes(photos, tmp_path):
    store = make_store(photos)
    store.save(tmp_path / "s.npz")
    lent = lend(store)
    (tmp_path / "s.npz.pictures" / "1.jpg").write_bytes(b"\xff\xd8 changed")
    out = io.BytesIO()
    with pytest.raises(ArchiveError, match="example 1: its picture changed or is gone"):
        exchange.write_lent(out, lent)
    give_back(store, lent)
    with pytest.raises(ArchiveError, match="cut short"):
        bundle_of(out.getvalue(), tmp_path)
    assert out.getvalue().startswith(b"manifest.json"), "the stream had begun"

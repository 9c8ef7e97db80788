"""The store file under mistakes and attacks: inconsistent contents, files that are not stores, and one
writer per store (a running device's lock refuses `edgeknn teach`)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, REPO, TINY, needs_data
from conftest import MODEL as DEVICE_MODEL

from edgeknn import config
from edgeknn.cli.main import main
from edgeknn.device.build import Fatal, open_store
from edgeknn.store import lock as storelock
from edgeknn.store.file import StoreError, _checksum
from edgeknn.store.knn import KnnStore, StoreSettings

MODEL = "m" * 64


def saved(path: Path, dim: int = 16) -> dict[str, np.ndarray]:
    """A good store of two classes at ``path``; its arrays as written."""
    store = KnnStore(dim, MODEL, StoreSettings(rule="nearest"))
    rng = np.random.default_rng(1)
    for name in ("cup", "pen", "cup"):
        store.add(name, rng.random(dim, dtype=np.float32))
    store.save(path)
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def resave(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` with a freshly computed checksum: what anyone who edits a store can do."""
    arrays = {k: v for k, v in arrays.items() if k != "checksum"}
    arrays["checksum"] = np.array(_checksum(arrays))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def craft(path: Path, arrays: dict[str, np.ndarray], header: dict[str, tuple[tuple, str]]) -> None:
    """A zip of npy members where the members named in ``header`` claim (shape, dtype) but hold only
    a few bytes: a damaged or forged header."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            if name in header:
                shape, dtype = header[name]
                header_data = {"descr": dtype, "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(buffer, header_data)
                buffer.write(b"\0" * 64)
            else:
                np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(f"{name}.npy", buffer.getvalue())


def damaged(path: Path, dim: int | None = None) -> StoreError:
    with pytest.raises(StoreError) as info:
        KnnStore.load(path, MODEL) if dim is None else KnnStore.load(path, MODEL, dim=dim)
    assert info.value.corrupt is True, info.value
    assert str(path) in str(info.value)
    return info.value


# --- case 6: validated before anything is allocated ----------------------------------------------------


def test_a_header_claiming_10_to_the_8_rows_allocates_nothing(tmp_path):
    path = tmp_path / "store.npz"
    arrays = saved(path)
    craft(path, arrays, {"rows": ((10**8, 1024), "<f4")})  # 572 GiB with the room to grow
    tracemalloc.start()
    try:
        error = damaged(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "rows" in str(error)
    assert peak < 20 << 20, f"{peak} bytes allocated for a header's claim"


@pytest.mark.parametrize(
    ("member", "shape", "dtype"),
    [
        ("rows", (-5, 16), "<f4"),
        ("labels", (10**9,), "<i4"),
        ("classes", (10**9,), "<U32"),
        ("scale", (2**62,), "<f4"),
    ],
)
def test_negative_or_huge_counts_are_a_damaged_store(tmp_path, member, shape, dtype):
    path = tmp_path / "store.npz"
    arrays = saved(path)
    craft(path, arrays, {member: (shape, dtype)})
    tracemalloc.start()
    try:
        damaged(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20


def test_rows_of_another_width_than_the_models(tmp_path):
    path = tmp_path / "store.npz"
    saved(path, dim=16)
    assert "the model makes 32" in str(damaged(path, dim=32))
    assert KnnStore.load(path, MODEL, dim=16).dim == 16


def edited(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "store.npz"
    arrays = saved(path)
    for name, change in changes.items():
        arrays[name] = change(arrays[name])
    resave(path, arrays)
    return path


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"labels": lambda a: a + 5}, "label index past the class list"),
        ({"labels": lambda a: a - 3}, "label index past the class list"),
        ({"storage": lambda a: np.array("uint8")}, "storage says 'uint8'"),
        ({"storage": lambda a: np.array("float64")}, "storage says 'float64'"),
        ({"labels": lambda a: a[:-1]}, "labels has shape"),
        ({"center": lambda a: a[:5]}, "center has shape"),
        ({"rows": lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a)}, "not finite"),
        ({"scale": lambda a: a + np.inf}, "not finite"),
        ({"example": lambda a: a - 10}, "negative example"),
        ({"seen": lambda a: np.array(-1)}, "negative count"),
        ({"classes": lambda a: np.array(["cup", "cup"])}, "twice"),
        ({"labels": lambda a: a.astype(np.float32)}, "labels is float32"),
        ({"rows": lambda a: a.astype(np.float64)}, "rows are float64"),
        # finding 13: names from a file with a valid checksum were not checked against the naming rule
        ({"classes": lambda a: np.array(["cup/+", *a[1:]])}, "class 'cup/+' breaks the naming rule"),
        ({"classes": lambda a: np.array(["Unknown", *a[1:]])}, "class 'Unknown' breaks the naming rule"),
    ],
)
def test_contents_a_recomputed_checksum_cannot_vouch_for(tmp_path, changes, said):
    """Each passes the zip and the checksum (anyone can recompute a sha256), and is damaged all the same."""
    path = edited(tmp_path, **changes)
    assert said in str(damaged(path))


def test_times_out_of_range_in_a_store_file_become_the_files_time(tmp_path, caplog):
    """Finding 13: an import took `"added": 1e300`, saved it, and every listing of the examples failed
    for good (`timestamp out of range`), across restarts. Such a store loads with the file's time."""
    from edgeknn.commands import ListExamples
    from edgeknn.device.teaching import Teacher

    path = edited(tmp_path, added=lambda a: np.where(np.arange(len(a)) == 0, 1e300, a))
    store = KnnStore.load(path, MODEL)
    first = store.examples()[0]
    assert first.added == os.stat(path).st_mtime and "out of range" in caplog.text
    listed = Teacher(store, lambda: None, lambda *a: None, lambda *a: None).list_examples(ListExamples())
    assert listed.ok and len(listed.detail["examples"]) == len(store.examples())


def test_a_compressed_member_is_refused(tmp_path):
    path = tmp_path / "store.npz"
    arrays = saved(path)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    assert "compressed" in str(damaged(path))


class FakeEmbedder:
    def __init__(self, dim: int, identity: str = MODEL):
        self.dim, self.identity, self.storage = dim, identity, "float32"


def cfg_for(tmp_path: Path) -> config.Config:
    return config.replace(config.Config(), state_dir=str(tmp_path))


def test_a_damaged_store_is_moved_aside_once_and_the_device_starts_empty(tmp_path, caplog):
    path = edited(tmp_path, labels=lambda a: a + 5)
    before = path.read_bytes()
    store = open_store(cfg_for(tmp_path), FakeEmbedder(16), path)
    assert len(store) == 0 and store.dim == 16
    asides = list(tmp_path.glob("store.npz.broken-*"))
    assert len(asides) == 1 and asides[0].read_bytes() == before and not path.exists()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "label index" in errors[0].getMessage()
    storelock.release(path)


def test_rows_of_another_width_at_start_are_a_damaged_store(tmp_path):
    path = tmp_path / "store.npz"
    saved(path, dim=16)
    store = open_store(cfg_for(tmp_path), FakeEmbedder(1024), path)
    assert len(store) == 0 and store.dim == 1024
    assert len(list(tmp_path.glob("store.npz.broken-*"))) == 1
    storelock.release(path)


def in_thread(target, timeout: float = 10.0):
    """``target()``'s result or exception; fails (instead of hanging the suite) if it blocks."""
    out: dict = {}

    def call():
        try:
            out["value"] = target()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    return thread.is_alive(), out


def test_a_fifo_at_the_store_path_is_refused_without_hanging(tmp_path):
    path = tmp_path / "store.npz"
    os.mkfifo(path)
    try:
        hung, out = in_thread(lambda: open_store(cfg_for(tmp_path), FakeEmbedder(16), path))
    finally:
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))  # let a blocked open go on
    assert not hung, "start-up hangs on a FIFO at store.path"
    error = out.get("error")
    assert isinstance(error, Fatal) and error.code == 78, out
    assert str(path) in str(error) and "FIFO" in str(error)
    assert path.exists() and not list(tmp_path.glob("store.npz.broken-*"))


def test_store_info_of_a_fifo_does_not_hang(tmp_path, capsys):
    path = tmp_path / "store.npz"
    os.mkfifo(path)
    try:
        hung, out = in_thread(lambda: main(["store", "info", str(path)]))
    finally:
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
    assert not hung and out.get("value") == 1, out
    assert "FIFO" in capsys.readouterr().err


# --- case 7: never rename what is not a store ------------------------------------------------------------


@needs_data
def test_a_store_path_at_another_file_renames_nothing(tmp_path):
    config_file = tmp_path / "edgeknn.toml"
    config_file.write_text('classes = ["cup"]\n[store]\npath = "edgeknn.toml"\n')
    model = tmp_path / "model.tflite"
    model.write_bytes(TINY.read_bytes())
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping: milk, eggs\nnaïve café\n")
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.jpg", b"\xff\xd8\xff" + b"\0" * 100)
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.arange(3))
    for path, kind in (
        (config_file, "a text file"),
        (model, "a TFLite model"),
        (notes, "a text file"),
        (archive, "a zip archive without a store"),
        (npz, "a zip archive without a store"),
    ):
        before = path.read_bytes()
        with pytest.raises(Fatal) as info:
            open_store(cfg_for(tmp_path), FakeEmbedder(16), path)
        message = str(info.value)
        assert info.value.code == 78 and str(path) in message and kind in message and "\n" not in message
        assert path.read_bytes() == before, "the file was changed"
        assert not list(tmp_path.glob("*.broken-*")), f"{path.name} was renamed"


def test_what_is_recognisably_a_damaged_store_is_still_moved_aside(tmp_path):
    path = tmp_path / "store.npz"
    saved(path)
    data = path.read_bytes()
    for cut in (data[: len(data) // 2], data[:40], b""):  # the central directory gone: the first name says
        path.write_bytes(cut)
        assert len(open_store(cfg_for(tmp_path), FakeEmbedder(16), path)) == 0
        storelock.release(path)
        assert not path.exists()
    assert len(list(tmp_path.glob("store.npz.broken-*"))) == 3


# --- case 2: one writer per store ------------------------------------------------------------------------


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "STATE_DIRECTORY": "/nonexistent"}


def hold_lock(path: Path, who: str) -> subprocess.Popen:
    """Another process that holds ``path``'s lock until killed."""
    code = (
        "import sys, time; from pathlib import Path; from edgeknn.store import lock as storelock; "
        "storelock.claim(Path(sys.argv[1]), sys.argv[2]); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), who], stdout=subprocess.PIPE, env=env())
    assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
    return proc


@needs_data
def test_commands_that_write_refuse_a_locked_store_and_reading_ones_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "none.toml")
    path = tmp_path / "store.npz"
    saved(path)
    before = path.read_bytes()
    holder = hold_lock(path, "edgeknn run")
    try:
        photo = sorted((DIGITS / "1").iterdir())[0]
        export = tmp_path / "e.json"
        assert main(["store", "export", str(path), str(export)]) == 0
        assert main(["store", "info", str(path)]) == 0
        capsys.readouterr()
        for argv in (
            ["teach", "--store", str(path), "--class", "cup", "--model", str(TINY), str(photo)],
            ["store", "import", str(path), str(export)],
            ["store", "forget", str(path), "cup"],
            ["store", "rename", str(path), "cup", "mug"],
        ):
            assert main(argv) == 1, argv
            err = capsys.readouterr().err.splitlines()
            assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "cmd/add_example" in err[0], err
            assert path.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["store", "rename", str(path), "cup", "mug"]) == 0, "a dead holder leaves no lock"
    assert KnnStore.load(path, MODEL).classes == ["mug", "pen"]


def test_claims_nest_within_a_process_and_the_last_release_unlocks(tmp_path):
    path = tmp_path / "store.npz"
    assert storelock.claim(path, "edgeknn run") and storelock.claim(path, "edgeknn run")
    storelock.release(path)
    code = (
        "import sys; from pathlib import Path; from edgeknn.store import lock as storelock; "
        "storelock.claim(Path(sys.argv[1]), 'x')"
    )
    probe = [sys.executable, "-c", code, str(path)]
    assert subprocess.run(probe, env=env(), capture_output=True).returncode != 0, "one claim is still held"
    storelock.release(path)
    assert subprocess.run(probe, env=env(), capture_output=True).returncode == 0


def edgeknn(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeknn", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env(),
        **kw,
    )


@pytest.mark.slow
def test_teach_refuses_the_store_of_a_running_daemon_and_predict_works(tmp_path):
    photos = sorted((DIGITS / "1").iterdir())[:2]
    store = tmp_path / "state" / "store.npz"
    config_file = tmp_path / "edgeknn.toml"
    config_file.write_text(
        f'classes = ["one"]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[model]\npath = "{DEVICE_MODEL}"\nthreads = 1\n'
    )
    c = ("--config", config_file)
    taught = edgeknn("teach", *c, "--store", store, "--class", "one", photos[0])
    assert taught.returncode == 0, taught.stderr
    source = f"replay:{photos[1]}?fps=5&loop=1"
    run = ["run", *c, "--source", source, "--panel", "none", "--mqtt", "none", "--store", store]
    run += ["--web", "none"]
    daemon = subprocess.Popen(
        [sys.executable, "-m", "edgeknn", *map(str, run)],
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    lines: list[str] = []
    assert daemon.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(daemon.stderr), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any(" running: " in line for line in lines):
            assert daemon.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        before = store.read_bytes()
        refused = edgeknn("teach", *c, "--store", store, "--class", "one", photos[1])
        lines = refused.stderr.splitlines()
        assert refused.returncode == 1 and len(lines) == 1, refused.stderr
        assert f"pid {daemon.pid}" in lines[0] and "cmd/add_example" in lines[0]
        assert store.read_bytes() == before, "the store was written under the daemon"
        predicted = edgeknn("predict", *c, "--store", store, photos[0])
        assert predicted.returncode == 0 and ": one (" in predicted.stdout, predicted.stderr
        assert edgeknn("store", "info", store).returncode == 0
        second = edgeknn(*run, timeout=60)
        said = [line for line in second.stderr.splitlines() if " ERROR " in line or "edgeknn:" in line]
        assert second.returncode == 78 and len(said) == 1 and f"pid {daemon.pid}" in said[0], second.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        reader.join(timeout=10)
    assert daemon.returncode == 0, "".join(lines)
    again = edgeknn("teach", *c, "--store", store, "--class", "one", photos[1])
    assert again.returncode == 0 and "now has 2 examples" in again.stdout, again.stderr

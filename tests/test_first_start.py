"""The first hour of a new user: an offline first start, progress on a terminal, a batch `teach`
that skips what it cannot read, one exit-code rule, no interpreter banner."""

from __future__ import annotations

import http.server
import json
import logging
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpserve
import pytest
from conftest import DIGITS, MODELS, PHOTOS, TINY, needs_data

from edgeknn import assets, config
from edgeknn.bench.broker import free_port
from edgeknn.cli.main import EX_CONFIG, main
from edgeknn.cli.progress import Progress
from edgeknn.device import lifecycle
from edgeknn.device.systemd import Notifier
from edgeknn.model.download import wait_for_model
from edgeknn.model.registry import MODELS as NAMED
from edgeknn.model.registry import URL_BASE_ENV
from edgeknn.model.tflite import sha256_of
from edgeknn.store.knn import KnnStore

REPO = Path(__file__).resolve().parent.parent
# The default model ships inside the package (nothing to wait for): the waits are for another named one.
WAITED = NAMED["mobilenet_v1_0.25_128"]
WAITED_FILE, WAITED_SHA256 = WAITED.file, WAITED.sha256


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No /etc/edgeknn/edgeknn.toml and no ~/.local/state: every default points into tmp_path."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-config.toml")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))


class NotifySocket:
    """What systemd hears: the datagrams sent to $NOTIFY_SOCKET, collected by a thread."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, OSError):
                continue

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.messages):
                if text in m:
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} from the daemon within {timeout} s; heard {self.messages}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self.sock.close()


def offline_config(tmp_path: Path, **overrides) -> config.Config:
    """Defaults (the model in the state folder, none there yet), no camera, no panel, no MQTT."""
    values = {
        "state_dir": str(tmp_path / "state"),
        "camera.source": f"replay:{DIGITS / '1'}?fps=10",
        "panel.kind": "none",
        "mqtt.enabled": False,
        "web.enabled": False,  # the page while waiting: tests/test_demo.py
        "model.name": WAITED.name,
        **overrides,
    }
    return config.replace(config.load(None), **values)


def waited_config(tmp_path: Path) -> Path:
    """A config file choosing the named model the package does not carry."""
    path = tmp_path / "waited.toml"
    path.write_text(f'[model]\nname = "{WAITED.name}"\n')
    return path


def drop_in_place(path: Path, after: float) -> threading.Thread:
    """A person copying the model to where the message said, ``after`` seconds from now."""

    def copy() -> None:
        time.sleep(after)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TINY, path)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


# --- the offline first start ----------------------------------------


@needs_data
def test_offline_start_keeps_retrying_says_where_and_takes_the_file_a_person_puts_there(
    tmp_path, monkeypatch, caplog
):
    base = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv(URL_BASE_ENV, base)
    url = f"{base}/{WAITED_FILE}"
    cfg = offline_config(tmp_path)
    path = cfg.model_path()
    notify = NotifySocket(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
    copier = drop_in_place(path, after=2.0)
    caplog.set_level(logging.INFO)
    try:
        started = time.monotonic()
        assert lifecycle.await_model(cfg, notifier, first_delay=0.2, max_delay=0.4) is True
        elapsed = time.monotonic() - started
    finally:
        copier.join()
        notifier.close()
        notify.close()
    assert 1.9 < elapsed < 5, "it took the file soon after it appeared"
    assert sha256_of(path) == WAITED_SHA256
    ready = [m for m in notify.messages if "READY=1" in m]
    assert len(ready) == 1 and "STATUS=waiting for the model" in ready[0], notify.messages
    assert sum("WATCHDOG=1" in m for m in notify.messages) >= 5, "the watchdog is fed while waiting"
    statuses = [m for m in notify.messages if m.startswith("STATUS=waiting for the model: download failed")]
    assert len(statuses) >= 3, f"it kept retrying: {notify.messages}"
    for text in (str(path), url, WAITED_SHA256):
        assert text in statuses[0]
    waits = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert waits[0].endswith("retrying in 0.2 s") and waits[-1].endswith("retrying in 0.4 s"), waits
    assert all(
        r.levelno == logging.WARNING and "\n" not in r.getMessage()
        for r in caplog.records
        if "retrying" in r.getMessage()
    )


@needs_data
def test_offline_start_downloads_once_the_network_is_back(tmp_path):
    port = free_port()
    dest = tmp_path / "models" / WAITED_FILE
    reports: list[str] = []
    server: list[http.server.ThreadingHTTPServer] = []

    def network_back() -> None:
        time.sleep(1.0)
        server.append(httpserve.server(MODELS, port))
        server[0].serve_forever()

    threading.Thread(target=network_back, daemon=True).start()
    try:
        ok = wait_for_model(
            dest,
            f"http://127.0.0.1:{port}/{WAITED_FILE}",
            WAITED_SHA256,
            stop=threading.Event(),
            report=reports.append,
            tick=lambda: None,
            first_delay=0.2,
            max_delay=0.5,
            poll=0.1,
        )
    finally:
        for s in server:
            s.shutdown()
            s.server_close()
    assert ok and sha256_of(dest) == WAITED_SHA256
    assert reports and all("download failed" in r for r in reports)
    assert [p.name for p in dest.parent.iterdir()] == [WAITED_FILE], "no .part left behind"


def test_a_wrong_file_at_the_path_is_not_taken_and_a_stop_ends_the_wait(tmp_path, caplog):
    dest = tmp_path / WAITED_FILE
    shutil.copy(assets.DEFAULT_MODEL, dest)  # another model where the waited one belongs
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    caplog.set_level(logging.INFO)
    ok = wait_for_model(
        dest,
        f"http://127.0.0.1:{free_port()}/m.tflite",
        WAITED_SHA256,
        stop=stop,
        report=lambda _: None,
        tick=lambda: None,
        first_delay=0.1,
        max_delay=0.2,
        poll=0.05,
    )
    assert ok is False
    warned = [r.getMessage() for r in caplog.records if "waiting for the right file" in r.getMessage()]
    assert len(warned) == 1 and sha256_of(assets.DEFAULT_MODEL) in warned[0], "said once, not every poll"


OFFLINE_RUN = """
import os
import sys
os.environ["EDGEKNN_MODEL_URL_BASE"] = sys.argv[1].rsplit("/", 1)[0]
from edgeknn.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@needs_data
def test_edgeknn_run_offline_waits_ready_then_starts_when_the_model_appears(tmp_path):
    """`edgeknn run` as systemd runs it, with no model and no network: READY while waiting, the
    watchdog fed, one line saying where to put the file; then the file appears and it classifies."""
    url = f"http://127.0.0.1:{free_port()}/{WAITED_FILE}"
    state = tmp_path / "state"
    notify = NotifySocket(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000", "HOME": str(tmp_path)}
    env["STATE_DIRECTORY"] = str(state)
    argv = ["run", "--source", f"replay:{DIGITS / '1'}?fps=10", "--panel", "none", "--mqtt", "none"]
    argv += ["--web", "none", "--config", str(waited_config(tmp_path))]
    proc = subprocess.Popen(
        [sys.executable, "-c", OFFLINE_RUN, url, *argv], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        notify.wait_for("STATUS=waiting for the model", 30)
        notify.wait_for("STATUS=waiting for the model: download failed", 30)
        time.sleep(1.5)
        assert proc.poll() is None, "it does not exit while waiting for the model"
        assert any("WATCHDOG=1" in m for m in notify.messages)
        drop_in_place(state / "models" / WAITED_FILE, after=0).join()
        notify.wait_for("STATUS=classifying with " + WAITED_FILE, 60)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        notify.close()
    assert proc.returncode == 0, err
    hint = [line for line in err.splitlines() if "put the file at" in line]
    assert hint, err
    assert str(state / "models" / WAITED_FILE) in hint[0] and url in hint[0]
    assert WAITED_SHA256 in hint[0]
    assert "found" in err and "running:" in err and "stopped" in err.splitlines()[-1]
    assert "Traceback" not in err


def test_edgeknn_run_offline_stops_cleanly_on_sigterm_while_waiting(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/{WAITED_FILE}"
    notify = NotifySocket(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "STATE_DIRECTORY": str(tmp_path / "state")}
    argv = ["run", "--source", f"replay:{DIGITS / '1'}", "--panel", "none", "--mqtt", "none", "--web", "none"]
    argv += ["--config", str(waited_config(tmp_path))]
    proc = subprocess.Popen(
        [sys.executable, "-c", OFFLINE_RUN, url, *argv], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        notify.wait_for("STATUS=waiting for the model: download failed", 30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        notify.close()
    assert proc.returncode == 0, err
    assert any("STOPPING=1" in m for m in notify.messages)


@needs_data
def test_mqtt_says_why_while_waiting_for_the_model(tmp_path, monkeypatch, broker, subscriber):
    monkeypatch.setenv(URL_BASE_ENV, f"http://127.0.0.1:{free_port()}")
    cfg = offline_config(
        tmp_path,
        **{
            "mqtt.enabled": True,
            "mqtt.host": "127.0.0.1",
            "mqtt.port": broker.port,
            "mqtt.device_id": "first",
        },
    )
    sub = subscriber(broker.port, ["edgeknn/first/#"])
    copier = drop_in_place(cfg.model_path(), after=2.5)
    try:
        assert lifecycle.await_model(cfg, Notifier({}), first_delay=0.3, max_delay=0.3)
    finally:
        copier.join()
    states = [json.loads(m.text) for m in sub.on("edgeknn/first/state")]
    assert any("download failed" in s["error"] and str(cfg.model_path()) in s["error"] for s in states), (
        states
    )
    assert [m.text for m in sub.on("edgeknn/first/availability")][:1] == ["online"]


# --- teach / predict / classify without the model ----------------------------------------


@needs_data
@pytest.mark.parametrize(
    "argv",
    [
        ["classify", str(PHOTOS / "cat.bmp")],
        ["teach", str(PHOTOS / "cat.bmp"), "--class", "cat", "--store", "STORE"],
        ["predict", str(PHOTOS / "cat.bmp"), "--store", "STORE"],
    ],
    ids=lambda a: a[0],
)
def test_commands_without_the_model_say_where_to_put_it(capsys, tmp_path, argv):
    store = tmp_path / "s.npz"
    rc = main([str(store) if a == "STORE" else a for a in argv] + ["--config", str(waited_config(tmp_path))])
    err = capsys.readouterr().err
    path = tmp_path / "state" / "models" / WAITED_FILE
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert f"{path}: model file not found" in err and WAITED.url in err
    assert WAITED_SHA256 in err


# --- a batch teach skips what it cannot read ----------------------------------------


@needs_data
def test_batch_teach_skips_what_it_cannot_read_and_keeps_the_rest(capsys, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted(DIGITS.joinpath("3").iterdir())[:3]
    for p in good:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(good[0].read_bytes()[:300])  # a damaged file
    (folder / "notes.jpg").write_text("not a photo at all")  # not an image
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    store = tmp_path / "s.npz"
    rc = main(
        ["teach", str(folder), str(text), "--class", "three", "--store", str(store), "--model", str(TINY)]
    )
    out, err = capsys.readouterr()
    assert rc == 1, "the exit says some were skipped"
    skipped = err.splitlines()
    assert len(skipped) == 3 and all(line.startswith("edgeknn: skipped ") for line in skipped), err
    for name in ("broken.jpg", "notes.jpg", "notes.txt"):
        assert sum(name in line for line in skipped) == 1, err
    assert out == f"{store}: class 'three' now has 3 examples (3 added, 3 skipped)\n"
    assert KnnStore.load(store, sha256_of(TINY)).counts() == {"three": 3}


@needs_data
def test_teach_with_nothing_readable_saves_nothing(capsys, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    store = tmp_path / "s.npz"
    rc = main(["teach", str(bad), "--class", "x", "--store", str(store), "--model", str(TINY)])
    err = capsys.readouterr().err
    assert rc == 1 and "skipped" in err and str(bad) in err and "nothing added" in err
    assert not store.exists()


# --- one exit-code rule ----------------------------------------


def test_store_import_of_a_bad_or_a_missing_file_exits_the_same(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    codes = []
    for source in (bad, tmp_path / "missing.json"):
        codes.append(main(["store", "import", str(tmp_path / "s.npz"), str(source)]))
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and str(source) in err
    assert codes == [1, 1]


@needs_data
@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["classify", "NOPE"], 1),  # a missing input file
        (["model", "info", "NOPE"], 1),
        (["store", "info", "NOPE"], 1),
        (["classify", str(PHOTOS / "cat.bmp"), "--top", "0"], 2),  # a value out of range
        (["eval", str(DIGITS), "--shots", "x"], 2),
        (["teach", str(PHOTOS / "cat.bmp"), "--class", "a/b", "--store", "S"], 2),
        (["classify", str(PHOTOS / "cat.bmp"), "--no-such-flag"], 2),  # argparse
        (["classify", str(PHOTOS / "cat.bmp"), "--config", "CONFIG"], EX_CONFIG),
    ],
)
def test_one_exit_code_rule(capsys, tmp_path, argv, code):
    bad_config = tmp_path / "c.toml"
    bad_config.write_text("[store]\nk = 0\n")
    values = {"NOPE": str(tmp_path / "nope"), "S": str(tmp_path / "s.npz"), "CONFIG": str(bad_config)}
    try:
        rc = main([values.get(a, a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    capsys.readouterr()
    assert rc == code
    assert EX_CONFIG == os.EX_CONFIG == 78


# --- progress on a terminal ----------------------------------------


def run_on_a_pty(argv: list[str]) -> tuple[int, str, str]:
    """Run `edgeknn argv` with stderr on a pseudo-terminal (stdout a pipe); return (rc, out, err)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeknn", *argv], stdout=subprocess.PIPE, stderr=follower, cwd=REPO
    )
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    out = proc.stdout.read().decode() if proc.stdout else ""
    proc.wait(30)
    return proc.returncode, out, b"".join(chunks).decode()


@needs_data
def test_teach_shows_progress_on_a_terminal_only(tmp_path):
    folder, n = tmp_path / "sevens", 5
    folder.mkdir()
    for p in sorted((DIGITS / "7").iterdir())[:n]:
        (folder / p.name).symlink_to(p)
    store = tmp_path / "s.npz"
    argv = ["teach", str(folder), "--class", "seven", "--store", str(store), "--model", str(TINY)]
    rc, out, err = run_on_a_pty(argv)
    assert rc == 0, err
    assert f"\rteach 'seven': {n}/{n}" in err and "XNNPACK" not in err
    assert out.startswith(f"{store}: class 'seven' now has {n} examples"), "results stay on stdout"
    argv[5] = str(tmp_path / "t.npz")  # --store
    piped = subprocess.run(
        [sys.executable, "-m", "edgeknn", *argv], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert piped.returncode == 0 and piped.stderr == "", "no progress and no banner in a pipe"


@needs_data
def test_eval_shows_progress_on_a_terminal(tmp_path):
    data = tmp_path / "digits"
    for name in ("0", "1"):
        (data / name).mkdir(parents=True)
        for p in sorted((DIGITS / name).iterdir())[:4]:
            (data / name / p.name).symlink_to(p)
    rc, out, err = run_on_a_pty(
        ["eval", str(data), "--model", str(TINY), "--shots", "1", "--seeds", "2", "--no-cache"]
    )
    assert rc == 0, err
    assert "\reval: embedding photos: 8/8" in err and "\reval: shots x rules x seeds: 4/4" in err
    assert out.startswith(f"{data}: 8 photos, 2 classes")


class FakeTerminal:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_redraws_after_a_line_and_clears_itself():
    term = FakeTerminal(tty=True)
    with Progress("work", 3, stream=term, every=0) as progress:  # type: ignore[arg-type]
        progress(1)
        progress.say("edgeknn: skipped x.jpg: not an image")
        progress(3)
    erase = "\r" + " " * len("work: 1/3") + "\r"
    expected = "\rwork: 1/3" + erase + "edgeknn: skipped x.jpg: not an image\n\rwork: 1/3\rwork: 3/3" + erase
    assert term.text == expected
    pipe = FakeTerminal(tty=False)
    with Progress("work", 3, stream=pipe, every=0) as progress:  # type: ignore[arg-type]
        progress(3)
    assert pipe.text == ""

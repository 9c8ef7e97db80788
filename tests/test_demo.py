"""First contact (issue 21): what ships in the package, `edgeknn demo`, the page while the device waits,
and `edgeknn data fetch` (the larger sets for the tests, pinned and checked)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from conftest import DIGITS, MODELS, PHOTOS, SHARED, needs_data
from httpserve import serve
from rig import needs_mosquitto, wait_for

from edgeknn import assets, config
from edgeknn.bench.broker import free_port
from edgeknn.cli import data as datacli
from edgeknn.cli import demo as democli
from edgeknn.cli.main import main
from edgeknn.device import lifecycle
from edgeknn.device.systemd import Notifier
from edgeknn.model.registry import DEFAULT_NAME, URL_BASE_ENV, packaged
from edgeknn.model.registry import MODELS as NAMED
from edgeknn.model.tflite import sha256_of

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No /etc/edgeknn/edgeknn.toml and no ~/.local/state: every default points into tmp_path."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "no-such-config.toml")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))


class Page:
    """The web page as a browser without JavaScript sees it: login, then JSON."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))

    def get(self, path: str, body: object = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data, {"Content-Type": "application/json"})
        try:
            with self.opener.open(request, timeout=30) as response:
                status, raw, kind = response.status, response.read(), response.headers.get_content_type()
        except urllib.error.HTTPError as e:
            status, raw, kind = e.code, e.read(), e.headers.get_content_type()
        return status, json.loads(raw) if kind == "application/json" else raw

    def up(self) -> bool:
        try:
            return self.get("/")[0] == 200
        except OSError:
            return False


# --- what the package carries ----------------------------------------


def test_the_package_carries_the_pinned_default_model_and_the_demo_photos():
    named = NAMED[DEFAULT_NAME]
    assert packaged(named) == assets.DEFAULT_MODEL and sha256_of(assets.DEFAULT_MODEL) == named.sha256
    assert [p.name for p in sorted(assets.DEMO_PHOTOS.iterdir())] == list(assets.DEMO_CLASSES)
    assert [len(list((assets.DEMO_PHOTOS / c).glob("*.JPG"))) for c in assets.DEMO_CLASSES] == [20, 20, 20]
    attribution = (assets.FOLDER / "ATTRIBUTION.md").read_text()
    assert named.sha256 in attribution and "Apache" in attribution and "Arda Mavi" in attribution
    assert (assets.FOLDER / "LICENSE-Apache-2.0.txt").is_file()
    assert all(packaged(m) is None for m in NAMED.values() if m.name != DEFAULT_NAME)


def test_the_default_model_is_the_packaged_copy_and_nothing_is_downloaded(tmp_path, monkeypatch):
    """Before: a fresh default config waited for a download (5 s, 10 s, 20 s, ...) with no network."""
    monkeypatch.setenv(URL_BASE_ENV, f"http://127.0.0.1:{free_port()}")  # nothing listens: no download
    cfg = config.replace(config.load(None), state_dir=str(tmp_path / "state"))
    assert cfg.model_path() == assets.DEFAULT_MODEL
    started = time.monotonic()
    assert lifecycle.await_model(cfg, Notifier({}), first_delay=30, max_delay=30)
    assert time.monotonic() - started < 5, "no wait for a download"
    own = tmp_path / "state" / "models" / assets.DEFAULT_MODEL.name  # a fetched copy in the state folder wins
    own.parent.mkdir(parents=True)
    own.write_bytes(assets.DEFAULT_MODEL.read_bytes())
    assert cfg.model_path() == own
    other = config.replace(cfg, **{"model.name": "mobilenet_v1_0.5_160"})  # other names still download
    assert other.model_path() == tmp_path / "state" / "models" / NAMED["mobilenet_v1_0.5_160"].file


def test_model_list_says_the_default_is_packaged(capsys):
    assert main(["model", "list", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[DEFAULT_NAME]["downloaded"] == "packaged"
    assert rows["mobilenet_v1_0.5_160"]["downloaded"] == "no"


# --- the page while the device waits ----------------------------------------


def test_the_page_serves_while_the_device_waits_for_its_model_and_says_why(tmp_path, monkeypatch):
    """Before: no page at all until the model file arrived (offline first start of another named model)."""
    monkeypatch.setenv(URL_BASE_ENV, f"http://127.0.0.1:{free_port()}")
    port = free_port()
    cfg = config.replace(
        config.load(None),
        **{
            "state_dir": str(tmp_path / "state"),
            "model.name": "mobilenet_v1_0.25_128",
            "camera.source": "demo",
            "panel.kind": "none",
            "mqtt.enabled": False,
            "web.listen": "127.0.0.1",
            "web.port": port,
        },
    )
    page, seen = Page(port), {}

    def visit() -> None:  # a person opening the address while the device waits, then stopping it
        try:
            if not wait_for(page.up, 60):
                return
            seen["page"] = page.get("/")[1]
            password = (tmp_path / "state" / "web-password").read_text().strip()
            seen["login"] = page.get("/api/login", {"password": password})[0]
            wait_for(lambda: "download failed" in str(page.get("/api/session")[1]), 60)
            seen["session"] = page.get("/api/session")[1]
            seen["add"] = page.get("/api/add-example", {"class": "one"})
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # await_model's handler: the wait ends, False

    visitor = threading.Thread(target=visit, daemon=True)
    visitor.start()
    assert lifecycle.await_model(cfg, Notifier({}), first_delay=0.2, max_delay=0.5) is False
    visitor.join(10)
    assert b"<html" in seen["page"].lower() and seen["login"] == 200, seen
    state = seen["session"]["state"]
    assert "waiting for the model" in state["error"] and "put the file at" in state["error"], state
    assert state["camera"] == "off" and state["model_file"] == NAMED["mobilenet_v1_0.25_128"].file
    assert seen["add"][0] != 200, "nothing is taught while there is no model"
    assert wait_for(lambda: not page.up(), 10), "the waiting page is closed once the wait ends"


# --- edgeknn demo ----------------------------------------


def test_demo_runs_the_device_on_the_packaged_photos_and_teaches_from_the_keyboard(tmp_path):
    """`edgeknn demo` from a clean home: the packaged model and photos, the page, keys 1..3; no download
    is possible ($EDGEKNN_MODEL_URL_BASE points at nothing), no broker is asked for (--mqtt none)."""
    port = free_port()
    env = {**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    env[URL_BASE_ENV] = f"http://127.0.0.1:{free_port()}"
    env.pop("STATE_DIRECTORY", None)
    log = tmp_path / "demo.log"
    argv = ["demo", "--web", f"127.0.0.1:{port}", "--mqtt", "none", "--panel", "keyboard"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeknn", *argv], stdin=subprocess.PIPE, stderr=out, text=True, env=env
        )
    try:
        assert wait_for(lambda: "running:" in log.read_text(), 120), log.read_text()
        assert proc.stdin is not None
        proc.stdin.write("1\n")
        proc.stdin.flush()
        assert wait_for(lambda: "example added: one" in log.read_text(), 60), log.read_text()
        assert wait_for(lambda: "stable label: one" in log.read_text(), 60), log.read_text()
        assert Page(port).up()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    text = log.read_text()
    state = tmp_path / "state" / "edgeknn-demo"
    assert f"running: {assets.DEFAULT_MODEL.name}, source demo, panel keyboard, mqtt off" in text
    assert f"the page is at http://127.0.0.1:{port} " in text and "<this host>" not in text
    assert (state / "store.npz").is_file() and (state / "web-password").is_file()
    assert "download" not in text and "Traceback" not in text and " ERROR " not in text, text


@needs_mosquitto
def test_demo_uses_mqtt_only_when_a_broker_answers(monkeypatch, tmp_path, broker):
    args = main_args(tmp_path)
    monkeypatch.setattr(democli, "BROKER", ("127.0.0.1", broker.port))
    cfg = democli.demo_config(args)
    assert cfg.mqtt.enabled and cfg.mqtt.port == broker.port and cfg.mqtt.device_id.endswith("-demo")
    monkeypatch.setattr(democli, "BROKER", ("127.0.0.1", free_port()))
    assert not democli.demo_config(args).mqtt.enabled, "no broker: MQTT off, not a failure"
    assert democli.demo_config(args).camera.source == "demo" and democli.demo_config(args).classes == [
        "one",
        "two",
        "five",
    ]


def main_args(tmp_path: Path):
    from edgeknn.cli.main import build_parser

    return build_parser().parse_args(["demo", "--state-dir", str(tmp_path / "demo"), "--web", "none"])


# --- edgeknn data fetch ----------------------------------------


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """The pinned sources laid out as github.com serves them, from the larger sets at hand."""
    if not (MODELS / "imagenet_labels.txt").is_file():
        pytest.skip("needs the larger sets to mirror them")
    root = tmp_path_factory.mktemp("github")
    repo, commit = datacli.TEST_DATA
    for pinned in datacli.FILES:
        source = SHARED / pinned.dest
        target = root / repo / "raw" / commit / pinned.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
    repo, commit = datacli.DIGITS_REPO
    archive = root / repo / "archive" / f"{commit}.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(DIGITS, f"Sign-Language-Digits-Dataset-{commit}/Dataset")
        tar.add(PHOTOS / "cat.bmp", f"Sign-Language-Digits-Dataset-{commit}/Examples/cat.bmp")  # not kept
    return root


@needs_data
def test_data_fetch_downloads_every_pinned_file_checks_it_and_fills_the_cache(
    capsys, tmp_path, monkeypatch, mirror
):
    with serve(mirror) as base:
        monkeypatch.setenv(datacli.GITHUB_ENV, base)
        assert main(["data", "fetch", "--dest", str(tmp_path / "cache")]) == 0
        first = capsys.readouterr().out
        assert main(["data", "fetch", "--dest", str(tmp_path / "cache")]) == 0
        again = capsys.readouterr().out
    cache = tmp_path / "cache"
    for pinned in datacli.FILES:
        assert sha256_of(cache / pinned.dest) == pinned.sha256
    assert datacli.digits_digest(cache / "data" / "sign_language_digits") == datacli.DIGITS_SHA256
    assert not (cache / "data" / "sign_language_digits" / "cat.bmp").exists()
    assert "2062 photos verified" in first and "verified (already there)" in again
    assert len(again.splitlines()) == 2, "nothing downloaded twice"
    assert (cache / datacli.FETCHED).is_file(), "the stamp the tests look for"
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part") or p.name.startswith(".digits-")]


@needs_data
def test_data_fetch_keeps_nothing_that_does_not_check_out(capsys, tmp_path, monkeypatch, mirror):
    bad = tmp_path / "bad"
    for path in mirror.rglob("*"):
        if path.is_file():
            target = bad / path.relative_to(mirror)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    repo, commit = datacli.TEST_DATA
    labels = bad / repo / "raw" / commit / "imagenet_labels.txt"
    labels.unlink()
    labels.write_text("background\n")  # not the pinned file
    with serve(bad) as base:
        monkeypatch.setenv(datacli.GITHUB_ENV, base)
        assert main(["data", "fetch", "--dest", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr().out
    assert "imagenet_labels.txt: checksum mismatch" in out and "1 download(s) failed" in out
    assert not (tmp_path / "cache" / "models" / "imagenet_labels.txt").exists()
    assert (tmp_path / "cache" / "models" / NAMED[DEFAULT_NAME].file).is_file(), "the good ones are kept"
    assert not (tmp_path / "cache" / datacli.FETCHED).exists(), "no stamp: the tests do not take it"


def test_the_tests_find_the_larger_sets_beside_then_in_the_environment_then_in_the_cache(tmp_path):
    """tests/conftest.py copied into a checkout with nothing beside it: $EDGEKNN_DATA, then the cache, then
    none (the demo photos stand in for the digits; never a fixed path such as /work/shared)."""
    clone = tmp_path / "clone" / "tests"
    clone.mkdir(parents=True)
    (clone / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    code = f"import sys; sys.path.insert(0, {str(clone)!r}); import conftest as c; print(c.ROOT, c.DIGITS)"
    fake = tmp_path / "data"
    (fake / "models").mkdir(parents=True)
    env = {**os.environ, "EDGEKNN_DATA": str(fake), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def found() -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert found() == [str(fake), str(fake / "data" / "sign_language_digits")]
    env["EDGEKNN_DATA"] = ""
    assert found() == ["None", str(assets.DEMO_PHOTOS)]
    (tmp_path / "cache" / "edgeknn" / "models").mkdir(parents=True)
    assert found()[0] == "None", "a fetch cut short (folders, no stamp) is not taken"
    (tmp_path / "cache" / "edgeknn" / datacli.FETCHED).write_text("done\n")
    assert found()[0] == str(tmp_path / "cache" / "edgeknn")
    (clone.parent.parent / "shared" / "models").mkdir(parents=True)
    assert found()[0] == str(clone.parent.parent / "shared"), "../shared first"


def test_the_log_gives_addresses_a_person_can_open():
    """Before: `http://<this host>:8080`, literally."""
    from edgeknn.web.server import page_addresses

    every = page_addresses("", 8080)
    assert every[0] == "http://localhost:8080" and all(a.endswith(":8080") for a in every)
    assert "<" not in " ".join(every) and len(every) <= 2
    assert page_addresses("::1", 80) == ["http://[::1]:80"]
    assert page_addresses("192.168.1.20", 8443, "https") == ["https://192.168.1.20:8443"]

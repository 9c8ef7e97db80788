"""The web page (edgeknn/web): its access rules over plain HTTP, then the page itself in Debian's
Chromium (selenium with /usr/bin/chromedriver), against a daemon on a replay of the sign digits.

Screenshots of a phone-sized viewport (390x844) go to /tmp/web-shots/.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL, TM, needs_data, phone_chromium
from rig import CLASSES, Running, Scene, make_config, photo_folders, stable_on, teach, wait_for

from edgeknn.bench.broker import free_port
from edgeknn.device.build import build
from edgeknn.model.tflite import Model
from edgeknn.store import archive, exchange
from edgeknn.store.knn import KnnStore
from edgeknn.web.server import WebOutput

PASSWORD = "correct horse battery"
SHOTS = Path("/tmp/web-shots")


def web_daemon(tmp_path: Path, **web) -> tuple[Running, Scene, int]:
    port = free_port()
    settings = {"enabled": True, "listen": "127.0.0.1", "port": port, "password": PASSWORD, **web}
    cfg = make_config(tmp_path, web=settings, panel={"kind": "none"})
    scene = Scene(photo_folders(tmp_path))
    return Running(build(cfg, opener=scene.opener)), scene, port


def page_of(run: Running) -> WebOutput:
    return next(o for o in run.daemon.outputs if isinstance(o, WebOutput))


class Client:
    """A plain HTTP client with a cookie jar: (status, JSON or bytes) for each request."""

    def __init__(self, port: int, tls=None):
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.jar = CookieJar()
        handlers: list = [urllib.request.HTTPCookieProcessor(self.jar)]
        if tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=tls))
        self.opener = urllib.request.build_opener(*handlers)

    def __call__(self, path: str, body: object = None, headers: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with self.opener.open(request, timeout=30) as response:
                status, raw, kind = response.status, response.read(), response.headers.get_content_type()
        except urllib.error.HTTPError as e:
            status, raw, kind = e.code, e.read(), e.headers.get_content_type()
        return status, json.loads(raw) if kind == "application/json" else raw

    def login(self, password: str = PASSWORD) -> str:
        status, body = self("/api/login", {"password": password})
        assert status == 200, body
        status, body = self("/api/session")
        assert status == 200, body
        return body["csrf"]


@pytest.fixture
def daemon(tmp_path):
    run, scene, port = web_daemon(tmp_path)
    yield run, scene, port
    run.stop()


def test_access_needs_the_session_and_changes_need_the_csrf_token(daemon):
    run, scene, port = daemon
    client = Client(port)
    assert client("/")[0] == 200, "the page itself (no secret in it) loads without a session"
    for path in ("/api/session", "/api/events", "/api/live.mjpg", "/api/examples", "/api/pictures/0.jpg"):
        status, body = client(path)
        assert status == 401 and body["error"] == "not logged in", (path, status, body)
    status, body = client("/api/add-example", {"class": "1"})
    assert status == 401, "a POST without a session is refused"
    assert client("/api/login", {"password": "wrong"})[0] == 401
    csrf = client.login()
    cookie = next(c for c in client.jar if c.name == "edgeknn_session")
    assert cookie.has_nonstandard_attr("HttpOnly") and cookie.get_nonstandard_attr("SameSite") == "Strict"

    assert run.classified()
    status, body = client("/api/add-example", {"class": "1"})
    assert status == 403 and "CSRF" in body["error"], body
    status, body = client("/api/add-example", {"class": "1"}, {"X-CSRF-Token": "0" * 64})
    assert status == 403, "a wrong token is refused too"
    assert run.daemon.store.counts()["1"] == 0, "nothing was added by the refused requests"
    status, body = client("/api/add-example", {"class": "1"}, {"X-CSRF-Token": csrf})
    assert status == 200 and body["ok"], body
    assert run.daemon.store.counts()["1"] == 1

    status, body = client("/api/add-example", {"class": "no such"}, {"X-CSRF-Token": csrf})
    assert status == 400 and body["error"], "the loop's refusal comes back as one line"
    status, body = client("/api/add-example", {"class": "1", "count": 0}, {"X-CSRF-Token": csrf})
    assert status == 400 and "count" in body["error"]
    status, body = client("/api/threshold", {"value": "high"}, {"X-CSRF-Token": csrf})
    assert status == 400 and "value" in body["error"]

    client("/api/logout", {}, {"X-CSRF-Token": csrf})
    assert client("/api/session")[0] == 401, "logged out"


def upload_to(client: Client, data: bytes, token: str | None, mode: str | None = None) -> tuple[int, dict]:
    """POST an archive to the page as the upload button does: (status, the JSON answer)."""
    query = "" if mode is None else f"?mode={mode}"
    request = urllib.request.Request(
        client.base + "/api/examples.tar" + query,
        data=data,
        headers={"Content-Type": "application/x-tar", **({"X-CSRF-Token": token} if token else {})},
    )
    try:
        with client.opener.open(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_download_and_upload_of_the_examples_as_an_archive(daemon, tmp_path):
    """Finding 10: uploading the page's own download back doubled every class; it adds nothing now, and
    says so. Replace brings the device back to the archive; a refused upload changes nothing."""
    run, scene, port = daemon
    client = Client(port)
    csrf = client.login()
    assert run.classified()
    for name in ("1", "2"):
        status, body = client("/api/add-example", {"class": name}, {"X-CSRF-Token": csrf})
        assert status == 200, body
    status, data = client("/api/examples.tar")
    assert status == 200 and isinstance(data, bytes)
    manifest = archive.Reader(io.BytesIO(data)).manifest
    assert manifest.classes == CLASSES and sum(e.picture is not None for e in manifest.examples) == 2
    assert client("/api/store.json")[1] == data, "the page's old link gives the same archive"

    assert upload_to(client, data, token=None)[0] == 403, "an upload needs the CSRF token too"
    status, body = upload_to(client, data, csrf)
    assert status == 200 and body["added"] == 0 and body["skipped"] == 2 and body["mode"] == "add", body
    assert run.daemon.store.counts() == {"1": 1, "2": 1, "5": 0}, "its own download adds nothing"

    status, body = client("/api/add-example", {"class": "5"}, {"X-CSRF-Token": csrf})
    assert status == 200, body
    status, body = upload_to(client, data, csrf, mode="replace")
    assert status == 200 and body["removed"] == 3 and body["added"] == 2, body
    assert run.daemon.store.counts() == {"1": 1, "2": 1, "5": 0}, "replace: the device is the archive"
    assert all(e.has_picture for e in run.daemon.store.examples()), "pictures came along"

    for bad, error in (
        (b"{ not json", "import: not JSON"),
        (b"\x00" * 4096, "import: not an edgeknn archive"),
        (data[: len(data) // 2], "import: cut short"),
    ):
        status, body = upload_to(client, bad, csrf)
        assert status == 400 and body["error"].startswith(error) and "\n" not in body["error"], body
    status, body = upload_to(client, data, csrf, mode="merge")
    assert status == 400 and body["error"].startswith("mode:"), body
    other = KnnStore(run.daemon.store.dim, "0" * 64)
    other.add("1", np.ones((1, other.dim), np.float32), added=1.7e9)
    buffer = io.BytesIO()
    exchange.export_store(other, buffer)
    status, body = upload_to(client, buffer.getvalue(), csrf)
    assert status == 400 and "another model" in body["error"], body
    assert run.daemon.store.counts() == {"1": 1, "2": 1, "5": 0}, "a refused upload changes nothing"


def first_jpeg(client: Client, path: str) -> bytes:
    """The first JPEG of a multipart live view (read up to its Content-Length)."""
    with client.opener.open(client.base + path, timeout=30) as response:
        assert response.headers.get_content_type() == "multipart/x-mixed-replace"
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += response.read(1)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        return response.read(length)


def test_the_live_view_shows_the_model_sized_or_the_full_frame(tmp_path):
    """A replay of the 100x100 digit photos: the model sees its input size, the full frame is the photo's."""
    import io

    from PIL import Image

    photos = photo_folders(tmp_path)["1"]
    port = free_port()
    cfg = make_config(
        tmp_path,
        web={"enabled": True, "listen": "127.0.0.1", "port": port, "password": PASSWORD},
        panel={"kind": "none"},
        camera={"source": f"replay:{photos}?fps=20"},
    )
    run = Running(build(cfg))
    try:
        page = page_of(run)
        assert run.classified()
        assert page.frames.encoded == 0
        client = Client(port)
        client.login()
        assert client("/api/session")[1]["full_frame"] is False, "smaller than the model's: not offered"
        assert Image.open(io.BytesIO(first_jpeg(client, "/api/live.mjpg"))).size == Model(MODEL).input_size
        assert Image.open(io.BytesIO(first_jpeg(client, "/api/live.mjpg?full=1"))).size == (100, 100)
    finally:
        run.stop()


def test_wrong_passwords_are_rate_limited(daemon):
    run, scene, port = daemon
    client = Client(port)
    statuses = [client("/api/login", {"password": f"guess {i}"})[0] for i in range(6)]
    assert statuses == [401] * 5 + [429], statuses
    status, body = client("/api/login", {"password": PASSWORD})
    assert status == 429 and "try again" in body["error"], "even the right one waits: no guessing by timing"


def post_raw(port: int, path: str, raw: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """POST bytes as they are (not JSON-encoded by the client): (status, the JSON answer)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=raw,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_hostile_bodies_get_one_line_not_a_traceback(daemon, caplog):
    """A login body is never read past 4 KiB, and JSON nested too deeply (login or upload) is a 400."""
    run, scene, port = daemon
    status, body = post_raw(port, "/api/login", b'{"password": "' + b"a" * 1_000_000 + b'"}')
    assert status == 413 and "at most" in body["error"], (status, body)
    status, body = post_raw(port, "/api/login", b"[" * 2000 + b"]" * 2000)
    assert status == 400 and "nested too deeply" in body["error"], (status, body)
    client = Client(port)
    csrf = client.login()
    cookie = next(c for c in client.jar if c.name == "edgeknn_session")
    headers = {"X-CSRF-Token": csrf, "Cookie": f"edgeknn_session={cookie.value}"}
    status, body = post_raw(port, "/api/store.json", b'{"a":' * 200_000 + b"1" + b"}" * 200_000, headers)
    assert status == 400 and "nested too deeply" in body["error"], (status, body)
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text


def test_class_names_from_the_page_follow_the_rules_of_every_other_source(daemon):
    """The page passes names unchecked: the loop refuses a reserved, over-long or odd one as MQTT does."""
    run, scene, port = daemon
    client = Client(port)
    csrf = {"X-CSRF-Token": client.login()}
    before = list(run.daemon.store.classes)
    for name in ("Unknown", "unrecognized", "y" * 10_000, "a/b", "été"):
        status, body = client("/api/add-class", {"class": name}, csrf)
        assert status == 400 and body["error"].startswith("class: expected"), (name[:40], status, body)
        status, body = client("/api/rename-class", {"class": before[0], "new_name": name}, csrf)
        assert status == 400 and body["error"].startswith("new_name: expected"), (name[:40], status, body)
    assert list(run.daemon.store.classes) == before
    status, body = client("/api/add-class", {"class": "cup"}, csrf)
    assert status == 200 and body["ok"], body


def test_a_generated_password_is_kept_private_and_reset_ends_the_sessions(tmp_path):
    from edgeknn.web.auth import reset_password

    run, scene, port = web_daemon(tmp_path, password="")
    try:
        kept = tmp_path / "web-password"
        assert kept.stat().st_mode & 0o777 == 0o600
        client = Client(port)
        client.login(kept.read_text().strip())
        assert client("/api/session")[0] == 200
        new = reset_password(tmp_path)
        assert client("/api/session")[0] == 401, "a new password ends every session"
        client.login(new)
    finally:
        run.stop()


def test_web_password_with_a_mistyped_state_dir_makes_nothing(tmp_path, capsys):
    from edgeknn.cli.main import main

    typo = tmp_path / "var" / "lib" / "edgeknnn"
    assert main(["web", "password", "--state-dir", str(typo)]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "var").exists(), "no folder, no password that the device would never use"
    assert main(["web", "password", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == (tmp_path / "web-password").read_text().strip()


def test_stop_closes_the_page_with_its_streams_and_a_new_daemon_keeps_the_sessions(tmp_path):
    """What a reload does: the daemon's shutdown closes the page (open streams too), the next daemon
    listens again, and a login made before still holds (sessions are signed, not kept in memory)."""
    import threading

    run, scene, port = web_daemon(tmp_path)
    client = Client(port)
    client.login()

    def watch(path: str) -> None:
        with contextlib.suppress(http.client.IncompleteRead, ConnectionError):
            client(path)  # a stream the stopping page cuts (it aborts every connection it has)

    paths = ("/api/live.mjpg", "/api/events")
    streams = [threading.Thread(target=watch, args=(p,), daemon=True) for p in paths]
    for thread in streams:
        thread.start()
    page = page_of(run)
    assert wait_for(lambda: page.frames.viewers == 1 and len(page.feed.listeners) == 1)
    run.stop()
    for thread in streams:
        thread.join(20)
        assert not thread.is_alive(), "the streams ended with the page"
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    again = Running(build(run.daemon.cfg, opener=scene.opener))
    try:
        assert wait_for(lambda: page_of(again).listening)
        assert client("/api/session")[0] == 200, "still logged in"
    finally:
        again.stop()


def test_edgeknn_run_generates_the_password_once_and_serves_the_page(tmp_path):
    """The real `edgeknn run`: no password set, so one is made, kept 0600 and logged once; a second
    start keeps it and does not log it again."""
    import os
    import signal
    import subprocess
    import sys

    photos = photo_folders(tmp_path)["1"]
    port = free_port()
    argv = ["run", "--source", f"replay:{photos}?fps=10", "--panel", "none", "--mqtt", "none"]
    argv += ["--model", str(MODEL), "--web", f"127.0.0.1:{port}"]
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path / "state"), "HOME": str(tmp_path)}
    logs = []
    for _ in range(2):
        log = tmp_path / f"run{len(logs)}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "edgeknn", *argv], stderr=out, env=env)
        try:
            assert wait_for(lambda log=log: "running:" in log.read_text(), 60), log.read_text()
            kept = tmp_path / "state" / "web-password"
            client = Client(port)
            client.login(kept.read_text().strip())
            assert client("/api/session")[1]["state"]["classes"] == {"one": 0, "two": 0, "three": 0}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        logs.append(log.read_text())
    password = (tmp_path / "state" / "web-password").read_text().strip()
    assert (tmp_path / "state" / "web-password").stat().st_mode & 0o777 == 0o600
    assert [password in text for text in logs] == [True, False], "said once, at the first start"
    assert all(f"page is at http://127.0.0.1:{port} " in text for text in logs), "the real address"
    assert not any(" ERROR " in text or "Traceback" in text for text in logs), logs


def test_a_taken_port_is_one_line_and_the_device_runs_on(tmp_path):
    """Something else on web.port (8080 by default): one line naming the key, no traceback, and the
    device classifies its source to the end and stops cleanly, as it would without the page."""
    import os
    import subprocess
    import sys

    photos = photo_folders(tmp_path)["1"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["run", "--source", f"replay:{photos}?fps=10&loop=0", "--panel", "none", "--mqtt", "none"]
        argv += ["--model", str(MODEL), "--web", f"127.0.0.1:{port}"]
        proc = subprocess.run(
            [sys.executable, "-m", "edgeknn", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, "HOME": str(tmp_path), "STATE_DIRECTORY": str(tmp_path / "state")},
        )
    err = proc.stderr
    said = [
        line
        for line in err.splitlines()
        if line.startswith("edgeknn: ") or " ERROR " in line or " WARNING " in line
    ]
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert len(said) == 1 and f"127.0.0.1:{port} (Address already in use)" in said[0], err
    assert "web.port" in said[0] and "the page is off" in said[0], err
    assert "camera source finished" in err and "stopped" in err.splitlines()[-1], err


def test_disabled_leaves_no_listening_socket(tmp_path):
    port = free_port()
    cfg = make_config(tmp_path, web={"enabled": False, "port": port}, panel={"kind": "none"})
    scene = Scene(photo_folders(tmp_path))
    run = Running(build(cfg, opener=scene.opener))
    try:
        assert run.classified()
        assert not [o for o in run.daemon.outputs if isinstance(o, WebOutput)]
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))
    finally:
        run.stop()


def test_tls_from_cert_and_key_files(tmp_path):
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    run, scene, port = web_daemon(tmp_path, tls_cert=str(cert), tls_key=str(key))
    try:
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        client = Client(port, tls=context)
        client.login()
        cookie = next(c for c in client.jar if c.name == "edgeknn_session")
        assert cookie.secure, "over TLS the session cookie is Secure"
        with pytest.raises(OSError):  # plain HTTP is not served on that port
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
    finally:
        run.stop()


def test_web_config_errors_name_the_key():
    from edgeknn import config

    with pytest.raises(config.ConfigError) as e:
        config.from_dict({"web": {"port": 0, "password": 12345, "tls_cert": "cert.pem", "listen": 1}})
    errors = "\n".join(e.value.errors)
    assert "web.port: expected an integer 1..65535, got 0" in errors
    assert "web.password: expected a string, got a value not shown here" in errors, "a secret is not echoed"
    assert "web.listen: expected a string" in errors
    with pytest.raises(config.ConfigError) as e:
        config.from_dict({"web": {"tls_cert": "cert.pem"}})
    assert e.value.errors == ["web.tls_key: expected both web.tls_cert and web.tls_key, or neither"]
    assert config.Config().web.enabled and config.Config().web.port == 8080


def test_unreadable_tls_files_are_one_line(tmp_path):
    from edgeknn.device.build import Fatal

    cfg = make_config(
        tmp_path,
        web={"enabled": True, "tls_cert": str(tmp_path / "no.pem"), "tls_key": str(tmp_path / "no.key")},
        panel={"kind": "none"},
    )
    with pytest.raises(Fatal) as e:
        build(cfg, opener=Scene(photo_folders(tmp_path)).opener)
    assert "web.tls_cert" in str(e.value) and "\n" not in str(e.value)


# --- the page in Chromium ---------------------------------------------------------------------------


@pytest.fixture
def browser():
    """Headless Debian Chromium at a phone's size. Fails (not skips) without it: .ci/run installs it."""
    yield from phone_chromium(scale=2)


def shot(driver, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def card(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'article.class[data-class="{name}"]')


def count_of(driver, name: str) -> int:
    from selenium.common.exceptions import WebDriverException

    try:
        return int(card(driver, name).find_element("css selector", ".count").text)
    except (WebDriverException, ValueError):
        return -1


def score_of(driver, name: str) -> float:
    from selenium.common.exceptions import WebDriverException

    try:
        return float(card(driver, name).get_attribute("data-score") or 0)
    except WebDriverException:
        return -1.0


def not_stale(predicate) -> bool:
    """``predicate()``, False while the page redraws the elements it reads."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        return bool(predicate())
    except StaleElementReferenceException:
        return False


def test_the_page_in_chromium(tmp_path, browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    run, scene, port = web_daemon(tmp_path)
    try:
        page = page_of(run)
        teach(run, scene, per_class=2)
        assert stable_on(run, "1")
        time.sleep(0.5)
        assert page.frames.encoded == 0, "no JPEG is encoded while nobody watches"
        driver = browser
        driver.get(f"http://127.0.0.1:{port}/")
        find = driver.find_element
        assert wait_for(lambda: find(By.ID, "password").is_displayed())
        find(By.ID, "password").send_keys("not the password")
        find(By.CSS_SELECTOR, "#login button").click()
        assert wait_for(lambda: "wrong password" in find(By.ID, "login-error").text)
        shot(driver, "1-login-refused")
        assert not find(By.ID, "main-view").is_displayed()
        find(By.ID, "password").send_keys(PASSWORD)
        find(By.CSS_SELECTOR, "#login button").click()
        assert wait_for(lambda: find(By.ID, "main-view").is_displayed())
        assert wait_for(lambda: all(count_of(driver, c) == 2 for c in CLASSES)), "counts from the state"

        # the live view: frames arrive and change (the replay loops over different photos)
        live = find(By.ID, "live")
        side = Model(MODEL).width
        assert wait_for(lambda: driver.execute_script("return arguments[0].naturalWidth", live) == side)
        first = live.screenshot_as_png
        assert wait_for(lambda: live.screenshot_as_png != first), "the live view's image changes"
        assert page.frames.viewers == 1 and page.frames.encoded > 1

        # the bars follow the camera: class 1 shown, then class 2
        assert wait_for(lambda: find(By.ID, "prediction").get_attribute("data-label") == "1")
        assert wait_for(lambda: score_of(driver, "1") > 0.5)
        shot(driver, "2-live-class-1")
        scene.shown = "2"
        assert wait_for(lambda: score_of(driver, "2") > 0.5 and score_of(driver, "1") < 0.5), "bars moved"
        assert wait_for(lambda: find(By.ID, "prediction").get_attribute("data-label") == "2")
        assert "stable" in (card(driver, "2").get_attribute("class") or "")

        # tapping "add one" adds one example of that class
        before = run.daemon.store.counts()["2"]
        add_one = card(driver, "2").find_element(By.CSS_SELECTOR, ".add-one")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", add_one)
        add_one.click()
        assert wait_for(lambda: count_of(driver, "2") == before + 1), "the count on the page went up"
        assert run.daemon.store.counts()["2"] == before + 1
        assert wait_for(
            lambda: not_stale(lambda: card(driver, "2").find_elements(By.CSS_SELECTOR, ".thumb img"))
        )
        shot(driver, "3-class-2-added")

        # holding "record" adds several, and stops when released
        record = card(driver, "2").find_element(By.CSS_SELECTOR, ".record")
        before = run.daemon.store.counts()["2"]
        ActionChains(driver).click_and_hold(record).perform()
        assert wait_for(lambda: run.daemon.store.counts()["2"] >= before + 3), "recording while held"
        shot(driver, "4-recording")
        ActionChains(driver).release(record).perform()
        assert wait_for(lambda: record.get_attribute("data-busy") is None), "the last request answered"
        settled = run.daemon.store.counts()["2"]
        time.sleep(1.5)
        assert run.daemon.store.counts()["2"] == settled, "no more examples after the release"
        assert wait_for(lambda: count_of(driver, "2") == settled)

        # a thumbnail is deleted (the thumbnails are redrawn after each change: retry a stale one)
        def thumb_ids() -> list[int]:
            return [
                int(t.get_attribute("data-id"))
                for t in card(driver, "2").find_elements(By.CSS_SELECTOR, ".thumb")
            ]

        assert wait_for(lambda: not_stale(lambda: len(thumb_ids()) >= 2))
        for _ in range(10):
            try:
                thumb = card(driver, "2").find_element(By.CSS_SELECTOR, ".thumb")
                victim, button = (
                    int(thumb.get_attribute("data-id")),
                    thumb.find_element(By.CSS_SELECTOR, ".delete"),
                )
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
                button.click()
                break
            except StaleElementReferenceException:
                continue
        assert wait_for(lambda: count_of(driver, "2") == settled - 1)
        assert victim not in [e.id for e in run.daemon.store.examples("2")]
        assert wait_for(lambda: not_stale(lambda: victim not in thumb_ids()))

        # a class is renamed
        c5 = card(driver, "5")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", c5)
        assert not c5.find_element(By.CSS_SELECTOR, ".rename-form").is_displayed()
        c5.find_element(By.CSS_SELECTOR, ".menu summary").click()
        c5.find_element(By.CSS_SELECTOR, ".rename").click()
        field = c5.find_element(By.CSS_SELECTOR, ".rename-input")
        field.clear()
        field.send_keys("five")
        shot(driver, "5-renaming")
        c5.find_element(By.CSS_SELECTOR, ".rename-form button[type=submit]").click()
        assert wait_for(lambda: "five" in run.daemon.store.classes and "5" not in run.daemon.store.classes)
        assert wait_for(lambda: count_of(driver, "five") == 2), "the card shows the new name"

        # a class is added, then removed (after the confirmation)
        field = find(By.ID, "new-class")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
        field.send_keys("seven")
        find(By.CSS_SELECTOR, "#add-class button").click()
        assert wait_for(lambda: run.daemon.store.classes[-1] == "seven")
        assert wait_for(lambda: count_of(driver, "seven") == 0), "a card for the new class"
        card(driver, "seven").find_element(By.CSS_SELECTOR, ".menu summary").click()
        card(driver, "seven").find_element(By.CSS_SELECTOR, ".remove").click()
        driver.switch_to.alert.accept()
        assert wait_for(lambda: "seven" not in run.daemon.store.classes)
        assert wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, 'article[data-class="seven"]'))

        # the threshold: the strictest, then automatic again (tests/test_page.py has the rest)
        scale = find(By.ID, "threshold-range")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", scale)
        scale.send_keys(Keys.END)
        assert wait_for(lambda: run.daemon.store.threshold == 1.0)
        assert wait_for(lambda: find(By.ID, "threshold-now").text == "1.00, set by hand")
        find(By.ID, "threshold-auto").click()
        assert wait_for(lambda: run.daemon.store.threshold is None)
        assert wait_for(lambda: find(By.ID, "threshold-now").text.startswith("automatic"))

        driver.execute_script("document.getElementById('health').scrollIntoView()")
        assert wait_for(lambda: "ok" in find(By.CSS_SELECTOR, '#health dd[data-key="camera"]').text)
        shot(driver, "6-health")

        # the examples downloaded (as the link does), then uploaded through the page: all already there
        # (finding 10: they were added again, doubling every class)
        client = Client(port)
        client.login()
        status, export = client("/api/examples.tar")
        assert status == 200, export
        exported = tmp_path / "examples.tar"
        exported.write_bytes(export)
        before = sum(run.daemon.store.counts().values())
        find(By.ID, "upload-file").send_keys(str(exported))
        find(By.CSS_SELECTOR, "#upload button").click()
        says = find(By.CSS_SELECTOR, "#upload .feedback")
        message = f"Added 0 examples; {before} were already here."
        assert wait_for(lambda: says.text == message), says.text
        assert sum(run.daemon.store.counts().values()) == before

        # the device reloads (its page closes, the next daemon's opens on the same port): the open page
        # comes back by itself, its login still valid, even when the next daemon takes longer to start
        # than the page's first retry (a Pi loading its model: the page showed the login form for good)
        cfg = run.daemon.cfg
        run.stop()
        assert wait_for(lambda: find(By.ID, "dot").get_attribute("class") == "dot down")
        time.sleep(13)  # past the page's STREAM_DOWN_S: it has opened its stream anew and asked again
        assert find(By.ID, "main-view").is_displayed(), "the login is kept while the device is away"
        run = Running(build(cfg, opener=scene.opener))
        page = page_of(run)
        back = wait_for(lambda: page.frames.viewers == 1 and len(page.feed.listeners) == 1, 30)
        dot, shown = find(By.ID, "dot").get_attribute("class"), find(By.ID, "main-view").is_displayed()
        assert back, f"{page.frames.viewers} viewers, {len(page.feed.listeners)} listeners, {dot!r}, {shown}"
        assert wait_for(lambda: find(By.ID, "dot").get_attribute("class") == "dot ok")

        # the page hidden: the live view closes and nothing is encoded any more
        driver.get("about:blank")
        assert wait_for(lambda: page.frames.viewers == 0 and not page.feed.listeners)
        encoded = page.frames.encoded
        time.sleep(1.0)
        assert page.frames.encoded == encoded, "no viewer, no JPEG"
    finally:
        run.stop()


@needs_data(TM)
def test_a_classifier_model_shows_its_top_answers_and_nothing_to_teach(tmp_path, browser):
    """The Teachable Machine export (a classifier: its own labels): bars of its answers, no teaching."""
    from selenium.webdriver.common.by import By

    samples = TM / "samples"
    folders: dict[str, Path] = {}
    for photo in sorted(samples.iterdir()):
        name = f"Class {photo.name[len('class')]}"  # classK_N.png shows Class K
        folders.setdefault(name, tmp_path / name).mkdir(exist_ok=True)
        (folders[name] / photo.name).symlink_to(photo)
    port = free_port()
    cfg = make_config(
        tmp_path,
        **{"model.path": str(TM / "model.tflite"), "panel.kind": "none"},
        web={"enabled": True, "listen": "127.0.0.1", "port": port, "password": PASSWORD},
    )
    scene = Scene(folders)
    run = Running(build(cfg, opener=scene.opener))
    try:
        driver = browser
        driver.get(f"http://127.0.0.1:{port}/")
        find = driver.find_element
        assert wait_for(lambda: find(By.ID, "password").is_displayed())
        find(By.ID, "password").send_keys(PASSWORD)
        find(By.CSS_SELECTOR, "#login button").click()
        assert wait_for(lambda: find(By.ID, "main-view").is_displayed())
        for shown in ("Class 1", "Class 2"):
            scene.shown = shown
            assert wait_for(
                lambda shown=shown: find(By.ID, "prediction").get_attribute("data-label") == shown
            )

        def names() -> list:
            return [e.get_attribute("data-class") for e in driver.find_elements(By.CSS_SELECTOR, "article")]

        assert wait_for(lambda: not_stale(lambda: sorted(names()) == ["Class 1", "Class 2"])), (
            "its answers' bars"
        )
        assert not driver.find_elements(By.CSS_SELECTOR, ".add-one, .record, .rename")
        assert not find(By.ID, "add-class").is_displayed()
        shot(driver, "7-classifier-model")
    finally:
        run.stop()

"""The page under hostile clients (issue 20): a slowloris never takes the device down, request heads and
bodies that never end are closed, connections are bounded per address and in all, the login limit is
counted before anything is awaited, logout ends the session on the server, failures from others never
lock an address out, and bad requests cost one log line per kind, never a traceback.

Several client addresses are loopback aliases (127.0.0.2, 127.0.0.3, ...: every 127/8 address is the
loopback on Linux); the device listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import test_web as webtests
from conftest import MODEL
from rig import photo_folders, wait_for

from edgeknn.web import limits
from edgeknn.web.auth import LOGIN_FAILURES, LOGIN_PRESSURE

PASSWORD = webtests.PASSWORD


def report(text: str) -> None:
    print(f"\n[figures] {text}")


class From:
    """HTTP from one loopback address (``source``), keeping the session cookie it was given."""

    def __init__(self, port: int, source: str):
        self.port, self.source, self.cookie, self.csrf = port, source, "", ""

    def __call__(self, method: str, path: str, body: object = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60, source_address=(self.source, 0))
        try:
            sent = {"Content-Type": "application/json", **(headers or {})}
            if self.cookie:
                sent["Cookie"] = f"edgeknn_session={self.cookie}"
            if self.csrf and method == "POST":
                sent.setdefault("X-CSRF-Token", self.csrf)
            conn.request(method, path, None if body is None else json.dumps(body), sent)
            response = conn.getresponse()
            raw = response.read()
            for name, value in response.getheaders():
                if name.lower() == "set-cookie" and value.startswith("edgeknn_session="):
                    self.cookie = value.split(";", 1)[0].split("=", 1)[1].strip('"')
            kind = response.getheader("Content-Type", "")
            return response.status, json.loads(raw) if kind.startswith("application/json") else raw
        finally:
            conn.close()

    def login(self, password: str = PASSWORD) -> int:
        status, _ = self("POST", "/api/login", {"password": password})
        if status == 200:
            self.csrf = self("GET", "/api/session")[1]["csrf"]
        return status


def half_open(port: int, source: str, data: bytes) -> socket.socket:
    """A connection from ``source`` that sent ``data`` (a request not finished) and waits."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(data)
    return s


def closed_by_server(s: socket.socket, timeout: float) -> bytes | None:
    """What the server sent before closing ``s`` within ``timeout`` s (b"" if nothing), else None."""
    s.settimeout(timeout)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return got
    except TimeoutError:
        return None
    return got


HALF_HEAD = b"POST /api/login HTTP/1.1\r\nHost: d\r\nConnection: close\r\nContent-Type: application/json\r\n"


@pytest.fixture
def daemon(tmp_path):
    run, scene, port = webtests.web_daemon(tmp_path)
    assert wait_for(lambda: webtests.page_of(run).listening)
    yield run, scene, port
    run.stop()


@pytest.fixture
def fast_clock(monkeypatch):
    """Head and body limits of a few seconds, so a test waits for them briefly."""
    monkeypatch.setattr(limits, "HEADER_TIMEOUT_S", 2.0)
    monkeypatch.setattr(limits, "BODY_BASE_S", 3.0)


def test_heads_and_bodies_that_never_end_are_closed(fast_clock, daemon, caplog):
    """Finding 1: a half-sent head, a head sent a byte at a time and a half-sent body are each closed
    by the server at their limit (aiohttp alone kept them open for ever); one log line per kind."""
    run, scene, port = daemon
    head = half_open(port, "127.0.0.2", b"GET / HTTP/1.1\r\nHost: device\r\n")
    body = half_open(port, "127.0.0.2", HALF_HEAD + b'Content-Length: 40\r\n\r\n{"password": "')
    trickle = half_open(port, "127.0.0.2", b"G")
    started = time.monotonic()
    for byte in b"ET / HTTP/1.1\r\nX-A: " + b"a" * 8:  # a byte every 0.3 s: never a whole head in 2 s
        try:
            trickle.send(bytes([byte]))
        except OSError:
            break
        time.sleep(0.3)
        if time.monotonic() - started > 8:
            break
    assert closed_by_server(head, 30) is not None, "a head never finished is closed"
    assert closed_by_server(trickle, 30) is not None, "a head sent a byte at a time is closed too"
    assert closed_by_server(body, 30) is not None, "a body never finished is closed"
    connections = webtests.page_of(run).connections
    assert connections is not None and connections.closed >= 3
    assert "Traceback" not in caplog.text
    assert caplog.text.count("no complete request headers") == 1, "one line for both heads"
    assert caplog.text.count("request body took") == 1
    client = From(port, "127.0.0.2")
    assert client.login() == 200, "the same address logs in once the slow ones are gone"
    for s in (head, body, trickle):
        s.close()


def test_connections_are_bounded_per_address_and_in_all(daemon):
    """Finding 1: past MAX_PER_ADDRESS open from one address, or MAX_CONNECTIONS in all, a connection is
    answered 503 at once and closed; another address still gets in until the total is reached."""
    run, scene, port = daemon
    held = [half_open(port, "127.0.0.2", HALF_HEAD) for _ in range(limits.MAX_PER_ADDRESS)]
    try:
        page = webtests.page_of(run)
        assert wait_for(lambda: page.connections is not None and page.connections.count >= len(held))
        extra = half_open(port, "127.0.0.2", HALF_HEAD)
        answer = closed_by_server(extra, 10)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
        assert From(port, "127.0.0.3").login() == 200, "another address is not refused"
        sources = [f"127.0.1.{i}" for i in range(1, 20)]
        while len(held) < limits.MAX_CONNECTIONS:
            held.append(half_open(port, sources[len(held) % len(sources)], HALF_HEAD))
        assert wait_for(lambda: page.connections.count >= limits.MAX_CONNECTIONS)
        answer = closed_by_server(half_open(port, "127.0.0.9", HALF_HEAD), 10)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503"), "over the total: refused"
        report(f"connections refused: {page.connections.refused} (open: {page.connections.count})")
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: From(port, "127.0.0.9").login() == 200, 30), "in again once they close"


def test_300_concurrent_half_sent_wrong_logins_check_at_most_ten(daemon):
    """Finding 5: 300 logins from one address, each body half sent, then finished together: the
    attempts are counted when they start (before the body is awaited), so at most LOGIN_FAILURES of
    them are checked (all 300 were on 8c0e435); the others are answered 429 or 503 at once."""
    run, scene, port = daemon
    body = json.dumps({"password": "wrong guess"}).encode()
    head = HALF_HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode()
    sockets = []
    for _ in range(300):
        with contextlib.suppress(OSError):  # refused outright: counts as not checked
            sockets.append(half_open(port, "127.0.0.2", head + body[:5]))
    time.sleep(2.0)  # every handler that will run has started and is waiting for its body
    statuses = []
    for s in sockets:
        with contextlib.suppress(OSError):
            s.sendall(body[5:])
    for s in sockets:
        answer = closed_by_server(s, 30)
        s.close()
        statuses.append(int(answer.split(b" ", 2)[1]) if answer and answer.startswith(b"HTTP/") else 0)
    access = webtests.page_of(run).access
    counts = {code: statuses.count(code) for code in sorted(set(statuses))}
    report(f"300 concurrent half-sent wrong logins: {access.checked} checked; answers {counts}")
    assert access.checked <= 10 and counts.get(401, 0) <= 10, counts
    assert From(port, "127.0.0.3").login() == 200, "an address that has not failed still gets in"


def test_logout_ends_the_session_wherever_its_cookie_was_copied(daemon):
    """Finding 6: a cookie taken before logout is no session after it (it worked for 30 days)."""
    run, scene, port = daemon
    owner = From(port, "127.0.0.2")
    assert owner.login() == 200
    thief = From(port, "127.0.0.3")
    thief.cookie = owner.cookie
    assert thief("GET", "/api/session")[0] == 200, "a copied cookie is the session"
    assert owner("POST", "/api/logout", {})[0] == 200
    assert thief("GET", "/api/session")[0] == 401, "logged out: the copy is no session"
    assert owner("GET", "/api/session")[0] == 401
    other = From(port, "127.0.0.4")
    assert other.login() == 200 and other("GET", "/api/session")[0] == 200, "other sessions live on"


def test_failures_from_others_slow_guessing_but_never_lock_out_an_address_that_has_not_failed(daemon):
    """Finding 7: 25 wrong passwords from 25 addresses (more than LOGIN_PRESSURE), then more from the
    same: the right password from a fresh address works at once (on 8c0e435 it was 429 for as long as
    wrong ones kept coming); the guessers are refused, and every attempt is slowed meanwhile."""
    run, scene, port = daemon
    assert LOGIN_PRESSURE < 25
    guessers = [From(port, f"127.0.2.{i}") for i in range(1, 26)]
    assert [g.login(f"guess {i}") for i, g in enumerate(guessers)] == [401] * 25
    again = [g.login("another guess") for g in guessers[:5]]
    assert again == [429] * 5, "an address that failed is held back while the guessing goes on"
    started = time.monotonic()
    owner = From(port, "127.0.3.1")
    assert owner.login() == 200, "a fresh address is never locked out"
    took = time.monotonic() - started
    report(f"owner's login after 30 wrong passwords from 25 addresses: {took:.2f} s")
    assert took < 90
    assert owner("GET", "/api/session")[0] == 200
    for _ in range(LOGIN_FAILURES):  # one address's own failures still lock it out
        From(port, "127.0.3.2").login("wrong")
    assert From(port, "127.0.3.2").login() == 429


def test_anonymous_bad_requests_are_one_line_per_kind_never_a_traceback(daemon, caplog):
    """Finding 8: a non-ASCII session cookie, a bad URL and an oversized header, 30 of each: answered
    401/400 (the cookie was a 500), at most one log line per kind, no traceback (one each before)."""
    run, scene, port = daemon
    kinds = {
        "cookie": "GET /api/session HTTP/1.1\r\nHost: d\r\nConnection: close\r\n"
        "Cookie: edgeknn_session=a.99999999.\u00e9\r\n\r\n",
        # Connection: close: aiohttp 3.8 answers this one 404 and keeps the connection for its 15 s
        # keep-alive (newer ones answer 400 and close); 30 of them were 7.5 minutes of this test
        "url": b"GET /%%zz\xff HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n",
        "header": b"GET / HTTP/1.1\r\nHost: d\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        "csrf": "POST /api/logout HTTP/1.1\r\nHost: d\r\nConnection: close\r\nX-CSRF-Token: \u00e9\r\n"
        "Content-Length: 0\r\n\r\n",
    }
    answers: dict[str, set] = {}
    for kind, request in kinds.items():
        data = request.encode() if isinstance(request, str) else request
        for i in range(30):
            answer = closed_by_server(half_open(port, f"127.0.4.{i + 1}", data), 20)
            assert answer is not None, f"{kind}: the server neither answered nor closed within 20 s"
            answers.setdefault(kind, set()).add(answer.split(b"\r\n", 1)[0])
    report(f"bad requests: answers {answers}; {len(caplog.text)} bytes of log")
    assert all(not any(b" 500 " in a for a in got) for got in answers.values()), answers
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text
    lines = [r for r in caplog.records if "bad request" in r.getMessage()]
    assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]  # a kind per aiohttp error type
    assert all(len(r.getMessage()) < 300 for r in lines)
    owner = From(port, "127.0.0.2")
    assert owner.login() == 200
    for token in ("\u00e9", "x" * 9000):  # a session's CSRF header: not ASCII, or over aiohttp's 8 190
        status, _ = owner("POST", "/api/threshold", {"value": 0.5}, {"X-CSRF-Token": token})
        assert status in (400, 403), status
    assert "Traceback" not in caplog.text


def test_a_slowloris_of_1100_connections_under_1024_descriptors_never_stops_the_device(tmp_path):
    """Finding 1: the real `edgeknn run` under `prlimit --nofile=1024` (systemd's soft limit, and the
    hard one too, so nothing can be raised) replaying the sign digits. 1 100 half-sent requests from 11
    addresses, re-opened as the server closes them, for 25 s: the device keeps classifying (the owner's
    event stream, open from before, keeps getting readings), never exits (it exited 78 on 8c0e435:
    "no readable images"), logs no traceback, and the owner logs in within 10 s after they close."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip("this test's own 1 100 sockets need a hard limit of open files over 1 400")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 4096, hard))
    photos = photo_folders(tmp_path)["1"]
    port = webtests.free_port()
    state = tmp_path / "state"
    state.mkdir()
    (state / "web-password").write_text(PASSWORD + "\n")
    argv = ["prlimit", "--nofile=1024:1024", sys.executable, "-m", "edgeknn", "run"]
    argv += ["--source", f"replay:{photos}?fps=10", "--panel", "none", "--mqtt", "none"]
    argv += ["--model", str(MODEL), "--web", f"127.0.0.1:{port}"]
    env = {**os.environ, "STATE_DIRECTORY": str(state), "HOME": str(tmp_path)}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stderr=out, env=env)
    try:
        assert wait_for(lambda: "running:" in log.read_text(), 90), log.read_text()
        owner = From(port, "127.0.0.200")
        assert owner.login() == 200
        readings = Readings(port, "127.0.0.200", owner.cookie)
        assert wait_for(lambda: readings.count >= 3, 60), "readings before the attack"
        stop = threading.Event()
        sources = [f"127.0.5.{i}" for i in range(1, 12)]
        opened = Slowloris(port, sources, 100, stop)
        assert wait_for(lambda: opened.opened >= 1100, 60), f"only {opened.opened} opened"
        before, started = readings.count, time.monotonic()
        time.sleep(25)
        during = readings.count - before
        assert proc.poll() is None, f"the device exited ({proc.returncode}) under the attack"
        stop.set()
        opened.join()
        closed_at = time.monotonic()
        late = From(port, "127.0.0.201")
        assert wait_for(lambda: late.login() == 200, 10, step=0.5), "the owner logs in within 10 s"
        login_s = time.monotonic() - closed_at
        report(
            f"slowloris 1100 under nofile=1024: {opened.opened} opened, {during} readings in "
            f"{closed_at - started:.0f} s of attack; owner's login {login_s:.1f} s after it ended"
        )
        assert during >= 5, "the device kept classifying during the attack"
        readings.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text and "no readable images" not in text, text[-3000:]
    assert len(text) < 20_000, f"{len(text)} bytes of log"


class Readings:
    """The owner's event stream, read on a thread: counts the readings it gets."""

    def __init__(self, port: int, source: str, cookie: str):
        self.count = 0
        self._sock = socket.socket()
        self._sock.bind((source, 0))
        self._sock.connect(("127.0.0.1", port))
        self._sock.sendall(
            f"GET /api/events HTTP/1.1\r\nHost: d\r\nCookie: edgeknn_session={cookie}\r\n\r\n".encode()
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self._sock.recv(65536):
                self.count += chunk.count(b"event: reading")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)


class Slowloris(threading.Thread):
    """``per_source`` half-sent requests from each of ``sources``, each re-opened when the server
    closes it, until ``stop``. ``opened`` counts connections made."""

    def __init__(self, port: int, sources: list[str], per_source: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.sources, self.per_source, self.stop = port, sources, per_source, stop
        self.opened = 0
        self.start()

    def _open(self, source: str) -> socket.socket | None:
        s = socket.socket()
        s.bind((source, 0))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", self.port))
        self.opened += 1
        return s

    def run(self) -> None:
        import selectors

        selector = selectors.DefaultSelector()
        pending: dict[socket.socket, str] = {}
        for source in self.sources:
            for _ in range(self.per_source):
                s = self._open(source)
                if s is not None:
                    pending[s] = source
                    selector.register(s, selectors.EVENT_WRITE)
        while not self.stop.is_set():
            for key, mask in selector.select(0.2):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                source = pending[s]
                try:
                    if mask & selectors.EVENT_WRITE:
                        s.send(HALF_HEAD)
                        selector.modify(s, selectors.EVENT_READ)
                        continue
                    if s.recv(4096):
                        continue  # a 503: the close follows
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                selector.unregister(s)  # closed by the server (or refused): open another
                del pending[s]
                s.close()
                again = self._open(source)
                if again is not None:
                    pending[again] = source
                    selector.register(again, selectors.EVENT_WRITE)
        for s in pending:
            s.close()
        selector.close()


def test_address_key_counts_an_ipv6_64_as_one_address():
    assert limits.address_key("2001:db8:1:2:aaaa::1") == limits.address_key("2001:db8:1:2:bbbb::9")
    assert limits.address_key("2001:db8:1:3::1") != limits.address_key("2001:db8:1:2::1")
    assert limits.address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert limits.address_key("192.0.2.7") == "192.0.2.7"


def test_the_unit_raises_the_descriptor_limit():
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "edgeknn.service").read_text()
    assert any(
        line.startswith("LimitNOFILE=") and int(line.split("=")[1]) > 1024 for line in unit.splitlines()
    )


def test_a_stopping_page_closes_the_connections_a_browser_keeps_alive(tmp_path):
    """A reload builds the next daemon in the same process: a kept-alive connection the old page left
    open (aiohttp 3.8 closes none of a server it did not start) took a browser's next request and never
    answered it, and the page stayed away for good. A stopped page closes every connection it had."""
    run, scene, port = webtests.web_daemon(tmp_path)
    try:
        assert wait_for(lambda: webtests.page_of(run).listening)
        kept = socket.create_connection(("127.0.0.1", port), timeout=30)
        kept.sendall(b"GET / HTTP/1.1\r\nHost: device\r\nConnection: keep-alive\r\n\r\n")
        first = kept.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:80]
        idle = socket.create_connection(("127.0.0.1", port), timeout=30)  # opened, nothing sent yet
        assert wait_for(lambda: webtests.page_of(run).connections.count == 2)
    finally:
        run.stop()
    for s in (kept, idle):
        assert closed_by_server(s, 10) is not None, "still open after the page stopped"
        s.close()

"""The page's bulk paths (web/transfer.py) against a real daemon: uploads never evict, their reply is their
outcome, a reload or stop answers one in flight, and a stop right after a download is prompt.

Findings of issue 20: 2 (a download outliving SIGTERM), 9 (silent eviction), 11 (a 503 for an import that
landed later), 12 (SIGHUP during an upload: no answer, sockets and memory left behind).
"""

from __future__ import annotations

import io
import json
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rig import Running, Scene, make_config, photo_folders, wait_for
from test_lifecycle import Device
from test_web import PASSWORD, Client, free_port, upload_to

from edgeknn.device.build import build
from edgeknn.model.embedder import Embedder
from edgeknn.store import exchange
from edgeknn.store.knn import KnnStore, StoreSettings
from edgeknn.web import transfer


def page_daemon(tmp_path: Path, **store) -> tuple[Running, Client, str]:
    port = free_port()
    web = {"enabled": True, "listen": "127.0.0.1", "port": port, "password": PASSWORD}
    cfg = make_config(
        tmp_path, web=web, panel={"kind": "none"}, store={"autosave_s": 0.5, "rule": "nearest", **store}
    )
    run = Running(build(cfg, opener=Scene(photo_folders(tmp_path)).opener))
    client = Client(port)
    return run, client, client.login()


def archive_for(store: KnnStore, examples: dict[str, int], added: float = 1.6e9) -> bytes:
    """An archive of ``examples`` (class: count) for ``store``'s model: random unit rows, six views each."""
    other = KnnStore(store.dim, store.model_id, StoreSettings(capacity=1000))
    rng = np.random.default_rng(7)
    for name, count in examples.items():
        for i in range(count):
            rows = np.abs(rng.standard_normal((6, store.dim), dtype=np.float32))
            other.add(name, rows / np.linalg.norm(rows, axis=1, keepdims=True), added=added + i)
    out = io.BytesIO()
    exchange.export_store(other, out)
    return out.getvalue()


def add_examples(run: Running, client: Client, csrf: str, name: str, count: int) -> None:
    assert run.classified()
    for _ in range(count):
        status, body = client("/api/add-example", {"class": name}, {"X-CSRF-Token": csrf})
        assert status == 200, body


def test_an_upload_into_full_classes_is_refused_and_evicts_nothing(tmp_path):
    """Finding 9: into full classes (store.capacity), an upload answered ok and silently evicted all
    of the device's own examples. It is refused now, saying how many would go, and nothing changes."""
    run, client, csrf = page_daemon(tmp_path, capacity=2)
    try:
        add_examples(run, client, csrf, "1", 2)
        mine = [(e.id, e.added) for e in run.daemon.store.examples()]
        status, body = upload_to(client, archive_for(run.daemon.store, {"1": 2}), csrf)
        assert status == 400 and not body["ok"], body
        assert "class '1' would have 4 examples, more than store.capacity (2)" in body["error"], body
        assert "2 of the device's examples would go" in body["error"] and "\n" not in body["error"]
        assert [(e.id, e.added) for e in run.daemon.store.examples()] == mine, (
            "nothing evicted, nothing added"
        )
        status, body = upload_to(client, archive_for(run.daemon.store, {"2": 2}), csrf)
        assert status == 200 and body["added"] == 2 and body["classes"]["1"] == 2, body
    finally:
        run.stop()


def test_an_import_the_page_stopped_waiting_for_never_lands_later(tmp_path, monkeypatch):
    """Finding 11: the reply was 503 "no reply within 30 s", yet the import was applied afterwards. Now
    an import the loop has not taken when the page gives up is called off; once taken, the page waits."""
    monkeypatch.setattr(transfer, "IMPORT_WAIT_S", 2.0)
    run, client, csrf = page_daemon(tmp_path)
    try:
        assert run.classified()
        run.daemon.stop()  # the loop stalls (as under a long save or a slow board): commands wait
        run.thread.join(10)
        data = archive_for(run.daemon.store, {"2": 3})
        status, body = upload_to(client, data, csrf)
        assert status == 503 and "nothing was imported" in body["error"], body
        run.daemon.resume()  # the loop comes back and finds the import in its queue: it does not apply it
        run.thread = threading.Thread(target=run.daemon.loop, daemon=True)
        run.thread.start()
        assert run.classified()
        assert run.daemon.store.counts()["2"] == 0, "the import the page gave up on did not land later"
        status, body = upload_to(client, data, csrf)
        assert status == 200 and body["added"] == 3, "with the loop running, the reply is the outcome"
        assert run.daemon.store.counts()["2"] == 3
    finally:
        run.stop()


def test_a_stop_or_reload_answers_an_upload_in_flight(tmp_path):
    """Finding 12: SIGHUP during an upload: the client never got an answer, and sockets and memory
    stayed behind. A reload shuts the page down as a stop does: the upload is answered at once."""
    run, client, csrf = page_daemon(tmp_path)
    data = archive_for(run.daemon.store, {"1": 20})
    cookie = next(c for c in client.jar if c.name == "edgeknn_session")
    port = int(client.base.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        head = (
            f"POST /api/examples.tar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(data)}\r\n"
            f"Content-Type: application/x-tar\r\nX-CSRF-Token: {csrf}\r\n"
            f"Cookie: edgeknn_session={cookie.value}\r\n\r\n"
        )
        sock.sendall(head.encode() + data[: len(data) // 2])  # half the body: the upload is in flight
        time.sleep(0.5)
        started = time.monotonic()
        stopping = threading.Thread(target=run.stop)
        stopping.start()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        answered = time.monotonic() - started
        stopping.join(30)
        assert answered < 5, f"answered at once, not when a timeout ran out ({answered:.1f} s)"
        assert time.monotonic() - started < 8, "and the stop went on (the upload's connection closed)"
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1])
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert status == 503 and body["error"] == transfer.CLOSING, answer
    assert run.daemon.store.counts()["1"] == 0, "nothing was imported"
    assert wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("edgeknn-upload")])
    assert not list(Path(tmp_path).glob(".upload-*")), "no temporary file left behind"


@pytest.mark.slow
def test_sigterm_right_after_a_download_exits_within_20_s(tmp_path):
    """Finding 2: after SIGTERM the log said `stopped` but the process lived on for 20 minutes (a
    download's thread). A download stalled by its client (it reads nothing) ends with the device."""
    port = free_port()
    state = tmp_path / "state"
    state.mkdir()
    embedder = Embedder(Path(make_config(tmp_path).model.path))
    store = KnnStore(embedder.dim, embedder.identity, StoreSettings(capacity=1000))
    rng = np.random.default_rng(3)
    for i in range(400):  # ~10 MB of rows: far more than the socket buffers hold
        rows = np.abs(rng.standard_normal((6, embedder.dim), dtype=np.float32))
        store.add(str(1 + i % 2), rows / np.linalg.norm(rows, axis=1, keepdims=True), added=1.6e9 + i)
    store.save(state / "store.npz")
    web = {"enabled": True, "listen": "127.0.0.1", "port": port, "password": PASSWORD}
    device = Device(tmp_path, web=web)
    try:
        client = Client(port)
        client.login()
        cookie = next(c for c in client.jar if c.name == "edgeknn_session")
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = (
            f"GET /api/examples.tar HTTP/1.1\r\nHost: x\r\nCookie: edgeknn_session={cookie.value}\r\n\r\n"
        )
        sock.sendall(request.encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "the download began"
        time.sleep(1.0)  # it stalls: the client reads no more
        started = time.monotonic()
        device.signal(signal.SIGTERM)
        code = device.proc.wait(30)
        took = time.monotonic() - started
        sock.close()
        assert code == 0 and took <= 20, (code, took, device.log[-2000:])
        assert "Traceback" not in device.log
    finally:
        device.close()


@pytest.mark.slow
def test_sighup_during_an_upload_answers_it_and_leaves_nothing_behind(tmp_path):
    """Finding 12 as it was seen: `edgeknn run`, an upload in flight, SIGHUP. The upload is answered
    (503: upload again), the page comes back, and no socket or temporary file stays behind."""
    port = free_port()
    web = {"enabled": True, "listen": "127.0.0.1", "port": port, "password": PASSWORD}
    device = Device(tmp_path, web=web)
    try:
        client = Client(port)
        csrf = client.login()
        store = KnnStore(1024, Embedder(Path(make_config(tmp_path).model.path)).identity)
        data = archive_for(store, {"1": 50})
        fds = len(list(Path(f"/proc/{device.proc.pid}/fd").iterdir()))
        cookie = next(c for c in client.jar if c.name == "edgeknn_session")
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (
            f"POST /api/examples.tar HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            f"X-CSRF-Token: {csrf}\r\nCookie: edgeknn_session={cookie.value}\r\n\r\n"
        )
        sock.sendall(head.encode() + data[: len(data) // 2])
        time.sleep(1.0)
        device.signal(signal.SIGHUP)
        started, answer = time.monotonic(), b""
        while not answer.rstrip().endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        took = time.monotonic() - started
        sock.close()
        assert answer.startswith(b"HTTP/1.1 503") and transfer.CLOSING.encode() in answer, answer
        assert took < 10, took
        assert device.wait_log("configuration reloaded") or device.wait_log("running:", 2), device.log[-2000:]
        client = Client(port)
        assert wait_for(lambda: _logs_in(client), 30), "the page is back after the reload"
        assert wait_for(lambda: len(list(Path(f"/proc/{device.proc.pid}/fd").iterdir())) <= fds + 2, 20)
        assert not list(device.state.glob(".upload-*")) and "Traceback" not in device.log
        assert device.stop() == 0
    finally:
        device.close()


def _logs_in(client: Client) -> bool:
    try:
        client.login()
    except (AssertionError, OSError):
        return False
    return True

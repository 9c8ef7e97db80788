"""What the web page costs: the loop's rate with one viewer on the live view and the event stream
against none, in the same run, and the memory of `edgeknn run` with one viewer against none.

The viewer is another process (``python -m edgeknn.bench.web URL PASSWORD``), as a phone would be: it
logs in, then reads the live view and the event stream and throws them away. Keys:

- ``pipeline_fps_web_none`` / ``pipeline_fps_web_viewer``: 1 / median ``Daemon.step`` time with the
  page served and nobody watching / with one viewer; ``web_viewer_ratio``: the median over the pairs
  of blocks of viewer / none (the issue's target: at least 0.9); ``pipeline_ratio_web_viewer``: the
  viewer's rate over the raw invoke rate, comparable with ``pipeline_ratio``.
- ``web_jpeg_fps``: live-view frames encoded per second with the viewer; ``web_jpeg_none``: frames
  encoded while nobody watched (0: no viewer, no JPEG).
- ``rss_web_none_mb`` / ``rss_web_viewer_mb``: VmRSS of `edgeknn run` (page on) after classifying
  with nobody watching, then after as long again with one viewer.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from http.cookiejar import CookieJar
from pathlib import Path
from typing import TYPE_CHECKING

from edgeknn import config
from edgeknn.bench.broker import end_process, free_port
from edgeknn.bench.inputs import BenchError, Setup

if TYPE_CHECKING:
    from edgeknn.device.daemon import Daemon

PASSWORD = "bench-viewer"
PAIRS = 5  # none / viewer block pairs (the ratio: their median)
MIN_BLOCK_S = 1.0  # each side of a pair runs pipeline blocks for this long at least: several live JPEGs


class Viewer:
    """The viewer process, started on entry and ended on exit."""

    def __init__(self, url: str):
        self.url = url
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Viewer:
        command = [sys.executable, "-m", "edgeknn.bench.web", self.url, PASSWORD]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            end_process(self.proc, timeout=5)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"web: {what} within {timeout:g} s")
        time.sleep(0.02)


def _for_a_while(block: Callable[[], list[float]]) -> list[float]:
    """Pipeline blocks for MIN_BLOCK_S at least (a fast machine runs a block in a fraction of the live
    view's frame interval); their step times."""
    steps: list[float] = []
    until = time.monotonic() + MIN_BLOCK_S
    while time.monotonic() < until:
        steps += block()
    return steps


def web_viewer(daemon: Daemon, block: Callable[[], list[float]], invoke_ms: float) -> dict[str, float]:
    """A pipeline ``ExtraBlock``: pairs of blocks, the page served and nobody watching, then one viewer."""
    from edgeknn.web.server import web_output

    port = free_port()
    cfg = config.WebConfig(listen="127.0.0.1", port=port, password=PASSWORD)
    with tempfile.TemporaryDirectory(prefix="edgeknn-bench-web-") as state:
        page = web_output(cfg, Path(state), daemon)
        page.start()
        if not page.listening:
            raise BenchError(f"web: the page did not start on 127.0.0.1:{port}")
        daemon.outputs.append(page)
        none: list[float] = []
        viewer: list[float] = []
        ratios: list[float] = []
        encoded_alone, encoded, watched_s = 0, 0, 0.0
        try:
            for _ in range(PAIRS):
                before = page.frames.encoded
                alone = _for_a_while(block)
                encoded_alone += page.frames.encoded - before
                with Viewer(page.url):
                    _wait(
                        lambda: page.frames.viewers == 1 and len(page.feed.listeners) == 1, "no viewer came"
                    )
                    before, t = page.frames.encoded, time.monotonic()
                    watched = _for_a_while(block)
                    encoded += page.frames.encoded - before
                    watched_s += time.monotonic() - t
                _wait(
                    lambda: page.frames.viewers == 0 and not page.feed.listeners, "the viewer did not leave"
                )
                none += alone
                viewer += watched
                ratios.append(statistics.median(alone) / statistics.median(watched))
        finally:
            daemon.outputs.remove(page)
            page.close()
    fps_viewer = 1 / statistics.median(viewer)
    return {
        "pipeline_fps_web_none": 1 / statistics.median(none),
        "pipeline_fps_web_viewer": fps_viewer,
        "web_viewer_ratio": statistics.median(ratios),
        "pipeline_ratio_web_viewer": fps_viewer * invoke_ms / 1000,
        "web_jpeg_fps": encoded / watched_s if watched_s else 0.0,
        "web_jpeg_none": float(encoded_alone),
    }


def web_memory(setup: Setup, results: dict[str, float]) -> None:
    """`edgeknn run` with the page on: VmRSS after classifying unwatched, then with one viewer."""
    from edgeknn.bench.process import edgeknn_command, to_toml

    port = free_port()
    store = setup.tmp / "web-store.npz"
    rcfg = setup.daemon_config(
        "web",
        store,
        fps=30,
        log_level="info",
        **{"web.enabled": True, "web.listen": "127.0.0.1", "web.port": port, "web.password": PASSWORD},
    )
    conf = setup.tmp / "run-web.toml"
    conf.write_text(to_toml(config.to_dict(rcfg)))
    log_path = setup.tmp / "run-web.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*edgeknn_command(), "run", "--config", str(conf)], stdout=log, stderr=log)
        try:
            _wait(
                lambda: _answers(url) or proc.poll() is not None, "`edgeknn run` did not serve the page", 60
            )
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise BenchError(f"`edgeknn run` ended early; its log ends:\n{tail}")
            time.sleep(setup.plan.settle_s)
            results["rss_web_none_mb"] = vm_rss_kb(proc.pid) / 1024
            with Viewer(url):
                time.sleep(setup.plan.settle_s)
                results["rss_web_viewer_mb"] = vm_rss_kb(proc.pid) / 1024
        finally:
            end_process(proc, timeout=10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def vm_rss_kb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    raise BenchError(f"process {pid}: no VmRSS in /proc/{pid}/status")


# --- the viewer process ----------------------------------------------------------------------------


def _drain(opener: urllib.request.OpenerDirector, url: str) -> None:
    try:
        with opener.open(url, timeout=30) as response:
            while response.read(65536):
                pass
    except OSError:
        pass


def view(url: str, password: str) -> None:
    """Log in, then read the live view and the event stream until killed."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    login = urllib.request.Request(
        url + "/api/login",
        data=json.dumps({"password": password}).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener.open(login, timeout=10).read()
    streams = [
        threading.Thread(target=_drain, args=(opener, url + path), daemon=True)
        for path in ("/api/live.mjpg", "/api/events")
    ]
    for thread in streams:
        thread.start()
    for thread in streams:
        thread.join()


if __name__ == "__main__":
    view(sys.argv[1], sys.argv[2])

#!/usr/bin/env python3
"""Issue 20's figures for the examples archive: a 3 000-example store (6 views each, the default model's
768-d rows, real photos as pictures); the archive's size per example; the peak memory (VmHWM, reset
before each step) of writing it, of reading it as a stream and of reading it whole; then a real
`edgeknn run` with the page on: the download's time and VmHWM, SIGTERM right after it, and the round
trip (the download uploaded with mode=replace into an empty device restores the same examples).

    python scripts/measure_archive.py [--examples 3000] [--code /work/main]   (prints a table)

Run it on a quiet machine if you can; it prints the load average beside the figures.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

SHARED = Path("/work/shared")
MODEL = SHARED / "models" / "mobilenet_v1_0.75_192_quant.tflite"
PHOTOS = SHARED / "data" / "sign_language_digits"
PASSWORD = "measure the archive"


def hwm_kb(pid: int | str = "self") -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def reset_hwm(pid: int | str = "self") -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the kernel's reset of the peak resident size


def build_store(path: Path, examples: int, storage: str) -> None:
    from edgeknn import jpeg
    from edgeknn.imagefiles import find_images, load_rgb
    from edgeknn.model.tflite import Model
    from edgeknn.store.knn import KnnStore, StoreSettings

    model = Model(MODEL)
    dim = 768
    pictures = [jpeg.encode(model.prepare(load_rgb(p, 384))) for p in find_images([PHOTOS])[:200]]
    classes = [str(d) for d in range(10)]
    store = KnnStore(dim, model.sha256, StoreSettings(capacity=examples, max_classes=10, storage=storage))
    rng = np.random.default_rng(0)
    for i in range(examples):
        rows = np.abs(rng.standard_normal((6, dim), dtype=np.float32))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        store.add(classes[i % 10], rows, pictures[i % len(pictures)])
    store.save(path)


def in_process(store_path: Path, out: Path) -> dict:
    """Write, stream-read and whole-read the archive in this process, VmHWM reset before each."""
    from edgeknn.model.tflite import Model
    from edgeknn.store import archive, exchange
    from edgeknn.store.knn import KnnStore, StoreSettings

    store = KnnStore.load(store_path, Model(MODEL).sha256, StoreSettings(capacity=10**6))
    figures: dict = {}
    reset_hwm()
    base = hwm_kb()
    start = time.perf_counter()
    with open(out, "wb") as f:
        exchange.export_store(store, f)
    figures["write_s"] = time.perf_counter() - start
    figures["write_hwm_mb"] = (hwm_kb() - base) / 1024
    del store
    reset_hwm()
    base = hwm_kb()
    start = time.perf_counter()
    with open(out, "rb") as f:
        count = sum(1 for _ in archive.Reader(f).examples())
    figures["stream_read_s"] = time.perf_counter() - start
    figures["stream_read_hwm_mb"] = (hwm_kb() - base) / 1024
    reset_hwm()
    base = hwm_kb()
    bundle = exchange.read_import(out)
    figures["whole_read_hwm_mb"] = (hwm_kb() - base) / 1024
    figures["examples"] = count
    figures["bytes_per_example"] = out.stat().st_size / max(count, 1)
    del bundle
    return figures


class Device:
    """`edgeknn run` with the page on, from ``code``'s checkout, on a replay of the photos."""

    def __init__(self, tmp: Path, name: str, store: Path | None, code: Path, port: int):
        self.state = tmp / name
        self.state.mkdir()
        if store is not None:
            _copy_store(store, self.state / "store.npz")
        config = tmp / f"{name}.toml"
        config.write_text(
            f'state_dir = "{self.state}"\nclasses = ["0","1","2","3","4","5","6","7","8","9"]\n'
            f'[model]\npath = "{MODEL}"\nthreads = 1\n'
            f"[store]\ncapacity = 1000\nautosave_s = 3600.0\n"
            f'[camera]\nsource = "replay:{PHOTOS / "1"}?fps=10"\n'
            f'[panel]\nkind = "none"\n[mqtt]\nenabled = false\n'
            f'[web]\nenabled = true\nlisten = "127.0.0.1"\nport = {port}\npassword = "{PASSWORD}"\n'
        )
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(code)}
        with open(self.log, "w") as log:
            command = [sys.executable, "-m", "edgeknn", "run", "--config", str(config)]
            self.proc = subprocess.Popen(command, stderr=log, cwd=code, env=env)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while "running:" not in self.log.read_text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"{name} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        self.call("/api/login", json.dumps({"password": PASSWORD}).encode(), "application/json")
        self.csrf = json.loads(self.call("/api/session"))["csrf"]

    def call(self, path: str, data: bytes | None = None, kind: str = "", timeout: float = 900) -> bytes:
        headers = {"Content-Type": kind} if kind else {}
        if data is not None and path != "/api/login":
            headers["X-CSRF-Token"] = self.csrf
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        with self.opener.open(request, timeout=timeout) as response:
            return response.read()

    def stop(self) -> tuple[int, float]:
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code, time.monotonic() - start


def _copy_store(source: Path, target: Path) -> None:
    import shutil

    shutil.copyfile(source, target)
    pictures = source.with_name(source.name + ".pictures")
    if pictures.is_dir():
        shutil.copytree(pictures, target.with_name(target.name + ".pictures"))


def free_port() -> int:
    from edgeknn.bench.broker import free_port

    return free_port()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--path", default="/api/examples.tar", help="download path (main's: /api/store.json)")
    parser.add_argument("--skip-roundtrip", action="store_true")
    parser.add_argument("--storage", default="uint8", choices=("uint8", "float32"),
                        help="the store's rows: uint8, what a device keeps for this model (auto)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="archive-"))
    store_path = tmp / "store.npz"
    build_store(store_path, args.examples, args.storage)
    rows: list[tuple[str, str]] = [("load average", " ".join(f"{x:.1f}" for x in os.getloadavg()))]
    if args.path.endswith(".tar"):
        for key, value in in_process(store_path, tmp / "cli.tar").items():
            rows.append((key, f"{value:.2f}" if isinstance(value, float) else str(value)))
    device = Device(tmp, "device", store_path, args.code, free_port())
    time.sleep(3)
    reset_hwm(device.proc.pid)
    base = hwm_kb(device.proc.pid)
    start = time.monotonic()
    data = device.call(args.path)
    rows.append(("download_s", f"{time.monotonic() - start:.1f}"))
    rows.append(("download_bytes", str(len(data))))
    rows.append(("download_hwm_mb", _grew(device.proc.pid, base)))
    code, took = device.stop()
    rows.append(("sigterm_after_download_s", f"{took:.1f} (exit {code})"))
    if not args.skip_roundtrip and args.path.endswith(".tar"):
        empty = Device(tmp, "empty", None, args.code, free_port())
        reset_hwm(empty.proc.pid)
        base = hwm_kb(empty.proc.pid)
        start = time.monotonic()
        reply = json.loads(empty.call("/api/examples.tar?mode=replace", data, "application/x-tar"))
        rows.append(("upload_s", f"{time.monotonic() - start:.1f}"))
        rows.append(("upload_hwm_mb", _grew(empty.proc.pid, base)))
        rows.append(("upload_reply", " ".join(f"{k}={reply.get(k)}" for k in ("ok", "added", "removed"))))
        code, took = empty.stop()
        rows.append(("roundtrip", _compare(store_path, empty.state / "store.npz")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _grew(pid: int, base: int) -> str:
    return f"{(hwm_kb(pid) - base) / 1024:.1f} (from {base / 1024:.0f})"


def _compare(original: Path, restored: Path) -> str:
    from edgeknn.model.tflite import Model
    from edgeknn.store.knn import KnnStore, StoreSettings

    settings = StoreSettings(capacity=10**6)
    a, b = (KnnStore.load(p, Model(MODEL).sha256, settings) for p in (original, restored))
    same = {
        "counts": a.counts() == b.counts(),
        "ids": [e.id for e in a.examples()] == [e.id for e in b.examples()],
        "times": [e.added for e in a.examples()] == [e.added for e in b.examples()],
        "rows exact": bool(np.array_equal(a.rows(), b.rows())),
        "pictures identical": all(a.picture(e.id) == b.picture(e.id) for e in a.examples()),
    }
    return ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in same.items())


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Issue 20, memory: the peak resident memory of `edgeknn run` with a 10 000-example store and the page on.

As `edgeknn bench`'s ``rss_mb`` (``bench/process.py``: a store of random non-negative unit rows, one
view each, the replay of the sign-language photos at 30 fps, READY on a notify socket, VmHWM after
it has classified for a while), with the web page served (nobody watching) unless ``--no-web``,
MQTT off, and the store's storage as configured (``--storage``; the code's default otherwise).
Printed: VmHWM and VmRSS, /proc/<pid>/smaps_rollup's split (anonymous, file-backed), the storage.

    python scripts/measure_memory.py [--examples N] [--storage S] [--no-web] [--mqtt] [--gpio] [--code DIR]

``--code``: measure another checkout (a re-run of this script with it first on sys.path).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path("/work/shared")
PHOTOS = SHARED / "data" / "sign_language_digits"


def status(pid: int) -> dict[str, float]:
    """VmHWM, VmRSS (MB) and smaps_rollup's Anonymous / Rss of ``pid``."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = float(line.split()[1]) / 1024
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Anonymous:", "Rss:")):
                out["smaps_" + line.split(":")[0]] = float(line.split()[1]) / 1024
    return out


def mappings(pid: int, top: int = 25) -> list[tuple[float, float, str]]:
    """The ``top`` mappings of ``pid`` by Rss, summed by file: (MB, anonymous MB, name)."""
    sizes: dict[str, list[float]] = {}
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                name = parts[5] if len(parts) > 5 else f"[anon {(end - start) >> 10} kB at {start:x}]"
            elif parts[0] in ("Rss:", "Anonymous:"):
                entry = sizes.setdefault(name, [0.0, 0.0])
                entry[0 if parts[0] == "Rss:" else 1] += float(parts[1]) / 1024
    ranked = sorted(((v[0], v[1], k) for k, v in sizes.items()), reverse=True)
    return ranked[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--storage", help="store.storage (default: the code's default)")
    parser.add_argument("--no-web", action="store_true", help="the page off (bench's rss_mb)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds classifying before reading")
    parser.add_argument("--code", type=Path, help="a checkout to measure instead of this one")
    parser.add_argument("--smaps", action="store_true", help="also the largest mappings")
    parser.add_argument("--mqtt", action="store_true", help="MQTT on, to a local mosquitto")
    parser.add_argument("--gpio", action="store_true", help="the GPIO panel, on gpiozero's mock pins")
    args = parser.parse_args()
    if args.code is not None and os.environ.get("MEASURE_MEMORY_CODE") != str(args.code):
        env = {**os.environ, "PYTHONPATH": str(args.code), "MEASURE_MEMORY_CODE": str(args.code)}
        return subprocess.call(
            [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env=env, cwd="/"
        )

    import edgeknn
    from edgeknn import config
    from edgeknn.bench.inputs import Plan, Setup, random_store
    from edgeknn.bench.process import edgeknn_command, notify_listener, to_toml, wait_for_ready
    from edgeknn.model.classifier import open_model
    from edgeknn.model.registry import DEFAULT_MODEL_FILE

    code = Path(edgeknn.__file__).parent.parent
    print(f"code: {code}")
    model = SHARED / "models" / DEFAULT_MODEL_FILE
    tmp = Path(tempfile.mkdtemp(prefix="measure-memory-"))
    cfg = config.from_dict({})
    storage = args.storage or cfg.store.storage
    overrides = {"store.storage": storage} if args.storage else {}
    embedder = open_model(model, 1)
    kept = embedder.storage if storage == "auto" else storage  # what `edgeknn run` keeps it in
    store_path = tmp / "store.npz"
    random_store(embedder, cfg, args.examples, seed=2, storage=kept).save(store_path)
    broker = None
    if args.mqtt:
        from edgeknn.bench.broker import Broker

        broker = Broker(tmp / "broker").start()
    setup = Setup(cfg, model, 2, PHOTOS, tmp, broker.address if broker else None, Plan.make(True))
    web = {} if args.no_web else {"web.enabled": True, "web.listen": "127.0.0.1", "web.port": 0}
    if web:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            web["web.port"] = s.getsockname()[1]
        web["web.password"] = "measure-memory"
    if args.gpio:
        web["panel.kind"] = "gpio"
    rcfg = setup.daemon_config(
        "mem", store_path, fps=30, log_level="info", **{"store.capacity": args.examples, **overrides, **web}
    )
    conf = tmp / "run.toml"
    conf.write_text(to_toml(config.to_dict(rcfg)))
    listener, env = notify_listener(tmp / "notify.sock")
    if args.gpio:
        env["GPIOZERO_PIN_FACTORY"] = "mock"
    log_path = tmp / "run.log"
    with open(log_path, "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            [*edgeknn_command(), "run", "--config", str(conf)], env=env, stdout=log, stderr=log
        )
        try:
            ready = wait_for_ready(listener, proc, 120)
            if ready is None:
                print(log_path.read_text(errors="replace")[-1500:])
                return 1
            time.sleep(args.settle)
            measured = status(proc.pid)
            if args.smaps:
                for rss, anon, what in mappings(proc.pid):
                    print(f"{rss:7.1f} MB  anon {anon:6.1f}  {what}")
        finally:
            proc.terminate()
            proc.wait(30)
            if broker is not None:
                broker.stop()
    info = {
        "examples": args.examples,
        "configured": rcfg.store.storage,
        "file_storage": kept,
        "web": not args.no_web,
        "mqtt": args.mqtt,
        "gpio": args.gpio,
        "ready_s": round(ready - started, 2),
        **{k: round(v, 1) for k, v in measured.items()},
    }
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

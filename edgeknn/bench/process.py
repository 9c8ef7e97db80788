"""Startup and memory of a real `edgeknn run` process with a 10 000-example store.

The process says READY on a notify socket the bench listens on (as systemd's would); its memory is
its VmHWM from /proc after it has classified for a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgeknn import config
from edgeknn.bench.broker import MosquittoSub, end_process
from edgeknn.bench.inputs import BenchError, Setup, random_store
from edgeknn.model.embedder import Embedder
from edgeknn.store.knn import KnnStore, storage_for

STARTUP_EXAMPLES = 10_000


def startup(setup: Setup, embedder: Embedder, results: dict[str, float]) -> None:
    """`edgeknn run` with a 10 000-example store: start → READY, first prediction, peak memory;
    then the same with the other storage (keys ending in ``_uint8`` or ``_float32``)."""
    cfg, tmp = setup.cfg, setup.tmp
    settings = dataclasses.replace(cfg.store.settings(embedder.storage), capacity=STARTUP_EXAMPLES)
    configured = storage_for(settings)
    for storage in (configured, "uint8" if configured == "float32" else "float32"):
        suffix = "" if storage == configured else f"_{storage}"
        store_path = tmp / f"startup-store{suffix}.npz"
        random_store(embedder, cfg, STARTUP_EXAMPLES, seed=2, storage=storage).save(store_path)
        if storage == configured:
            loads = []
            for _ in range(3):
                t = time.perf_counter()
                KnnStore.load(store_path, embedder.identity, settings)
                loads.append(time.perf_counter() - t)
            results["store_load_ms"] = statistics.median(loads) * 1000
        measured: dict[str, float] = {}
        run_process(setup, store_path, storage, measured)
        results.update({key + suffix: value for key, value in measured.items()})


def run_process(setup: Setup, store_path: Path, storage: str, results: dict[str, float]) -> None:
    """One `edgeknn run` subprocess on ``store_path``: startup_s, first_prediction_s, rss_mb."""
    tmp, broker, plan = setup.tmp, setup.broker, setup.plan
    rcfg = setup.daemon_config(
        f"run{storage}",
        store_path,
        fps=30,
        log_level="info",
        **{"store.capacity": STARTUP_EXAMPLES, "store.storage": storage},
    )
    conf = tmp / f"run-{storage}.toml"
    conf.write_text(to_toml(config.to_dict(rcfg)))
    first = None  # a subscriber that ends at the first prediction: the daemon is classifying
    if broker is not None:
        first = MosquittoSub.start(broker, f"{rcfg.resolved_base_topic()}/prediction", count=1)
    listener, env = notify_listener(tmp / f"notify-{storage}.sock")
    log_path = tmp / f"run-{storage}.log"
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*edgeknn_command(), "run", "--config", str(conf)], env=env, stdout=log, stderr=log
        )
        try:
            ready = wait_for_ready(listener, proc, 60)
            if ready is None:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise BenchError(f"`edgeknn run` did not become ready; its log ends:\n{tail}")
            results["startup_s"] = ready - t0
            results["rss_ready_mb"] = vm_hwm_kb(proc.pid) / 1024
            if first is not None and first.ended(60):
                results["first_prediction_s"] = time.monotonic() - t0
            time.sleep(plan.settle_s)  # classifying for a while
            if proc.poll() is not None:
                raise BenchError(f"`edgeknn run` ended early (status {proc.returncode})")
            results["rss_mb"] = vm_hwm_kb(proc.pid) / 1024
        finally:
            end_process(proc, timeout=10)
            if first is not None:
                first.stop()
            listener.close()


def to_toml(table: dict[str, Any], prefix: str = "") -> str:
    """A config dict (``config.to_dict``) as TOML: values first, then one [section] per sub-table."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in table.items() if not isinstance(value, dict)]
    for key, value in table.items():
        if isinstance(value, dict):
            lines += ["", f"[{prefix}{key}]", to_toml(value, f"{prefix}{key}.")]
    return "\n".join(lines) + "\n"


def edgeknn_command() -> list[str]:
    """The `edgeknn` script beside this interpreter, else the CLI through this interpreter."""
    script = Path(sys.executable).parent / "edgeknn"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from edgeknn.cli.main import main; sys.exit(main())"]


def notify_listener(path: Path) -> tuple[socket.socket, dict[str, str]]:
    """A socket at ``path`` that receives an `edgeknn run`'s sd_notify messages (READY=1: see
    ``wait_for_ready``), and the environment that points the process at it (none of this shell's
    systemd watchdog or journal settings)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    env = {**os.environ, "NOTIFY_SOCKET": str(path)}
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID"):
        env.pop(name, None)
    return listener, env


def wait_for_ready(listener: socket.socket, proc: subprocess.Popen, timeout: float) -> float | None:
    """The time READY=1 arrived on ``listener``; None if ``proc`` ended or ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        listener.settimeout(0.2)
        try:
            message = listener.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in message.split(b"\n"):
            return time.monotonic()
    return None


def vm_hwm_kb(pid: int) -> float:
    """The peak resident memory (VmHWM) of process ``pid``, in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    raise BenchError(f"process {pid}: no VmHWM in /proc/{pid}/status")

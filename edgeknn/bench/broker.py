"""Mosquitto for the bench and the tests: one launcher, and mosquitto_sub as an arrival stamper.

A Broker listens on free ports on 127.0.0.1 only, with its config, log and (optional) persistence in
its own directory, and is stopped by its PID: nothing here touches a process it did not start.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edgeknn import config

HOST = "127.0.0.1"
SEARCHED = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


def find_binary(name: str) -> str | None:
    """``name`` on PATH or in the usual folders (mosquitto lives in /usr/sbin, often not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    return next((str(Path(f) / name) for f in SEARCHED if os.access(Path(f) / name, os.X_OK)), None)


def find_mosquitto() -> str | None:
    return find_binary("mosquitto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def end_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    """Send ``sig`` to a process we started, then SIGKILL if it has not ended after ``timeout``."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


class Broker:
    """One Mosquitto process on 127.0.0.1: ``start()``, ``stop()`` (SIGTERM), ``kill()`` (SIGKILL),
    ``restart()`` on the same ports. ``users`` turns anonymous access off; ``certs`` adds a TLS
    listener on ``tls_port`` that requires a client certificate. RuntimeError when mosquitto is
    not installed or does not start."""

    def __init__(
        self,
        directory: Path,
        *,
        users: dict[str, str] | None = None,
        persistence: bool = False,
        certs: Certs | None = None,
    ):
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = free_port()
        self.tls_port = free_port() if certs else None
        self.log_path = directory / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        lines = [f"user {getpass.getuser()}"] if os.geteuid() == 0 else []  # root would switch to "mosquitto"
        lines += [
            "per_listener_settings false",
            f"allow_anonymous {'false' if users else 'true'}",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {directory}/",
            "autosave_interval 1",
            f"log_dest file {self.log_path}",
            *(f"log_type {t}" for t in ("error", "warning", "notice", "information", "subscribe")),
            f"listener {self.port} {HOST}",
        ]
        if users:
            lines.append(f"password_file {self._password_file(users)}")
        if certs:
            lines += [
                f"listener {self.tls_port} {HOST}",
                f"cafile {certs.ca}",
                f"certfile {certs.server_cert}",
                f"keyfile {certs.server_key}",
                "require_certificate true",
            ]
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def _password_file(self, users: dict[str, str]) -> Path:
        passwd = self.directory / "passwd"
        passwd.touch(mode=0o600)
        tool = find_binary("mosquitto_passwd") or "mosquitto_passwd"
        for i, (user, password) in enumerate(users.items()):
            create = ["-c"] if i == 0 else []
            cmd = [tool, "-b", *create, str(passwd), user, password]
            subprocess.run(cmd, check=True, capture_output=True)
        return passwd

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self, timeout: float = 5.0) -> Broker:
        assert self.proc is None, "broker already running"
        proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.proc = proc
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start: {err}\n{self.log()}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not listen on {self.port} in {timeout} s") from None
                time.sleep(0.02)

    def _end(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        end_process(proc, sig)
        if proc.stderr:
            proc.stderr.close()

    def stop(self) -> None:
        """SIGTERM: clients get a clean close, persistence is saved."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes as if the machine lost power."""
        self._end(signal.SIGKILL)

    def restart(self) -> Broker:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def reachable_broker(cfg: config.Config) -> tuple[str, int] | None:
    """The configured broker, if it takes anonymous plain connections and answers now."""
    if not cfg.mqtt.enabled or cfg.mqtt.tls or cfg.mqtt.username:
        return None
    try:
        socket.create_connection((cfg.mqtt.host, cfg.mqtt.port), timeout=0.5).close()
    except OSError:
        return None
    return (cfg.mqtt.host, cfg.mqtt.port)


class MosquittoSub:
    """mosquitto_sub in its own process (it takes no CPU time or GIL from the bench's threads).

    With ``output`` it stamps each message's arrival (``%U``) into that file, read by ``arrivals()``
    once it has ended; with ``count`` it ends by itself after that many messages.
    """

    def __init__(self, proc: subprocess.Popen, output: Path | None):
        self.proc, self.output = proc, output

    @classmethod
    def start(
        cls, broker: tuple[str, int], topic: str, output: Path | None = None, count: int = 0
    ) -> MosquittoSub | None:
        """None when mosquitto_sub is not installed."""
        binary = find_binary("mosquitto_sub")
        if binary is None:
            return None
        host, port = broker
        cmd = [binary, "-h", host, "-p", str(port), "-t", topic, "-q", "1"]
        cmd += ["-C", str(count)] if count else []
        if output is None:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            with open(output, "wb") as out:
                proc = subprocess.Popen([*cmd, "-F", "%U %p"], stdout=out, stderr=subprocess.DEVNULL)
        return cls(proc, output)

    def ended(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for it to end by itself (``count`` messages came)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self) -> None:
        """SIGTERM (it flushes its output), SIGKILL if that does not end it."""
        end_process(self.proc)

    def arrivals(self) -> dict[int, float]:
        """{frame number: arrival time} of the prediction payloads in the output file."""
        arrivals: dict[int, float] = {}
        if self.output is None:
            return arrivals
        for line in self.output.read_text(errors="replace").splitlines():
            stamp, _, payload = line.partition(" ")
            try:
                arrivals[int(json.loads(payload)["frame"])] = float(stamp)
            except (ValueError, KeyError, TypeError):
                continue
        return arrivals

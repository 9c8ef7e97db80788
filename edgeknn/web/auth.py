"""Who may use the page: the password and the login rate limit (the sessions are in ``sessions``).

The password is ``web.password``, else the first line of ``web.password_file``, else one generated at
the first start and kept in ``<state_dir>/web-password`` (mode 0600; `edgeknn web password` shows or
resets it). It is read again when its file changes, and a new password ends every session.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from collections import deque
from pathlib import Path

from edgeknn.config import WebConfig
from edgeknn.smallfiles import FileRefused, read_small

log = logging.getLogger(__name__)

PASSWORD_FILE = "web-password"
MAX_SECRET_BYTES = 4096  # a password file larger than this is not a password file
LOGIN_FAILURES = 5  # wrong passwords (and attempts under way) per address per LOGIN_WINDOW_S
LOGIN_PRESSURE = 20  # wrong passwords from all addresses per LOGIN_WINDOW_S that slow every attempt
LOGIN_SLOW_S = 1.0  # how long each attempt then waits for its answer
LOGIN_WINDOW_S = 60.0
MAX_ADDRESSES = 10_000  # addresses whose failures are remembered (a botnet's cost no memory beyond)


class AuthError(Exception):
    """The password cannot be had (an unreadable password_file): one line naming the key."""


def generated_password_path(state_dir: Path) -> Path:
    return Path(state_dir) / PASSWORD_FILE


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        folder = os.stat(path.parent)
        if os.geteuid() == 0 and folder.st_uid != 0:  # `sudo edgeknn web password`: the device must read it
            os.fchown(fd, folder.st_uid, folder.st_gid)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _first_line(path: Path, key: str) -> str:
    try:
        data = read_small(path, MAX_SECRET_BYTES)
    except FileRefused as e:
        raise AuthError(f"{key}: {path}: {e.why}; expected a file whose first line is the password") from None
    except OSError as e:
        raise AuthError(f"{key}: cannot read {path} ({e.strerror or e})") from None
    line = data.decode("utf-8", "replace").splitlines()[0] if data.strip() else ""
    if not line:
        raise AuthError(f"{key}: {path} is empty; expected the password on its first line")
    return line


def new_password() -> str:
    """A generated password: 16 characters a person can type on a phone (about 95 bits)."""
    return secrets.token_urlsafe(12)


def reset_password(state_dir: Path) -> str:
    """Write a new generated password (ending every session) and return it."""
    password = new_password()
    write_private(generated_password_path(state_dir), password + "\n")
    return password


class Passwords:
    """Where the password comes from, read again when its file changes (a reset takes effect at once)."""

    def __init__(self, cfg: WebConfig, state_dir: Path):
        self.cfg, self.state_dir = cfg, Path(state_dir)
        self._cached: tuple[object, str] | None = None

    @property
    def source(self) -> str:
        """Which setting holds the password: for `edgeknn web password` and the log."""
        if self.cfg.password:
            return "web.password"
        if self.cfg.password_file:
            return f"web.password_file ({self.cfg.password_file})"
        return str(generated_password_path(self.state_dir))

    def ensure(self) -> None:
        """Generate the password at a first start (none configured, none kept) and say it once."""
        if self.cfg.password or self.cfg.password_file:
            self.current()  # an unreadable password_file is said at start, not at the first login
            return
        path = generated_password_path(self.state_dir)
        if path.exists():
            return
        password = reset_password(self.state_dir)
        log.info(  # INFO: into the journal once, and not a fault
            "web: no password configured; generated this one: %s (kept in %s; "
            "`edgeknn web password --state-dir %s` shows it again or --reset makes a new one)",
            password,
            path,
            self.state_dir,
        )

    def current(self) -> str:
        if self.cfg.password:
            return self.cfg.password
        if self.cfg.password_file:
            path, key = Path(self.cfg.password_file), "web.password_file"
        else:
            path, key = generated_password_path(self.state_dir), "web password"
        try:
            st = os.stat(path)
            stamp: object = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if self._cached is not None and stamp is not None and self._cached[0] == stamp:
            return self._cached[1]
        password = _first_line(path, key)
        self._cached = (stamp, password)
        return password

    def check(self, attempt: str) -> bool:
        """Constant-time comparison with the current password."""
        return hmac.compare_digest(attempt.encode("utf-8"), self.current().encode("utf-8"))


class LoginLimiter:
    """How many passwords an address may try: counted when an attempt starts, before anything is awaited
    (``begin``), so concurrent attempts whose bodies are still coming count too, and settled when it
    ends (``end``: right, or a failure, which a body that never came is too).

    An address may have LOGIN_FAILURES failures and attempts under way within LOGIN_WINDOW_S. Failures
    from others never lock an address out: when all addresses together failed LOGIN_PRESSURE times in
    the window, every attempt waits LOGIN_SLOW_S before its answer and an address that failed even once
    waits for the window; one that has not failed still gets in.
    """

    def __init__(self, per_address: int = LOGIN_FAILURES, pressure: int = LOGIN_PRESSURE):
        self.per_address, self.pressure = per_address, pressure
        self._failures: dict[str, deque[float]] = {}
        self._pending: dict[str, int] = {}
        self._all: deque[float] = deque()

    def _prune(self, times: deque[float], now: float) -> None:
        while times and now - times[0] >= LOGIN_WINDOW_S:
            times.popleft()

    def under_pressure(self, now: float | None = None) -> bool:
        """Whether all addresses together failed LOGIN_PRESSURE times within the window."""
        self._prune(self._all, time.monotonic() if now is None else now)
        return len(self._all) >= self.pressure

    def delay(self) -> float:
        """Seconds an attempt waits before its answer: LOGIN_SLOW_S under pressure, else none."""
        return LOGIN_SLOW_S if self.under_pressure() else 0.0

    def retry_after(self, address: str, now: float | None = None) -> float:
        """0 if ``address`` may try now, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        mine = self._failures.get(address, deque())
        self._prune(mine, now)
        if not mine:
            self._failures.pop(address, None)
        limit = 1 if self.under_pressure(now) else self.per_address
        if len(mine) + self._pending.get(address, 0) < limit:
            return 0.0
        return max(LOGIN_WINDOW_S - (now - mine[0]), 1.0) if mine else 1.0

    def begin(self, address: str, now: float | None = None) -> float:
        """Count an attempt from ``address`` (call before any await): 0, and ``end`` must follow; or
        the seconds until it may try (refused: no ``end``)."""
        wait = self.retry_after(address, now)
        if wait <= 0:
            self._pending[address] = self._pending.get(address, 0) + 1
        return wait

    def end(self, address: str, failed: bool, now: float | None = None) -> None:
        """An attempt ``begin`` let through is over: ``failed`` (a wrong password, or no password came)."""
        left = self._pending.get(address, 1) - 1
        if left > 0:
            self._pending[address] = left
        else:
            self._pending.pop(address, None)
        if not failed:
            return
        now = time.monotonic() if now is None else now
        if address not in self._failures and len(self._failures) >= MAX_ADDRESSES:
            self._failures.pop(next(iter(self._failures)))  # the address tracked longest: forgotten
        self._failures.setdefault(address, deque()).append(now)
        self._all.append(now)
        while len(self._all) > MAX_ADDRESSES:
            self._all.popleft()

"""Who may use the page: the password, signed session cookies, CSRF tokens and the login rate limit.

The password is ``web.password``, else the first line of ``web.password_file``, else one generated at
the first start and kept in ``<state_dir>/web-password`` (mode 0600; `edgeknn web password` shows or
resets it). Sessions are signed, not stored: a cookie is ``<id>.<expiry>.<mac>``, the MAC keyed by a
random secret kept in ``<state_dir>/web-secret`` (0600) *and* the password, so sessions outlive a reload
or a restart and a new password ends every one of them. The CSRF token is a MAC of the session id:
nothing to store, and a page of another site can neither read nor guess it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import deque
from pathlib import Path

from edgeknn import smallfiles
from edgeknn.config import WebConfig
from edgeknn.smallfiles import FileRefused, read_small

log = logging.getLogger(__name__)

PASSWORD_FILE = "web-password"
SECRET_FILE = "web-secret"
MAX_SECRET_BYTES = 4096  # a password file larger than this is not a password file
SESSION_S = 30 * 24 * 3600  # a login lasts 30 days
LOGIN_FAILURES = 5  # wrong passwords allowed per address per LOGIN_WINDOW_S,
LOGIN_FAILURES_ALL = 20  # and from all addresses together
LOGIN_WINDOW_S = 60.0


class AuthError(Exception):
    """The password cannot be had (an unreadable password_file): one line naming the key."""


def generated_password_path(state_dir: Path) -> Path:
    return Path(state_dir) / PASSWORD_FILE


def _write_private(path: Path, text: str) -> None:
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
    _write_private(generated_password_path(state_dir), password + "\n")
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
            "`edgeknn web password` shows it again or --reset makes a new one)",
            password,
            path,
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


def load_secret(state_dir: Path) -> bytes:
    """The random key that signs sessions, made at the first start."""
    path = Path(state_dir) / SECRET_FILE
    try:
        data = bytes.fromhex(read_small(path, MAX_SECRET_BYTES).decode("ascii").strip())
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:  # damaged: a new key (every session ends), said once
        log.warning("web: %s: %s; making a new one (everyone logs in again)", path,
                    smallfiles.reason(e) if isinstance(e, OSError) else "not a key")  # fmt: skip
    secret = secrets.token_bytes(32)
    _write_private(path, secret.hex() + "\n")
    return secret


class Sessions:
    """Signed session tokens and their CSRF tokens, keyed by the secret and the current password."""

    def __init__(self, passwords: Passwords, secret: bytes):
        self.passwords, self.secret = passwords, secret

    def _key(self) -> bytes:
        return hmac.new(self.secret, self.passwords.current().encode("utf-8"), hashlib.sha256).digest()

    def _mac(self, key: bytes, text: str) -> str:
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()

    def new(self, now: float | None = None) -> str:
        sid = secrets.token_urlsafe(16)
        expires = int((now or time.time()) + SESSION_S)
        body = f"{sid}.{expires}"
        return f"{body}.{self._mac(self._key(), 'session:' + body)}"

    def valid(self, token: str | None, now: float | None = None) -> str | None:
        """The session id of a valid, unexpired token, else None."""
        if not token or token.count(".") != 2:
            return None
        sid, expires, mac = token.split(".")
        try:
            expired = int(expires) < (now or time.time())
            key = self._key()
        except (ValueError, AuthError):
            return None
        if not hmac.compare_digest(mac, self._mac(key, f"session:{sid}.{expires}")) or expired:
            return None
        return sid

    def csrf(self, sid: str) -> str:
        return self._mac(self._key(), "csrf:" + sid)

    def csrf_ok(self, sid: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf(sid))


class LoginLimiter:
    """Refuses logins from an address after LOGIN_FAILURES wrong passwords within LOGIN_WINDOW_S (and
    from everyone after LOGIN_FAILURES_ALL), until the oldest of them is that old."""

    def __init__(self, per_address: int = LOGIN_FAILURES, overall: int = LOGIN_FAILURES_ALL):
        self.per_address, self.overall = per_address, overall
        self._failures: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()

    def _prune(self, times: deque[float], now: float) -> None:
        while times and now - times[0] >= LOGIN_WINDOW_S:
            times.popleft()

    def retry_after(self, address: str, now: float | None = None) -> float:
        """0 if ``address`` may try now, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        mine = self._failures.get(address, deque())
        self._prune(mine, now)
        self._prune(self._all, now)
        if not mine:
            self._failures.pop(address, None)
        waits = [
            LOGIN_WINDOW_S - (now - times[0])
            for times, limit in ((mine, self.per_address), (self._all, self.overall))
            if len(times) >= limit
        ]
        return max(waits, default=0.0)

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._failures.setdefault(address, deque()).append(now)
        self._all.append(now)

"""Sessions of the page: signed cookies the server can end.

A cookie is ``<id>.<expiry>.<mac>``, the MAC keyed by a random secret kept in ``<state_dir>/web-secret``
(0600) *and* the password, so a new password ends every session at once. A signature alone cannot be
taken back, so the ids of the open sessions are kept too, in ``<state_dir>/web-sessions`` (0600,
written atomically at each login and logout): logging out removes its id, and that cookie, wherever
it was copied, is no session any more. Sessions outlive a reload or a restart. The CSRF token is a MAC
of the session id: nothing to store, and a page of another site can neither read nor guess it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from pathlib import Path

from edgeknn import smallfiles
from edgeknn.smallfiles import read_small
from edgeknn.web.auth import MAX_SECRET_BYTES, AuthError, Passwords, write_private

log = logging.getLogger(__name__)

SECRET_FILE = "web-secret"
SESSIONS_FILE = "web-sessions"
SESSION_S = 30 * 24 * 3600  # a login lasts 30 days
MAX_SESSIONS = 32  # open at once: a further login ends the one that expires first
MAX_SESSIONS_BYTES = 64 * 1024


class SessionList:
    """The ids of the open sessions with their expiry, kept in a file; a damaged or missing file is
    no session (everyone logs in again), said in one line."""

    def __init__(self, path: Path):
        self.path = path
        self._ids: dict[str, int] = {}
        try:
            data = json.loads(read_small(path, MAX_SESSIONS_BYTES).decode("utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            why = smallfiles.reason(e) if isinstance(e, OSError) else "not a list of sessions"
            log.warning("web: %s: %s; no session is open (log in again)", path, why)
            return
        if isinstance(data, dict):
            self._ids = {
                k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int) and k.isascii()
            }

    def __contains__(self, sid: str) -> bool:
        expires = self._ids.get(sid)
        return expires is not None and expires >= time.time()

    def add(self, sid: str, expires: int) -> None:
        self._ids[sid] = expires
        self._save()

    def discard(self, sid: str) -> None:
        if self._ids.pop(sid, None) is not None:
            self._save()

    def _save(self) -> None:
        now = time.time()
        alive = sorted(((e, s) for s, e in self._ids.items() if e >= now), reverse=True)[:MAX_SESSIONS]
        self._ids = {s: e for e, s in alive}
        try:
            write_private(self.path, json.dumps(self._ids) + "\n")
        except OSError as e:  # kept in memory: a restart then ends them
            log.warning("web: cannot keep the open sessions in %s (%s)", self.path, e.strerror or e)


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
    write_private(path, secret.hex() + "\n")
    return secret


class Sessions:
    """Signed session tokens and their CSRF tokens, keyed by the secret and the current password, and
    the ids of the open ones (``SessionList``): a token whose id is not there is no session."""

    def __init__(self, passwords: Passwords, secret: bytes, state_dir: Path):
        self.passwords, self.secret = passwords, secret
        self.open = SessionList(Path(state_dir) / SESSIONS_FILE)

    def _key(self) -> bytes:
        return hmac.new(self.secret, self.passwords.current().encode("utf-8"), hashlib.sha256).digest()

    def _mac(self, key: bytes, text: str) -> str:
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()

    def new(self, now: float | None = None) -> str:
        sid = secrets.token_urlsafe(16)
        expires = int((now or time.time()) + SESSION_S)
        body = f"{sid}.{expires}"
        token = f"{body}.{self._mac(self._key(), 'session:' + body)}"
        self.open.add(sid, expires)
        return token

    def valid(self, token: str | None, now: float | None = None) -> str | None:
        """The session id of a valid, unexpired token, else None."""
        if not token or token.count(".") != 2 or not token.isascii():
            return None
        sid, expires, mac = token.split(".")
        try:
            expired = int(expires) < (now or time.time())
            key = self._key()
        except (ValueError, AuthError):
            return None
        if not hmac.compare_digest(mac, self._mac(key, f"session:{sid}.{expires}")) or expired:
            return None
        return sid if sid in self.open else None

    def end(self, sid: str) -> None:
        """Log out: the session's token is no session any more, wherever it was copied."""
        self.open.discard(sid)

    def csrf(self, sid: str) -> str:
        return self._mac(self._key(), "csrf:" + sid)

    def csrf_ok(self, sid: str, token: str | None) -> bool:
        return bool(token) and str(token).isascii() and hmac.compare_digest(str(token), self.csrf(sid))

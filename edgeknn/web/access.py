"""Who may use the page: the login (its rate limit counted before anything is awaited), the logout
(it ends the session on the server), and the check of every other /api/ request (a session, and for a
change its CSRF token). The password is ``auth.Passwords``, the sessions ``sessions.Sessions``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from edgeknn.config import WebConfig
from edgeknn.throttle import Throttle
from edgeknn.web.actions import json_response, request_json
from edgeknn.web.auth import AuthError, LoginLimiter, Passwords
from edgeknn.web.limits import address_key
from edgeknn.web.sessions import SESSION_S, Sessions, load_secret

log = logging.getLogger("edgeknn.web.server")

COOKIE = "edgeknn_session"
CSRF_HEADER = "X-CSRF-Token"
MAX_LOGIN = 4096  # a login body before any session: never read 32 MB for an anonymous client


class Access:
    """The password, the login limit and the sessions of one page; ``start`` makes the password (at a
    first start) and opens the sessions (AuthError, OSError: the page is off)."""

    def __init__(self, cfg: WebConfig, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.passwords = Passwords(cfg, state_dir)
        self.limiter = LoginLimiter()
        self.sessions: Sessions | None = None
        self.checked = 0  # passwords compared so far (tests read it)
        self._secure = False
        self._wrong = Throttle(log)  # a password guesser writes a line every 10 s, not one per guess

    def start(self, secure: bool) -> None:
        self.passwords.ensure()
        self.sessions = Sessions(self.passwords, load_secret(self.state_dir), self.state_dir)
        self._secure = secure

    def refuse(self, request: web.Request) -> web.Response | None:
        """None if ``request`` has a session (and, but for GET and HEAD, its CSRF token), else the answer."""
        sid = self.sessions.valid(request.cookies.get(COOKIE)) if self.sessions else None
        if sid is None:
            return json_response({"ok": False, "error": "not logged in"}, 401)
        assert self.sessions is not None
        if request.method not in ("GET", "HEAD") and not self.sessions.csrf_ok(
            sid, request.headers.get(CSRF_HEADER)
        ):
            return json_response({"ok": False, "error": "missing or wrong CSRF token"}, 403)
        return None

    def csrf(self, request: web.Request) -> str:
        """The CSRF token of ``request``'s session (``refuse`` let it through)."""
        assert self.sessions is not None
        sid = self.sessions.valid(request.cookies.get(COOKIE))
        assert sid is not None
        return self.sessions.csrf(sid)

    async def login(self, request: web.Request) -> web.Response:
        """Checks a password; the attempt is counted (``LoginLimiter.begin``) before anything is awaited."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            return json_response({"ok": False, "error": "login from another site refused"}, 403)
        if request.content_length is None or request.content_length > MAX_LOGIN:
            return json_response(
                {"ok": False, "error": f"login: expected a body of at most {MAX_LOGIN} bytes"}, 413
            )
        address = address_key(request.remote or "?")
        wait = self.limiter.begin(address)
        if wait > 0:
            response = json_response(
                {"ok": False, "error": f"too many wrong passwords: try again in {wait:.0f} s"}, 429
            )
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        failed = True  # until the password is checked: a body that never comes counts as a wrong one
        try:
            body = await request_json(request)
            password = body.get("password") if isinstance(body, dict) else None
            if delay := self.limiter.delay():  # many wrong passwords from everywhere: slow every guess
                await asyncio.sleep(delay)
            try:
                right = isinstance(password, str) and self._check(password)
            except AuthError as e:
                failed = False
                return json_response({"ok": False, "error": str(e)}, 503)
            failed = not right
        finally:
            self.limiter.end(address, failed)
        if not right:
            self._wrong.log(logging.WARNING, "web: wrong password from %s", address)
            return json_response({"ok": False, "error": "wrong password"}, 401)
        assert self.sessions is not None
        token = self.sessions.new()
        response = json_response({"ok": True})
        response.set_cookie(
            COOKIE,
            token,
            max_age=SESSION_S,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self._secure,
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        """Ends the session (``_guard`` checked it): its cookie, wherever copied, no longer logs in."""
        assert self.sessions is not None
        sid = self.sessions.valid(request.cookies.get(COOKIE))
        if sid is not None:
            self.sessions.end(sid)
        response = json_response({"ok": True})
        response.del_cookie(COOKIE, path="/")
        return response

    def _check(self, password: str) -> bool:
        self.checked += 1
        return self.passwords.check(password)

"""Downloading a named model, so a fresh device finds its model by itself.

``fetch`` downloads once (``edgeknn model fetch``). ``wait_for_model`` is the daemon's first start
without network: no model yet is a transient fault, so it retries with backoff and takes the file a
person copies into place meanwhile, instead of giving up. urllib (and ssl) are imported only when a
download starts: resolving a name costs no startup time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgeknn.model.registry import NamedModel
from edgeknn.model.tflite import ModelError, sha256_of

log = logging.getLogger(__name__)


def fetch(url: str, sha256: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through a ``.part`` file; keep it only if its sha256 matches.

    Atomic: the file is written beside ``dest``, fsynced and renamed over it, so ``dest`` is
    always either absent, the old file or the whole verified model, whatever interrupts the
    download (a dropped connection, a power cut). Not resumable: a model is a few MB, and an
    interrupted download starts again from the first byte.
    """
    import http.client
    import urllib.request

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest, got = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            for block in iter(lambda: response.read(1 << 16), b""):
                digest.update(block)
                f.write(block)
                got += len(block)
            due = int(response.headers.get("Content-Length") or got)
            if got < due:  # read(n) returns b"" when the server closes early: count the bytes
                raise http.client.IncompleteRead(b"", due - got)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, ValueError, http.client.HTTPException) as e:
        # URLError is an OSError; ValueError: a malformed URL; IncompleteRead: the connection dropped
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or _incomplete(e, got) or e
        raise ModelError(f"{url}: download failed ({reason})") from None
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise ModelError(f"{url}: checksum mismatch: expected sha256 {sha256}, got {digest.hexdigest()}")
    part.replace(dest)
    _fsync_folder(dest.parent)
    return dest


def _incomplete(e: Exception, got: int) -> str | None:
    """A readable reason for a download cut short after ``got`` bytes."""
    import http.client

    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed after {got} bytes, {e.expected} more were due"
    return None


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def have(model: NamedModel, folder: Path) -> str:
    """Whether ``folder`` holds ``model``: "yes" (sha256 verified), "no", or "wrong file (sha256 …)"."""

    try:
        digest = sha256_of(folder / model.file)
    except OSError:
        return "no"
    return "yes" if digest == model.sha256 else f"wrong file (sha256 {digest[:12]})"


def where_to_put(dest: Path, url: str, sha256: str) -> str:
    """The one hint an offline device needs: which file goes where, and how to check it."""
    return f"put the file at {dest} (from {url}, sha256 {sha256})"


def wait_for_model(
    dest: Path,
    url: str,
    sha256: str,
    *,
    stop: threading.Event,
    report: Callable[[str], None],
    tick: Callable[[], None],
    retry: threading.Event | None = None,
    first_delay: float = 5.0,
    max_delay: float = 300.0,
    poll: float = 1.0,
) -> bool:
    """Until ``dest`` holds the model (sha256 checked): download it, retrying after ``first_delay``
    seconds, doubling up to ``max_delay``, and take a good file that appears at ``dest`` meanwhile.

    ``report`` gets a one-line status after each failed try; ``tick`` is called at least every
    ``poll`` seconds (the watchdog), also while a download hangs. Setting ``retry`` tries again at
    once (``systemctl reload``). Returns True once the model is there, False as soon as ``stop`` is set.
    """
    dest = Path(dest)
    delay = first_delay
    seen_wrong = ""
    while True:
        error: list[str] = []
        worker = threading.Thread(target=_try_fetch, args=(url, sha256, dest, error), daemon=True)
        worker.start()
        while worker.is_alive():  # a download may hang for a while: keep the watchdog fed meanwhile
            worker.join(poll)
            tick()
            if stop.is_set():
                return False
            if worker.is_alive() and _wrong_file(dest, sha256) is None:
                log.info("model: found %s (sha256 %s verified)", dest, sha256)
                return True
        if not error:
            log.info("model: downloaded %s to %s (sha256 %s verified)", url, dest, sha256)
            return True
        report(
            f"waiting for the model: {error[0]}; "
            f"{where_to_put(dest, url, sha256)} or connect the network; retrying in {delay:g} s"
        )
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            if stop.wait(min(poll, left)):
                return False
            tick()
            if retry is not None and retry.is_set():
                retry.clear()
                break
            wrong = _wrong_file(dest, sha256)
            if wrong is None:
                log.info("model: found %s (sha256 %s verified)", dest, sha256)
                return True
            if wrong and wrong != seen_wrong:  # a partial copy, or another file: say so once
                seen_wrong = wrong
                log.warning(
                    "model: %s has sha256 %s, expected %s; waiting for the right file", dest, wrong, sha256
                )
        delay = min(delay * 2, max_delay)


def _try_fetch(url: str, sha256: str, dest: Path, error: list[str]) -> None:

    try:
        fetch(url, sha256, dest, timeout=30.0)
    except ModelError as e:
        error.append(str(e).removeprefix(f"{url}: "))
    except Exception as e:  # a full disk, a read-only folder: still worth another try later
        error.append(f"download failed ({type(e).__name__}: {e})")


def _wrong_file(dest: Path, sha256: str) -> str | None:
    """None if ``dest`` holds the model; else its sha256, or "" when there is no file (yet)."""

    try:
        digest = sha256_of(dest)
    except OSError:
        return ""
    return None if digest == sha256 else digest

"""Keep LiteRT's "Created TensorFlow Lite XNNPACK delegate for CPU." banner off stderr.

The interpreter writes it straight to file descriptor 2, below Python's sys.stderr, so only a
redirect of the descriptor itself can catch it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading

_STDERR_LOCK = threading.Lock()
XNNPACK_BANNER = b"Created TensorFlow Lite XNNPACK delegate for CPU."


@contextlib.contextmanager
def without_xnnpack_banner():
    """Drop LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from stderr.

    The interpreter writes it to file descriptor 2 on its first allocation, and no switch turns it
    off (TF_CPP_MIN_LOG_LEVEL does not reach TFLite's own logger). So fd 2 goes to a temporary file
    meanwhile, and every other line written there is passed on afterwards.
    """
    with _STDERR_LOCK, tempfile.TemporaryFile() as spool:
        if sys.stderr is not None:
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all: nothing to keep quiet
            saved = -1
        if saved < 0:
            yield
            return
        os.dup2(spool.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            spool.seek(0)
            rest = b"".join(line for line in spool if XNNPACK_BANNER not in line)
            if rest:
                os.write(2, rest)

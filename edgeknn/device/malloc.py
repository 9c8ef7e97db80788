"""glibc's malloc held to two arenas for the daemon (issue 20: memory on a 512 MB Pi Zero 2 W).

glibc gives each thread that allocates an arena of its own, up to 8 per core; the daemon's threads
(camera, inference, the page's event loop, MQTT, saves, refits) each keep freed memory in theirs.
Two arenas took 3.4 MB off `edgeknn run`'s resident memory with a 10 000-example store and the page
on (``scripts/measure_memory.py``), at no measured cost to the loop. ``MALLOC_ARENA_MAX`` in the
environment wins; another C library (musl) is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter (glibc's malloc.h)


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Call before the threads start; True when glibc took the limit."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_ARENA_MAX, arenas))
    log.debug("malloc arenas limited to %d: %s", arenas, done)
    return done

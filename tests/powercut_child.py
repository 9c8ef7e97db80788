"""Power-cut helper for tests/test_reliability.py: a fork server whose children save a KnnStore in a loop.

``python powercut_child.py STORE DIM`` reads one line per cut on stdin. For each it forks a child,
prints ``pid N`` and lets the child go. The child loads STORE (or starts empty), then forever adds
example number ``len(store)`` and saves, printing ``saved COUNT`` after each save has returned. The
test SIGKILLs the child at a random moment; this server reaps it and prints ``dead N``. Every line
is one os.write to the pipe (atomic, unbuffered), so the test reads them in the order they happened
and a killed child never leaves half a line. One server process serves every cut: a cut costs a
fork, not an interpreter start.

Example ``i`` is the vector (i + 1, 1, 1, ...) of class ``c{i % 3}``: after a load, the ratio of a
row's first two values gives back which example it is, so the test checks that every example is
there, in order.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import numpy as np

from edgeknn.store.file import StoreError
from edgeknn.store.knn import KnnStore, StoreSettings

MODEL_ID = "powercut-test-model"
CLASSES = ("c0", "c1", "c2")
CAPACITY = 1_000_000  # never drop an example: the test counts them


def example(i: int, dim: int) -> np.ndarray:
    v = np.ones(dim, np.float32)
    v[0] = i + 1
    return v


def child(path: str, dim: int) -> None:
    try:
        store = KnnStore.load(path, MODEL_ID, StoreSettings(rule="nearest", capacity=CAPACITY))
    except StoreError as e:
        if "not found" not in str(e):
            os.write(1, f"unreadable {e}\n".encode())
            os._exit(3)
        store = KnnStore(dim, MODEL_ID, StoreSettings(rule="nearest", capacity=CAPACITY))
    while True:
        i = len(store)
        store.add(CLASSES[i % 3], example(i, dim))
        store.save(path)
        os.write(1, f"saved {len(store)}\n".encode())


def main() -> None:
    path, dim = sys.argv[1], int(sys.argv[2])
    for _ in iter(sys.stdin.readline, ""):
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.read(go_r, 1)  # wait until the server has announced our pid
            try:
                child(path, dim)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(2)
        os.close(go_r)
        os.write(1, f"pid {pid}\n".encode())
        with contextlib.suppress(BrokenPipeError):  # on a busy machine the test may cut before the go
            os.write(go_w, b"g")
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
        os.write(1, f"dead {pid} {status}\n".encode())


if __name__ == "__main__":
    main()

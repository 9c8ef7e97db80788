"""The inference thread: embeds the next frame while the main loop classifies the previous one."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from edgeknn.model.embedder import Embedder

_Outcome = tuple[np.ndarray, float, np.ndarray | None]  # embedding, milliseconds, the side's answer


class InferenceThread:
    """Runs an Embedder on its own thread, one image at a time.

    ``start(image)`` returns once the interpreter is running on the image. Its invoke releases the
    GIL, so the caller's Python work (classifying, publishing) then overlaps the model; returning
    at once would let that work hold the GIL and delay the invoke it was meant to overlap.
    ``result()`` waits for the embedding. Between a ``start`` and its ``result`` only this thread
    touches the interpreter; ``wait()`` lets another caller have it back.

    ``side`` (a head model's scores) runs on this thread right after each invoke, before the next can
    overwrite the tensor it reads; ``side_result`` holds its answer for the image of the last ``result()``.
    """

    THREAD_NAME = "edgeknn-inference"

    def __init__(self, embedder: Embedder, side: Callable[[], np.ndarray] | None = None):
        self.embedder = embedder
        self.side = side
        self.side_result: np.ndarray | None = None
        self.busy = False
        self._requests: queue.SimpleQueue[np.ndarray | None] = queue.SimpleQueue()
        self._started: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[_Outcome | Exception] = queue.SimpleQueue()
        self._outcome: _Outcome | Exception | None = None
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def start(self, image: np.ndarray) -> None:
        """Embed ``image`` on the thread; return when its invoke has begun."""
        if self.busy:
            raise RuntimeError("InferenceThread.start: the previous image's result was not taken")
        self.busy = True
        self._requests.put(image)
        self._started.get()

    def result(self) -> tuple[np.ndarray, float]:
        """The embedding of the image started last and the milliseconds it took (raises its error)."""
        self.wait()
        outcome, self._outcome, self.busy = self._outcome, None, False
        if outcome is None:
            raise RuntimeError("result() called with no image started")
        if isinstance(outcome, Exception):
            raise outcome
        vector, ms, self.side_result = outcome
        return vector, ms

    def wait(self) -> None:
        """Wait until the thread is idle; ``result()`` still answers for the image it embedded."""
        if self.busy and self._outcome is None:
            self._outcome = self._results.get()

    def close(self, timeout: float = 2.0) -> None:
        self.wait()
        self._requests.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        model = self.embedder.model
        while (image := self._requests.get()) is not None:
            start = time.perf_counter()
            try:
                model.set_input(image)
            except Exception as e:  # a bad frame: the caller gets the error from result()
                self._started.put(None)
                self._results.put(e)
                continue
            self._started.put(None)
            try:
                model.interpreter.invoke()
                vector = self.embedder.embedding()
                side = self.side() if self.side is not None else None
                self._results.put((vector, (time.perf_counter() - start) * 1000, side))
            except Exception as e:
                self._results.put(e)

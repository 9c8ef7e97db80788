"""Matcher: how a frame is classified against a store's rows (observe, classify, fit, the threshold).

Split from ``knn.py`` so that ``KnnStore`` keeps what is stored (examples, classes, rows, pictures,
the file) and this the classification over it: the rule's head (``head.py``), fitted on the rows,
and the index of one row per example (``scan.py``) that finds a frame's nearest examples. The store
owns one Matcher and hands it its rows, classes and examples per class on each call (a loaded store
replaces them, so the matcher keeps none) and reads ``k``, ``threshold`` and ``full_scan`` off the
store (callers set them there); when its rows change the store marks the head stale and clears the
index.

Every rule answers ``UNKNOWN`` when the store is empty or the frame's ``similarity`` is below
``effective_threshold`` (``threshold``, or calibrated from the examples when it is None:
``scan.py``), and names its nearest examples so that an answer can be explained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgeknn.store.examples import ExampleBook
from edgeknn.store.head import VIEW_RULES, Head, fit_sample, remapped
from edgeknn.store.names import UNKNOWN
from edgeknn.store.refit import Refitter
from edgeknn.store.rows import Rows
from edgeknn.store.scan import ExampleIndex, Space

_FIT_HERE = 256  # rows: a first fit on at most this many runs on the classifying thread (milliseconds)


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    scores: dict[str, float]
    similarity: float
    neighbours: list[tuple[str, float]] = field(default_factory=list)


class Tuning(Protocol):
    """What a matcher reads off its store at each call (``KnnStore``'s attributes)."""

    k: int
    _book: ExampleBook  # each example's time of adding: the threshold's moments (``scan.py``)
    threshold: float | None  # None: calibrated from the examples (``effective_threshold``)
    full_scan: bool  # True: no index (the bench measures the index's answers against it)


class Matcher:
    """A store's classification; ``head`` and ``index`` are marked stale and cleared by the store."""

    def __init__(self, store: Tuning, rule: str, dim: int):
        self.store = store
        self.head = Head(rule, dim)
        self.index = ExampleIndex(Space(rule in VIEW_RULES))  # one row per example: scan.py
        self.refitter: Refitter | None = None  # set (refit.beside): the head is refitted beside the loop
        self._fits_here = 0  # fits on the calling thread: one during a refit makes the refit's result old
        self._refit_after = 0  # ``_fits_here`` when the running refit started
        self._fitted_for: tuple[str, ...] = ()  # the classes (their slots) the head was fitted for
        self._refit_for: tuple[str, ...] = ()  # and those the running refit fits

    @property
    def rule(self) -> str:
        return self.head.rule

    def observe(self, vector: np.ndarray) -> None:
        """Fold a seen frame's embedding into the centre of the feature space (the default rule uses it)."""
        self.head.observe(vector)

    def classify(
        self, vector: np.ndarray, rows: Rows, classes: list[str], examples: dict[str, int]
    ) -> Prediction:
        """Classify one unit embedding: ``UNKNOWN`` with empty scores when the store has no examples,
        and with this frame's scores when its ``similarity`` is below ``effective_threshold``: for
        the view rules the mean similarity of its k nearest examples (``scan.py``), for the others
        the cosine of the nearest row.

        The view rules take their answer from the fitted head and their nearest examples from the
        index (``scan.py``: one row per example, in the head's space, at a cost that hardly grows
        with the rows); ``tfjs`` and ``nearest`` vote with the k most similar rows of a full scan.
        ``full_scan``: the view rules score every example too (what the index is measured against).
        """
        n = len(rows)
        if n == 0:
            return Prediction(UNKNOWN, 0.0, {}, 0.0)
        self._current(rows, classes)
        if self.rule in VIEW_RULES:
            nearest, sims = self.index.nearest(vector, self.store.k, rows.get, self.store.full_scan)
        else:
            every = rows.similarities(vector)
            k = min(self.store.k, n)
            nearest = np.argpartition(every, n - k)[n - k :]
            nearest = nearest[np.argsort(-every[nearest], kind="stable")]
            sims = every[nearest]
        labels = rows.labels[nearest]
        if self.head.fitted is None and self.rule in VIEW_RULES:  # its first fit runs beside the loop
            votes = np.bincount(labels, minlength=len(classes)).astype(np.float32)
            probs, best = votes / votes.sum(), int(np.argmax(votes))  # the nearest examples vote meanwhile
        else:
            probs, best = self.head.answer(vector, labels, len(classes))
        scores = {name: float(p) for name, p in zip(classes, probs, strict=True) if examples.get(name)}
        # the view rules: the mean over the k nearest examples (a lone near-duplicate counts less)
        similarity = float(sims.mean() if self.rule in VIEW_RULES else sims[0])
        neighbours = [(classes[i], float(s)) for i, s in zip(labels, sims, strict=True)]
        if similarity < self.effective_threshold(rows, classes):
            return Prediction(UNKNOWN, 0.0, scores, similarity, neighbours)
        return Prediction(classes[best], float(probs[best]), scores, similarity, neighbours)

    def effective_threshold(self, rows: Rows, classes: list[str]) -> float:
        """The threshold applied now: ``threshold`` when it is set, else the one calibrated from the
        examples (``scan.ExampleIndex.threshold``; 0.0 until a class has two examples, or two classes
        one each). ``tfjs`` and
        ``nearest`` (kept to compare with TensorFlow.js, which has no unknown answer) are not
        calibrated: 0.0, a raw cosine, never unknown. From the thread that classifies: it may calibrate."""
        if self.store.threshold is not None:
            return float(self.store.threshold)
        if not len(rows) or self.rule not in VIEW_RULES:
            return 0.0
        self._current(rows, classes)
        book = self.store._book

        def added(positions: np.ndarray) -> np.ndarray:
            return np.array([book.added(int(i)) for i in rows.examples[positions]], np.float64)

        return self.index.threshold(rows.labels, rows.get, len(classes), self.store.k, added)

    def calibration(self, rows: Rows, classes: list[str]) -> str:
        """What ``effective_threshold`` comes from now: ``set`` (a number), ``own class`` (each
        example's similarity to the others of its class), ``near misses`` (to other classes) or
        ``none`` (0.0: too few examples, or a rule that is not calibrated)."""
        if self.store.threshold is not None:
            return "set"
        self.effective_threshold(rows, classes)
        return self.index.calibration if len(rows) and self.rule in VIEW_RULES else "none"

    def _current(self, rows: Rows, classes: list[str]) -> None:
        """Before an answer: the head fitted (on this thread), or with a refitter the finished fit
        swapped in and a new one started beside the loop when the rows changed (``refit.py``)."""
        if self.refitter is None or self.refitter.failed or self.rule not in VIEW_RULES:
            if self.refitter is not None and self.refitter.failed and self.refitter.running:
                self.refitter.take()  # the refit that failed: its change is fitted here
                self.head.stale = True
            if self.head.stale:
                self.fit(rows, classes)
            return
        now = tuple(classes)
        fit = self.refitter.take()
        if fit is not None and self._refit_after == self._fits_here:
            self.head.fitted, self._fitted_for = remapped(fit, self._refit_for, now), now
        # else: a fit here since (a failed refit's, ``fit``): the fit here is newer
        fitted = self.head.fitted
        if fitted is not None and self._fitted_for != now:  # classes added or removed: columns by name
            fitted = remapped(fitted, self._fitted_for, now)
            self.head.fitted, self._fitted_for = fitted, now
            self.head.stale = True
        if fitted is not None and not fitted.present.any():
            self.head.fitted = fitted = None  # no class it knows has examples (an import that replaced them)
        if fitted is None and len(rows) <= _FIT_HERE:
            self.head.stale = True
            self.fit(rows, classes)  # a first fit on a few rows: milliseconds, on this thread
            return
        present = np.bincount(rows.labels, minlength=len(classes)) > 0
        if fitted is not None and not np.array_equal(fitted.present, fitted.present & present):
            self.head.fitted = fitted = dataclasses.replace(fitted, present=fitted.present & present)
        if (self.head.stale or fitted is None) and len(rows) and not self.refitter.running:
            index = fit_sample(rows.labels, rows.examples, len(classes))
            center = self.head.center.copy() if self.head.seen else None
            labels = rows.labels[index].copy()
            self.refitter.start(self.rule, center, rows.get(index), labels, present)
            self._refit_after, self._refit_for = self._fits_here, now
            self.head.stale = False  # a change from now on schedules one more
        self.index.sync(
            len(rows), rows.examples, rows.get, Space(True, None if fitted is None else fitted.center)
        )

    def renamed(self, old: str, new: str) -> None:
        """Class ``old`` is called ``new`` now: the fits keep its column."""
        self._fitted_for = tuple(new if c == old else c for c in self._fitted_for)
        self._refit_for = tuple(new if c == old else c for c in self._refit_for)

    def fit(self, rows: Rows, classes: list[str]) -> None:
        """Fit the rule's head now if it is due (else the next classify does it).

        The daemon calls this before it reports ready, so its first frame is not held up by the
        fit, and the fit's working memory comes and goes before the camera and MQTT add theirs.
        """
        if not (self.head.stale and len(rows)):
            return
        view_rule = self.rule in VIEW_RULES
        if view_rule:
            labels = rows.labels
            index = fit_sample(labels, rows.examples, len(classes))
            present = np.bincount(labels, minlength=len(classes)) > 0
            self.head.fit(rows.get(index), labels[index], present)
            self._fits_here, self._fitted_for = self._fits_here + 1, tuple(classes)
        center = self.head.fitted.center if view_rule and self.head.fitted is not None else None
        self.index.sync(len(rows), rows.examples, rows.get, Space(view_rule, center))

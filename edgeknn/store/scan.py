"""The nearest examples of a frame without scanning every stored row, and the automatic unknown threshold.

The unknown decision and the neighbours an answer names look at one row per example (its first: the
frame itself; the other views are its mirror and crops, which match unseen things too easily). In
the head's space (square-rooted, centred on the fitted head's centre: ``Space``) the mean similarity
of a frame to its k nearest examples separates taught from untaught things better than the raw
cosine to the nearest row did (sign digits, half the classes untaught; README, How it classifies).

Per frame, ``ExampleIndex.nearest`` ranks every example by a sketch (its row projected on the top
``_RANK`` principal directions of the examples: 12-16x fewer values than its row, 6x that again
for the six views), then scores the ``_CANDIDATES`` best exactly from the stored rows. New
examples are sketched when first seen, a removal drops its examples from the index, a move of the centre
redoes what depends on it, at the next classify after the change, never on every frame.

``ExampleIndex.threshold``: how close a new photo of a taught class usually comes, measured on the
taught examples themselves. Each example in turn is left out and compared with the others of its
class taught at another moment (the mean similarity of its k nearest there: what the frame's
``similarity`` would be for a photo of that class the store had not seen; the frames of one held
button are near copies of each other and would make it far too strict). The threshold is the
``_OWN_QUANTILE`` of those, less an allowance of ``_ALLOWANCE`` / (the examples it was measured on)
that shrinks as the examples grow (a few examples say less about their class than many). So it
works from the first class on, as soon as one class has examples from two moments. With two
classes or more it is never below the near misses: the ``_QUANTILE`` of each example's mean
similarity to its k nearest examples of other classes (how close the taught classes come to each
other: a frame no closer than that to what it resembles most is not one of them); that alone (at
least 0) while no class has examples from two moments.
Calibrated on at most ``_CALIBRATION`` examples, again only when the examples or the centre changed
(past that size, when 1/16 of them did). Chosen on sign digits 0-4, reported on 5-9
(docs/classifying.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeknn.store.head import fit_sample, rowdot, sqrt_features, unit_rows

_RANK = 64  # sketch dimensions
_CANDIDATES = 32  # examples scored exactly per frame
_CALIBRATION = 512  # examples the threshold is calibrated on, at most
_BASIS_SAMPLE = 1024  # examples the sketch's directions are computed from, at most
_OWN_QUANTILE = 0.2  # of the examples' leave-one-out similarity to their own class
_ALLOWANCE = 0.5  # taken off it, divided by the examples it was measured on
_QUANTILE = 0.55  # of the examples' near misses: while no class has two examples
_MOMENT_S = 5.0  # examples of a class added closer together than this are one moment (a held button)

Rows = Callable[[np.ndarray], np.ndarray]  # float32 copies of the stored rows at some positions


@dataclass(frozen=True)
class Space:
    """Where similarities are measured: raw unit rows, or the head's square-rooted rows centred on
    ``center`` (then the cosine of (s - c) and (t - c), written out from s.t, s.c and t.c)."""

    sqrt: bool
    center: np.ndarray | None = None

    def features(self, rows: np.ndarray) -> np.ndarray:
        """Unit rows (square-rooted first in the head's space), made in place from a float32 copy."""
        return sqrt_features(rows) if self.sqrt else unit_rows(rows)

    def cosine(self, dots: np.ndarray, s_c: float, t_c: np.ndarray) -> np.ndarray:
        """cos(s - c, t - c) for unit s, t from s.t (``dots``), s.c and t.c (each row's)."""
        if self.center is None:
            return dots
        cc = float(self.center @ self.center)
        s_norm = np.sqrt(max(1.0 - 2.0 * s_c + cc, 1e-12))
        t_norm = np.sqrt(np.maximum(1.0 - 2.0 * t_c + cc, 1e-12))
        return (dots - s_c - t_c + cc) / (s_norm * t_norm)

    def dot_center(self, feats: np.ndarray) -> np.ndarray:
        """Each row's dot product with the centre (zeros in the raw space)."""
        if self.center is None:
            return np.zeros(len(feats), np.float32)
        return rowdot(feats, self.center)


class ExampleIndex:
    """One row per example (its first, the frame), kept in step with the store lazily: ``sync``."""

    def __init__(self, space: Space):
        self.space = space
        self.clear()

    def __len__(self) -> int:
        return len(self.first)

    def clear(self) -> None:
        """Rows were removed or moved: index them all again (lazily, on the next ``sync``)."""
        self.covered = 0  # the stored rows [0, covered) are indexed
        self.first = np.zeros(0, np.intp)  # each example's first row, ascending
        self.sketch = np.zeros((0, _RANK), np.float32)  # its frame's features on the basis
        self.basis: np.ndarray | None = None  # (dim, _RANK): the sketch's directions
        self._basis_from = 0  # how many examples the basis was computed from
        self._t_c: np.ndarray | None = None  # each example's sketched t.c (for the coarse ranking)
        self._replaced: set[int] = set()  # examples (index into first) overwritten since the last sync
        self._threshold: float | None = None
        self.calibration = "none"  # what the threshold was calibrated from (``threshold``)
        self._calibrated_on, self._calibrated_k = 0, 0  # examples and k at the last calibration
        self._changes = 0  # examples added or replaced since

    def compacted(self, keep: np.ndarray) -> None:
        """Whole examples' rows were removed (``keep``: a mask of the rows before): drop them from the
        index and move the others' positions, in milliseconds (no rebuild: the basis stays, from the
        examples it was computed from; the threshold is recalibrated when due)."""
        e = len(self.first)
        if self.covered > len(keep) or self._replaced:
            self.clear()
            return
        kept = keep[self.first]
        position = np.cumsum(keep) - 1
        self.first = position[self.first[kept]]
        self.covered = int(np.count_nonzero(keep[: self.covered]))
        if self.basis is not None:
            self.sketch = self.sketch[:e][kept]
        if self._t_c is not None:
            self._t_c = self._t_c[:e][kept]
        self._changes += e - len(self.first)

    def replaced(self, position: int) -> None:
        """The example whose first row is ``position`` was overwritten by a new one (a full class)."""
        at = int(np.searchsorted(self.first, position))
        if at < len(self.first) and self.first[at] == position:
            self._replaced.add(at)
            self._changes += 1
        else:
            self.clear()

    def sync(self, n: int, example: np.ndarray, rows: Rows, space: Space) -> None:
        """Take in the store's new rows (``n`` rows, ``example`` their example ids) and the head's
        current space; cheap when nothing changed."""
        if space.center is not self.space.center:
            self.space, self._t_c, self._threshold = space, None, None
        if self.covered > n:
            self.clear()
        if self.covered < n:
            start = len(self.first)
            starts = np.sort(np.unique(example[self.covered : n], return_index=True)[1]) + self.covered
            self.first = np.concatenate([self.first, starts])
            self.covered = n
            self._changes += len(starts)
            if self.basis is not None:
                self._extend(rows, start)
        e = len(self.first)
        stale_basis = self._basis_from < _BASIS_SAMPLE and e >= 4 * self._basis_from
        if e > _CANDIDATES and (self.basis is None or stale_basis):
            self._build(rows)  # again while the examples it came from are few and 4x outnumbered
        if self._replaced and self.basis is not None:
            at = np.array(sorted(self._replaced), np.intp)
            self.sketch[at] = self.space.features(rows(self.first[at])) @ self.basis
            self._t_c = None
        self._replaced.clear()
        if self._t_c is None and self.basis is not None and self.space.center is not None:
            self._t_c = rowdot(self.sketch[:e], self.space.center @ self.basis)

    def _build(self, rows: Rows) -> None:
        """The basis from a sample of the examples (a randomised SVD: bounded time), then every sketch."""
        e = len(self.first)
        pick = np.linspace(0, e - 1, min(e, _BASIS_SAMPLE)).round().astype(np.intp)
        x = self.space.features(rows(self.first[pick]))
        rank = min(_RANK, *x.shape)
        g = np.random.default_rng(0).standard_normal((x.shape[1], rank + 8)).astype(np.float32)
        q = np.linalg.qr(x @ g)[0]
        for _ in range(2):  # power iterations sharpen the leading directions
            q = np.linalg.qr(x @ (x.T @ q))[0]
        vt = np.linalg.svd(q.T @ x, full_matrices=False)[2]
        basis = np.zeros((x.shape[1], _RANK), np.float32)
        basis[:, :rank] = vt[:rank].T
        self.basis, self._basis_from = basis, e
        self.sketch = np.zeros((0, _RANK), np.float32)
        self._extend(rows, 0)

    def _extend(self, rows: Rows, start: int) -> None:
        """Sketch the examples from ``start`` on (in chunks: bounded scratch memory)."""
        assert self.basis is not None
        e = len(self.first)
        if len(self.sketch) < e:
            grown = np.zeros((max(e, len(self.sketch) * 3 // 2, 64), _RANK), np.float32)
            grown[:start] = self.sketch[:start]
            self.sketch = grown
        for lo in range(start, e, 512):
            hi = min(lo + 512, e)
            self.sketch[lo:hi] = self.space.features(rows(self.first[lo:hi])) @ self.basis
        self._t_c = None

    def nearest(
        self, vector: np.ndarray, k: int, rows: Rows, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The positions of the first rows of the ``k`` examples most similar to a unit ``vector``
        (most similar first) and their similarities, in this space. ``exact``: score every example
        (the full scan the sketch is measured against)."""
        s = self.space.features(np.array(vector, np.float32, ndmin=2))[0]
        s_c = 0.0 if self.space.center is None else float(s @ self.space.center)
        e, m = len(self.first), max(_CANDIDATES, k)
        if e > m and self.basis is not None and not exact:
            coarse = rowdot(self.sketch[:e], s @ self.basis)
            if self._t_c is not None:
                coarse = self.space.cosine(coarse, s_c, self._t_c[:e])
            candidates = self.first[np.argpartition(coarse, e - m)[e - m :]]
        else:
            candidates = self.first
        t = self.space.features(rows(candidates))
        sims = self.space.cosine(rowdot(t, s), s_c, self.space.dot_center(t))
        k = min(k, len(candidates))
        top = np.argpartition(sims, len(sims) - k)[len(sims) - k :]
        top = top[np.argsort(-sims[top], kind="stable")]
        return candidates[top], sims[top].astype(np.float32)

    def threshold(
        self, labels: np.ndarray, rows: Rows, classes: int, k: int, added: Rows | None = None
    ) -> float:
        """The calibrated threshold for the mean similarity of a frame to its ``k`` nearest
        examples (the module's docstring): from each example's similarity to the others of its
        class, else from near misses between classes, else 0.0; cached until it is due.
        ``calibration`` then says which (``own class``, ``near misses`` or ``none``). ``added``: the
        time each example (by its first row's position) was added, for its moment (``moments``);
        None: every example a moment of its own."""
        e = len(self.first)
        if (
            self._threshold is not None
            and k == self._calibrated_k
            and (not self._changes or (e > _CALIBRATION and self._changes * 16 < self._calibrated_on))
        ):
            return self._threshold
        own = labels[self.first]
        pick = fit_sample(own, np.arange(e), classes, limit=_CALIBRATION)
        own = own[pick]
        value, self.calibration = 0.0, "none"
        if len(own) >= 2:
            t = self.space.features(rows(self.first[pick]))
            if self.space.center is not None:
                t -= self.space.center
                unit_rows(t)
            sims = t @ t.T
            np.fill_diagonal(sims, -np.inf)  # an example is never its own neighbour
            same = own[:, None] == own[None, :]
            moment = moments(own, added(self.first[pick])) if added is not None else np.arange(len(own))
            apart = same & (moment[:, None] != moment[None, :])  # its class, at another moment
            alike = _mean_top(np.where(apart, sims, -np.inf), k)  # NaN: no other moment of its class
            measured = alike[np.isfinite(alike)]
            if len(measured):
                value = float(np.quantile(measured, _OWN_QUANTILE)) - _ALLOWANCE / len(measured)
                self.calibration = "own class"
            if len(np.unique(own)) >= 2:  # never below how close the taught classes come to each other
                near_miss = float(np.quantile(_mean_top(np.where(same, -np.inf, sims), k), _QUANTILE))
                if not len(measured):
                    value, self.calibration = max(0.0, near_miss), "near misses"
                elif near_miss > value:
                    value, self.calibration = near_miss, "near misses"
        self._threshold, self._calibrated_on, self._calibrated_k, self._changes = value, e, k, 0
        return value


def moments(labels: np.ndarray, added: np.ndarray) -> np.ndarray:
    """Each example's moment: the examples of a class added less than ``_MOMENT_S`` after the one
    before (a held button, one burst) are one moment; numbered over all classes."""
    order = np.lexsort((added, labels))
    gap = np.diff(added[order]) > _MOMENT_S
    new = np.concatenate([[True], gap | (np.diff(labels[order]) != 0)])
    moment = np.empty(len(labels), np.intp)
    moment[order] = np.cumsum(new)
    return moment


def _mean_top(sims: np.ndarray, k: int) -> np.ndarray:
    """Per row, the mean of its ``k`` largest finite values (fewer when it has fewer; NaN: none)."""
    top = -np.sort(-sims, axis=1)[:, :k]
    found = np.isfinite(top)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(found, top, 0.0).sum(axis=1) / found.sum(axis=1)

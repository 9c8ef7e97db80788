"""The classifier over the store's rows: the rules, the softmax/prototype head and its fit sample.

Plain numpy; knows nothing of how rows are stored (``store.py``) or saved (``storefile.py``).

Rules (``RULES``):
- ``tfjs``: TensorFlow.js knn-classifier: the k most similar rows vote, confidences are votes/k, a
  tie goes to the lowest class index. Kept for comparison.
- ``nearest``: the same vote, a tie goes to the class of the most similar row.
- ``prototype``: the most similar class mean of the transformed features.
- ``softmax`` (the default; best measured, see README): a small softmax head refit on the store's
  rows in milliseconds, as Teachable Machine 2 does, on square-rooted, centred features. The
  centre is the running mean of the frames the device has seen (``observe``), or of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("softmax", "prototype", "nearest", "tfjs")
DEFAULT_RULE = "softmax"
VIEW_RULES = ("softmax", "prototype")  # rules that store augmented views of each added example
_FIT_STEPS, _TEMPERATURE, _LEARNING_RATE, _WEIGHT_DECAY = 100, 10.0, 1.0, 1e-3
_CENTER_WINDOW = 1000  # frames: the centre becomes a moving average after this many
_FIT_ROWS = 2048  # the head is fitted on at most this many rows (bounded time and memory, any store size)


def rowdot(rows: np.ndarray, q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``rows @ q`` as one dot product per row on this thread (numpy < 2 has no vecdot: einsum).

    ``q`` is one vector for every row, or a matrix of one vector per row (a row's own norm).
    Not a BLAS product: OpenBLAS splits that over threads that then wait for cores the
    interpreter's own threads and the camera thread are using, which costs the loop milliseconds.
    """
    if _vecdot is not None:
        return _vecdot(rows, q, out=out)
    return np.einsum("ij,ij->i" if q.ndim == 2 else "ij,j->i", rows, q, out=out)


_vecdot = getattr(np, "vecdot", None)


def fit_sample(
    labels: np.ndarray, example: np.ndarray, classes: int, limit: int | None = None
) -> np.ndarray | slice:
    """The rows the head is fitted on: all, or ``limit`` (``_FIT_ROWS``) of them shared out between
    the classes and, within a class, spread evenly over its examples' ages (the newest included).

    ``labels`` and ``example`` give each stored row's class and the example it came from. Fitting
    on a bounded sample keeps the first fit, the refit after each added example and its memory
    the same at 10 000 rows as at 2 000, so holding a button never stalls the loop.
    """
    n, limit = len(labels), _FIT_ROWS if limit is None else limit
    if n <= limit:
        return slice(0, n)
    present = np.flatnonzero(np.bincount(labels, minlength=classes))
    quota = limit // len(present)
    chosen = []
    for label in present:
        rows = np.flatnonzero(labels == label)
        if len(rows) > quota:
            rows = rows[np.argsort(example[rows], kind="stable")]
            rows = rows[np.linspace(0, len(rows) - 1, quota).round().astype(np.intp)]
        chosen.append(rows)
    return np.sort(np.concatenate(chosen))


@dataclass(frozen=True)
class Fit:
    """A fitted prototype or softmax head, and what the per-frame path keeps of its fit."""

    weights: np.ndarray  # (dim, classes)
    bias: np.ndarray  # (classes,)
    center: np.ndarray  # the centre the head was fitted with
    present: np.ndarray  # the classes that had examples: no other can win
    rows: np.ndarray  # the weights as one contiguous row per class
    center_w: np.ndarray  # center @ weights
    center_sq: float  # center @ center


def remapped(fit: Fit, old: tuple[str, ...], new: tuple[str, ...]) -> Fit:
    """``fit`` (of the classes ``old``) for the classes ``new``: each class keeps its column by name, a
    new one gets zero weights and cannot win (``present`` False) until a fit that knows it."""
    if old == new:
        return fit
    where = np.array([old.index(name) if name in old else -1 for name in new], np.intp)
    known = where >= 0
    weights = np.zeros((fit.weights.shape[0], len(new)), np.float32)
    bias = np.zeros(len(new), np.float32)
    weights[:, known], bias[known] = fit.weights[:, where[known]], fit.bias[where[known]]
    present = np.zeros(len(new), bool)
    present[known] = fit.present[where[known]]
    rows = np.ascontiguousarray(weights.T)
    return Fit(weights, bias, fit.center, present, rows, fit.center @ weights, fit.center_sq)


class Head:
    """One rule's answer for a frame, given its nearest rows; the fitted head of the view rules.

    ``stale`` says the store's rows changed (or the centre moved) since the fit: the store then
    fits again, on ``fit_sample`` of its rows, before its next answer.
    """

    def __init__(self, rule: str, dim: int):
        self.rule = rule
        self.center = np.zeros(dim, np.float32)  # the running mean of the seen frames' features
        self.seen = 0
        self.fitted: Fit | None = None
        self.stale = True

    def observe(self, vector: np.ndarray) -> None:
        """Fold a seen frame's embedding into the centre of the feature space (the default rule uses it)."""
        self.seen += 1
        rate = 1.0 / min(self.seen, _CENTER_WINDOW)
        s, norm = _sqrt_norm(vector)
        s *= rate / norm  # its square-rooted unit vector, times the rate
        self.center *= 1.0 - rate
        self.center += s
        if self.seen % _CENTER_WINDOW == 0:
            self.stale = True  # the centre has moved: refit the head on the next frame

    def fitted_center(self) -> tuple[np.ndarray, int] | None:
        """The centre the head was fitted with (the running mean of the frames seen until that fit) and
        how many frames the running mean has seen; None before a fit on seen frames. What a fleet's
        leader hands its followers, so that they measure in its space (``adopt_center``)."""
        if self.fitted is None or not self.seen:
            return None
        return self.fitted.center.copy(), self.seen

    def adopt_center(self, center: np.ndarray, seen: int) -> None:
        """Take another head's centre (``fitted_center``) as the running mean of the seen frames, as if
        this device had seen them; the head is refitted with it and the threshold calibrated in it."""
        if center.shape != self.center.shape:
            raise ValueError(f"a centre of {center.size} values for a head of width {self.center.size}")
        self.center = center.astype(np.float32, copy=True)
        self.seen = max(1, int(seen))
        self.stale = True

    def fit(self, rows: np.ndarray, labels: np.ndarray, present: np.ndarray) -> None:
        """Refit the prototypes or the softmax head (from scratch: see ``fit_head``).

        ``rows`` is a float32 copy of the sampled rows (transformed in place), ``labels`` their
        classes, ``present`` which of the classes have rows at all.
        """
        center = self.center.copy() if self.seen else None
        self.fitted = fit_head(self.rule, center, rows, labels, present)
        self.stale = False

    def answer(self, vector: np.ndarray, nearest: np.ndarray, classes: int) -> tuple[np.ndarray, int]:
        """Each class's probability and the winner, for a unit embedding whose most similar rows
        (most similar first) have the classes ``nearest``; the view rules need a fit first."""
        if self.rule in ("tfjs", "nearest"):
            votes = np.bincount(nearest, minlength=classes).astype(np.float32)
            winners = np.flatnonzero(votes == votes.max())
            # tfjs: a tie goes to the lowest class index; nearest: to the most similar row among the tied
            best = winners[0] if self.rule == "tfjs" else next(c for c in nearest if votes[c] == votes.max())
            return votes / len(nearest), int(best)
        probs = self.probabilities(vector)
        return probs, int(np.argmax(probs))

    def probabilities(self, vector: np.ndarray) -> np.ndarray:
        """The fitted head's class probabilities for one embedding (the per-frame path: few, small steps).

        The feature is q = (s - c) / |s - c| with s the unit square-rooted vector and c the fit's
        centre, so q @ W = (s @ W - c @ W) / sqrt(1 - 2 s.c + c.c), with c @ W and c.c kept from the fit.
        """
        f = self.fitted
        if f is None:
            raise RuntimeError("the head has not been fitted")
        s, norm = _sqrt_norm(vector)
        spread = max(1.0 - 2.0 * float(s @ f.center) / norm + f.center_sq, 1e-24)
        s_w = rowdot(f.rows, s)  # s @ W without BLAS: its threads spin on the interpreter's cores
        logits = (_TEMPERATURE / np.sqrt(spread)) * (s_w / norm - f.center_w) + f.bias
        logits[~f.present] = -np.inf  # a class with no examples can never win
        return _softmax(logits[np.newaxis])[0]


def fit_head(
    rule: str,
    center: np.ndarray | None,
    rows: np.ndarray,
    labels: np.ndarray,
    present: np.ndarray,
) -> Fit:
    """A prototype or softmax head fitted on ``rows`` (``Head.fit``'s arguments; transformed in place),
    centred on ``center`` (a copy: None for the rows' mean). Reads nothing else: the refitter
    (``refit.py``) calls it beside the loop.

    Always from scratch, so a head is a function of its rows and centre alone: the same on a device
    taught one example at a time, on its fleet's followers, and in ``edgeknn eval``. Fits started from
    the last one (30 steps instead of 100) carried their history: the centres of earlier fits, and
    classes pushed down while they had no examples; two devices with the same examples disagreed on
    5-15 % of the same photos. From scratch costs about 3x the CPU of such a refit, beside the loop
    (0.25 s at the 2 048-row sample here)."""
    x = sqrt_features(rows)
    center = x.mean(axis=0) if center is None else center
    x -= center
    unit_rows(x)
    c = len(present)
    if rule == "prototype":
        weights = np.zeros((x.shape[1], c), np.float32)
        np.add.at(weights.T, labels, x)
        weights /= np.maximum(np.linalg.norm(weights, axis=0, keepdims=True), 1e-12)
        bias = np.zeros(c, np.float32)
    else:
        weights, bias = _fit_softmax(x, labels, present)
    return Fit(
        weights,
        bias,
        center,
        present,
        rows=np.ascontiguousarray(weights.T),
        center_w=center @ weights,
        center_sq=float(center @ center),
    )


def sqrt_features(rows: np.ndarray) -> np.ndarray:
    """Square root (Tukey's power transform: evens out ReLU features), then unit length; in place."""
    np.maximum(rows, 0, out=rows)
    np.sqrt(rows, out=rows)
    return unit_rows(rows)


def _sqrt_norm(vector: np.ndarray) -> tuple[np.ndarray, float]:
    """One vector's square root (as ``sqrt_features``) and its norm, not yet divided: per frame."""
    s = np.sqrt(np.maximum(vector, 0, dtype=np.float32))
    return s, max(float(np.sqrt(s @ s)), 1e-12)


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """Scale each row of a float array to unit length, in place (a zero row stays zero).

    The norms come from one dot product per row: ``np.linalg.norm`` would square a whole copy.
    """
    norms = np.sqrt(rowdot(rows, rows))
    rows /= np.maximum(norms, 1e-12)[:, np.newaxis]
    return rows


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_softmax(x: np.ndarray, y: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent on (n, d) unit features, over
    the ``present`` classes only (a class with no examples keeps zero weights and cannot win)."""
    d, classes = x.shape[1], len(present)
    weights, bias = np.zeros((d, classes), np.float32), np.zeros(classes, np.float32)
    onehot = np.eye(classes, dtype=np.float32)[y]
    absent = np.where(present, 0.0, -np.inf).astype(np.float32)
    for _ in range(_FIT_STEPS):
        p = _softmax(_TEMPERATURE * (x @ weights) + bias + absent)
        g = (p - onehot) / len(x)
        weights -= _LEARNING_RATE * (_TEMPERATURE * (x.T @ g) + _WEIGHT_DECAY * weights)
        bias -= _LEARNING_RATE * g.sum(axis=0)
    return weights, bias

"""KnnStore: the trained examples, how a frame is classified against them, and their file.

Plain numpy. Rows are L2-normalised embeddings kept in one preallocated matrix that doubles when
full (so adding is O(1) amortised), with the class of each row and the example it came from (an
added example may be stored as several augmented views). The store knows the model only by its
identity string, and refuses a file written for another model.

Rules (``RULES``):
- ``tfjs``: TensorFlow.js knn-classifier: the k most similar rows vote, confidences are votes/k, a
  tie goes to the lowest class index. Kept for comparison.
- ``nearest``: the same vote, a tie goes to the class of the most similar row.
- ``prototype``: the most similar class mean of the transformed features.
- ``softmax`` (the default; best measured, see README): a small softmax head refit on the store's
  rows in milliseconds, as Teachable Machine 2 does, on square-rooted, centred features. The
  centre is the running mean of the frames the device has seen (``observe``), or of the rows.
Every rule answers ``unknown`` when the store is empty or the best cosine similarity to any row is
below ``threshold``, and names its nearest rows so that an answer can be explained.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
RULES = ("softmax", "prototype", "nearest", "tfjs")
DEFAULT_RULE = "softmax"
VIEW_RULES = ("softmax", "prototype")  # rules that store augmented views of each added example
UNKNOWN = "unknown"
_FIT_STEPS, _REFIT_STEPS, _TEMPERATURE, _LEARNING_RATE, _WEIGHT_DECAY = 100, 30, 10.0, 1.0, 1e-3
_CENTER_WINDOW = 1000  # frames: the centre becomes a moving average after this many
_FIT_ROWS = 2048  # the head is fitted on at most this many rows (bounded time and memory, any store size)
_WIDEN_ROWS = 512  # uint8 rows widened to float32 at a time (2 MB: stays in cache)


def _rowdot(rows: np.ndarray, q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``rows @ q`` as one dot product per row on this thread (numpy < 2 has no vecdot: einsum)."""
    if _vecdot is not None:
        return _vecdot(rows, q, out=out)
    return np.einsum("ij,j->i", rows, q, out=out)


_vecdot = getattr(np, "vecdot", None)


class StoreError(Exception):
    """A store file cannot be used; ``corrupt`` tells whether moving it aside is the remedy."""

    def __init__(self, message: str, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    scores: dict[str, float]
    similarity: float
    neighbours: list[tuple[str, float]] = field(default_factory=list)


class KnnStore:
    def __init__(
        self,
        dim: int,
        model_id: str,
        *,
        k: int = 3,
        rule: str = DEFAULT_RULE,
        threshold: float = 0.0,
        capacity: int = 1000,
        storage: str = "float32",
    ):
        if rule == "default":
            rule = DEFAULT_RULE
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
        if storage not in ("float32", "uint8"):
            raise ValueError(f"unknown storage {storage!r}; expected float32 or uint8")
        self.dim, self.model_id = dim, model_id
        self.k, self.rule, self.threshold, self.capacity, self.storage = k, rule, threshold, capacity, storage
        self.classes: list[str] = []
        self._n = 0
        self._rows = np.zeros((64, dim), np.float32 if storage == "float32" else np.uint8)
        self._scale = np.zeros(64, np.float32)  # uint8 storage: 1 / norm of each raw row
        self._labels = np.zeros(64, np.int32)
        self._example = np.zeros(64, np.int64)  # which added example a row belongs to (views share it)
        self._next_example = 0
        self._examples: dict[str, int] = {}
        self._center = np.zeros(dim, np.float32)
        self._seen = 0
        self._head: tuple[np.ndarray, np.ndarray] | None = None  # (d, classes) weights, bias
        self._head_center = self._center  # the centre the head was fitted with, its product
        self._head_rows = np.zeros((0, dim), np.float32)
        self._head_center_w = np.zeros(0, np.float32)  # with the weights and with itself
        self._head_center_sq = 0.0
        self._present = np.zeros(0, bool)
        self._dirty = True
        self._widened: np.ndarray | None = None  # uint8 storage: float32 scratch rows for similarities

    # --- examples -------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def counts(self) -> dict[str, int]:
        """Examples per class, in class order (a class may have none yet)."""
        return {name: self._examples.get(name, 0) for name in self.classes}

    def ensure_class(self, name: str) -> int:
        if name not in self.classes:
            self.classes.append(name)
            self._dirty = True
        return self.classes.index(name)

    def add(self, name: str, views: np.ndarray) -> int:
        """Store one example of ``name`` (one or more views, rows of ``dim``); return its class count."""
        views = np.atleast_2d(np.asarray(views, np.float32))
        if views.shape[1] != self.dim:
            raise ValueError(f"expected vectors of {self.dim} values, got {views.shape[1]}")
        if len(views) == 0:
            raise ValueError("expected at least one vector")
        if self.storage == "float32":  # convert first: a refused example changes nothing
            values = (views / np.maximum(np.linalg.norm(views, axis=1, keepdims=True), 1e-12),)
        else:
            values = _to_uint8(views)
        label = self.ensure_class(name)
        rows: slice | np.ndarray | None = None
        if self._examples.get(name, 0) >= self.capacity:
            # A full class: the new example takes the rows of its oldest one when it has as many
            # views (always, from the daemon), so adding never moves the whole matrix.
            oldest = np.flatnonzero(self._oldest_rows(label))
            if len(oldest) == len(views):
                rows = oldest
            else:
                self._drop_oldest(label)
        if rows is None:
            need = self._n + len(views)
            if need > len(self._rows):
                self._grow(max(need, _with_room(len(self._rows))))
            rows = slice(self._n, need)
            self._n = need
            self._examples[name] = self._examples.get(name, 0) + 1
        self._rows[rows] = values[0]
        if self.storage != "float32":
            self._scale[rows] = values[1]
        self._labels[rows] = label
        self._example[rows] = self._next_example
        self._next_example += 1
        self._dirty = True
        return self._examples[name]

    def forget(self, name: str) -> int:
        """Remove every example of class ``name`` (the class stays known); return how many went."""
        if name not in self.classes:
            raise KeyError(name)
        keep = self._labels[: self._n] != self.classes.index(name)
        self._compact(keep)
        return self._examples.pop(name, 0)

    def rename(self, old: str, new: str) -> None:
        if old not in self.classes:
            raise KeyError(old)
        if new in self.classes:
            raise ValueError(f"class {new!r} already exists")
        self.classes[self.classes.index(old)] = new
        if old in self._examples:
            self._examples[new] = self._examples.pop(old)
        self._dirty = True

    def reset(self) -> None:
        """Forget every example; the class names stay."""
        self._compact(np.zeros(self._n, bool))
        self._examples.clear()

    def _oldest_rows(self, label: int) -> np.ndarray:
        """A mask of the rows of the oldest example of class ``label`` (which has examples)."""
        mine = self._labels[: self._n] == label
        oldest = self._example[: self._n][mine].min()
        return mine & (self._example[: self._n] == oldest)

    def _drop_oldest(self, label: int) -> None:
        self._compact(~self._oldest_rows(label))
        self._examples[self.classes[label]] -= 1

    def _compact(self, keep: np.ndarray) -> None:
        n = int(keep.sum())
        for a in (self._rows, self._scale, self._labels, self._example):
            a[:n] = a[: self._n][keep]
        self._n = n
        self._dirty = True

    def _grow(self, size: int) -> None:
        """Reallocate the arrays shorter than ``size`` rows, keeping the stored ones (rows grow by
        half again when full: amortised O(1) adds, and teaching a loaded store needs 2.5x its rows
        for a moment, not 3x)."""
        for name in ("_rows", "_scale", "_labels", "_example"):
            old = getattr(self, name)
            if len(old) < size:
                new = np.zeros((size, *old.shape[1:]), old.dtype)
                new[: self._n] = old[: self._n]
                setattr(self, name, new)

    # --- classification -------------------------------------------------------------------

    def observe(self, vector: np.ndarray) -> None:
        """Fold a seen frame's embedding into the centre of the feature space (the default rule uses it)."""
        self._seen += 1
        rate = 1.0 / min(self._seen, _CENTER_WINDOW)
        s, norm = _sqrt_norm(vector)
        s *= rate / norm  # its square-rooted unit vector, times the rate
        self._center *= 1.0 - rate
        self._center += s
        if self._seen % _CENTER_WINDOW == 0:
            self._dirty = True  # the centre has moved: refit the head on the next frame

    def similarities(self, vector: np.ndarray) -> np.ndarray:
        """Cosine similarity of a unit ``vector`` to every stored row.

        One dot product per row on the calling thread (``np.vecdot``), not a BLAS matrix-vector
        product: OpenBLAS splits that over threads that then wait for cores the interpreter's own
        threads and the camera thread are using, which cost the daemon's loop milliseconds a frame.
        """
        q = np.asarray(vector, np.float32)
        if self.storage == "float32":
            return _rowdot(self._rows[: self._n], q)
        out = np.empty(self._n, np.float32)
        if self._widened is None or len(self._widened) < min(self._n, _WIDEN_ROWS):
            self._widened = np.empty((min(self._n, _WIDEN_ROWS), self.dim), np.float32)
        for start in range(0, self._n, _WIDEN_ROWS):  # uint8 rows widen per chunk, in a reused buffer
            stop = min(start + _WIDEN_ROWS, self._n)
            rows = self._widened[: stop - start]
            np.copyto(rows, self._rows[start:stop], casting="unsafe")
            _rowdot(rows, q, out=out[start:stop])
        return out * self._scale[: self._n]

    def classify(self, vector: np.ndarray) -> Prediction:
        """Classify one unit embedding; ``unknown`` with empty scores when the store has no examples."""
        if self._n == 0:
            return Prediction(UNKNOWN, 0.0, {}, 0.0)
        sims = self.similarities(vector)
        k = min(self.k, self._n)
        nearest = np.argpartition(sims, self._n - k)[self._n - k :]
        nearest = nearest[np.argsort(-sims[nearest], kind="stable")]
        labels = self._labels[nearest]
        if self.rule in ("tfjs", "nearest"):
            votes = np.bincount(labels, minlength=len(self.classes)).astype(np.float32)
            winners = np.flatnonzero(votes == votes.max())
            # tfjs: a tie goes to the lowest class index; nearest: to the most similar row among the tied
            best = winners[0] if self.rule == "tfjs" else next(c for c in labels if votes[c] == votes.max())
            probs = votes / k
        else:
            probs = self._probabilities(vector)
            best = int(np.argmax(probs))
        scores = {
            name: float(p) for name, p in zip(self.classes, probs, strict=True) if self._examples.get(name)
        }
        similarity = float(sims[nearest[0]])
        neighbours = [(self.classes[i], float(s)) for i, s in zip(labels, sims[nearest], strict=True)]
        if similarity < self.threshold:
            return Prediction(UNKNOWN, 0.0, scores, similarity, neighbours)
        return Prediction(self.classes[best], float(probs[best]), scores, similarity, neighbours)

    def _float_rows(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        """A float32 copy of the stored rows (all, or ``index`` into them), uint8 ones scaled back."""
        index = slice(0, self._n) if index is None else index
        if self.storage == "float32":
            return self._rows[: self._n][index].copy() if isinstance(index, slice) else self._rows[index]
        return self._rows[index].astype(np.float32) * self._scale[index, None]

    def _fit_rows(self) -> np.ndarray | slice:
        """The rows the head is fitted on: all, or ``_FIT_ROWS`` of them shared out between the
        classes and, within a class, spread evenly over its examples' ages (the newest included).

        Fitting on a bounded sample keeps the first fit, the refit after each added example and
        its memory the same at 10 000 rows as at 2 000, so holding a button never stalls the loop.
        """
        n = self._n
        if n <= _FIT_ROWS:
            return slice(0, n)
        labels = self._labels[:n]
        present = np.flatnonzero(np.bincount(labels, minlength=len(self.classes)))
        quota = _FIT_ROWS // len(present)
        chosen = []
        for label in present:
            rows = np.flatnonzero(labels == label)
            if len(rows) > quota:
                rows = rows[np.argsort(self._example[rows], kind="stable")]
                rows = rows[np.linspace(0, len(rows) - 1, quota).round().astype(np.intp)]
            chosen.append(rows)
        return np.sort(np.concatenate(chosen))

    def _probabilities(self, vector: np.ndarray) -> np.ndarray:
        """The head's class probabilities for one embedding (the per-frame path: few, small steps).

        The feature is q = (s - c) / |s - c| with s the unit square-rooted vector and c the fit's
        centre, so q @ W = (s @ W - c @ W) / sqrt(1 - 2 s.c + c.c), with c @ W and c.c kept from the fit.
        """
        if self._dirty:
            self._fit()
        bias = self._head[1]
        s, norm = _sqrt_norm(vector)
        spread = max(1.0 - 2.0 * float(s @ self._head_center) / norm + self._head_center_sq, 1e-24)
        s_w = _rowdot(self._head_rows, s)  # s @ W without BLAS: its threads spin on the interpreter's cores
        logits = (_TEMPERATURE / np.sqrt(spread)) * (s_w / norm - self._head_center_w) + bias
        logits[~self._present] = -np.inf  # a class with no examples can never win
        return _softmax(logits[np.newaxis])[0]

    def fit(self) -> None:
        """Fit the rule's head now if it is due (else the next classify does it).

        The daemon calls this before it reports ready, so its first frame is not held up by the
        fit, and the fit's working memory comes and goes before the camera and MQTT add theirs.
        """
        if self._dirty and self._n and self.rule in VIEW_RULES:
            self._fit()

    def _fit(self) -> None:
        """Refit the prototypes or the softmax head on the store's rows (warm-started when possible)."""
        c = len(self.classes)
        self._present = np.bincount(self._labels[: self._n], minlength=c) > 0
        index = self._fit_rows()
        x = _sqrt_features(self._float_rows(index))  # the features, computed in place in this copy
        self._head_center = self._center.copy() if self._seen else x.mean(axis=0)
        x -= self._head_center
        _unit(x)
        y = self._labels[: self._n][index]
        if self.rule == "prototype":
            protos = np.zeros((self.dim, c), np.float32)
            np.add.at(protos.T, y, x)
            protos /= np.maximum(np.linalg.norm(protos, axis=0, keepdims=True), 1e-12)
            self._head = (protos, np.zeros(c, np.float32))
        else:
            self._head = _fit_softmax(x, y, c, self._head)
        self._head_rows = np.ascontiguousarray(self._head[0].T)  # one row of weights per class
        self._head_center_w = self._head_center @ self._head[0]
        self._head_center_sq = float(self._head_center @ self._head_center)
        self._dirty = False

    # --- files ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file beside ``path``, fsync, rename, fsync the directory."""
        path = Path(path)
        arrays = self._arrays()
        arrays["checksum"] = np.array(_checksum(arrays))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                _write_npz(f, arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _remove_stale_temporaries(path)

    def _arrays(self) -> dict[str, np.ndarray]:
        n = self._n
        return {
            "format_version": np.array(FORMAT_VERSION),
            "model_id": np.array(self.model_id),
            "storage": np.array(self.storage),
            "classes": np.array(self.classes, dtype=str) if self.classes else np.zeros(0, "<U1"),
            "rows": self._rows[:n],
            "scale": self._scale[:n],
            "labels": self._labels[:n],
            "example": self._example[:n],
            "center": self._center,
            "seen": np.array(self._seen),
        }

    @classmethod
    def load(cls, path: Path, model_id: str, **settings) -> KnnStore:
        """Load a store; StoreError names the file and says what is wrong with it."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {name: f[name] for name in f.files if name != "rows"}
                if "rows" in f.files:
                    room, n = _read_rows(f.zip)
                    arrays["rows"] = room[:n]
        except FileNotFoundError:
            raise StoreError(f"{path}: store file not found") from None
        except PermissionError as e:
            raise StoreError(f"{path}: cannot read store ({e.strerror})") from None
        except ValueError as e:
            if not zipfile.is_zipfile(path):  # numpy takes any file that is not .npz/.npy for a pickle
                raise StoreError(f"{path}: not a readable store (not an .npz file)", corrupt=True) from None
            if "pickle" in str(e):
                raise StoreError(f"{path}: store holds pickled objects, refused", corrupt=True) from None
            raise StoreError(f"{path}: not a readable store ({e})", corrupt=True) from None
        except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
            raise StoreError(
                f"{path}: not a readable store ({type(e).__name__}: {e})", corrupt=True
            ) from None
        expected = {*cls(1, "")._arrays(), "checksum"}
        if set(arrays) != expected:
            raise StoreError(f"{path}: not an edgeknn store (arrays {sorted(arrays)})", corrupt=True)
        checksum = str(arrays.pop("checksum"))
        if _checksum(arrays) != checksum:
            raise StoreError(f"{path}: checksum mismatch, the file is damaged", corrupt=True)
        if int(arrays["format_version"]) != FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format {int(arrays['format_version'])}, expected {FORMAT_VERSION}"
            )
        if str(arrays["model_id"]) != model_id:
            raise StoreError(
                f"{path}: store was made with model {str(arrays['model_id'])[:12]}, "
                f"not the configured model {model_id[:12]}; move it aside or configure that model"
            )
        rows, scale = arrays["rows"], arrays["scale"]
        settings.setdefault("storage", str(arrays["storage"]))
        store = cls(rows.shape[1], model_id, **settings)
        store.classes = [str(c) for c in arrays["classes"]]
        n = len(rows)
        if store.storage == str(arrays["storage"]):
            store._rows = room  # the rows as read, with their room to grow (no copy of them)
        elif store.storage == "float32":  # converting between storages
            store._rows, scale = rows.astype(np.float32) * scale[:, None], np.zeros(n, np.float32)
        else:
            store._rows, scale = _to_uint8(rows)
        store._scale = scale.astype(np.float32, copy=False)
        store._labels = arrays["labels"].astype(np.int32, copy=False)
        store._example = arrays["example"].astype(np.int64, copy=False)
        store._n = n
        store._grow(max(64, len(store._rows)))  # the per-row arrays get the rows' room
        store._next_example = int(arrays["example"].max()) + 1 if n else 0
        first_rows = np.unique(arrays["example"], return_index=True)[1]
        per_class = np.bincount(arrays["labels"][first_rows], minlength=len(store.classes))
        store._examples = {name: int(c) for name, c in zip(store.classes, per_class, strict=True) if c}
        store._center, store._seen = arrays["center"].astype(np.float32), int(arrays["seen"])
        return store


def _with_room(rows: int) -> int:
    """How many rows to allocate for ``rows``: half as many again."""
    return rows + rows // 2


def _write_npz(file, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes, without its copies: it hands the zip each array in 16 MB
    ``tobytes()`` pieces, which cost a 10 000-row store 16 MB more memory at every autosave."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            array = array if array.flags.c_contiguous else array.copy()  # 0-d arrays stay 0-d
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
                member.write(array.reshape(-1).view(np.uint8))


def _read_rows(archive: zipfile.ZipFile) -> tuple[np.ndarray, int]:
    """The stored rows read into a matrix with room for half as many again, and their number.

    The room is memory the kernel has not handed out yet: it costs nothing until examples fill it,
    and a store taught after loading does not copy all its rows to grow (np.load would read the
    rows into a matrix of exactly their size).
    """
    with archive.open("rows.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:  # never unpickled: the message makes load() say so
            raise ValueError("the rows hold pickled objects")
        if len(shape) != 2 or fortran_order or dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
            raise ValueError(f"rows are {dtype} {shape}, expected a float32 or uint8 matrix")
        n = shape[0]
        room = np.empty((_with_room(n), shape[1]), dtype)
        data = memoryview(room.reshape(-1)[: n * shape[1]].view(np.uint8))
        for start in range(0, len(data), 1 << 20):  # in 1 MB pieces: readinto would read a copy of all
            piece = data[start : start + (1 << 20)]
            if f.readinto(piece) != len(piece):
                raise EOFError("the rows are cut short")
    return room, n


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of writers killed mid-save (a power cut), so they cannot pile up.

    A temporary file is named after its writer's pid; one whose process is still alive is left alone.
    """
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):  # the save itself succeeded; a leftover is only untidy
                tmp.unlink()
        except OSError:
            pass  # alive (another user's process), or cannot tell: keep it


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the bytes of tobytes(), without a copy of them
    return h.hexdigest()


def _to_uint8(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative vectors as uint8 rows scaled to 0..255 plus 1/norm of each row.

    The extractor's output is uint8 with zero point 0, so its cosine is kept (up to rounding).
    """
    if (views < 0).any():
        raise ValueError("uint8 storage needs non-negative embeddings (ReLU outputs); use float32")
    peak = np.maximum(views.max(axis=1, keepdims=True), 1e-12)
    q = np.round(views * (255.0 / peak)).astype(np.uint8)
    norms = np.linalg.norm(q.astype(np.float32), axis=1)
    return q, (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)


def _sqrt_features(rows: np.ndarray) -> np.ndarray:
    """Square root (Tukey's power transform: evens out ReLU features), then unit length; in place."""
    np.maximum(rows, 0, out=rows)
    np.sqrt(rows, out=rows)
    return _unit(rows)


def _sqrt_norm(vector: np.ndarray) -> tuple[np.ndarray, float]:
    """One vector's square root (as ``_sqrt_features``) and its norm, not yet divided: per frame."""
    s = np.sqrt(np.maximum(vector, 0, dtype=np.float32))
    return s, max(float(np.sqrt(s @ s)), 1e-12)


def _unit(rows: np.ndarray) -> np.ndarray:
    """Scale each row of a float array to unit length, in place (a zero row stays zero).

    The norms come from one dot product per row: ``np.linalg.norm`` would square a whole copy.
    """
    norms = np.sqrt(_rowdot(rows, rows))
    rows /= np.maximum(norms, 1e-12)[:, np.newaxis]
    return rows


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_softmax(x: np.ndarray, y: np.ndarray, classes: int, start) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent on (n, d) unit features."""
    d = x.shape[1]
    weights, bias = np.zeros((d, classes), np.float32), np.zeros(classes, np.float32)
    steps = _FIT_STEPS
    if start is not None and start[0].shape == weights.shape:
        weights, bias, steps = start[0].copy(), start[1].copy(), _REFIT_STEPS
    onehot = np.eye(classes, dtype=np.float32)[y]
    for _ in range(steps):
        p = _softmax(_TEMPERATURE * (x @ weights) + bias)
        g = (p - onehot) / len(x)
        weights -= _LEARNING_RATE * (_TEMPERATURE * (x.T @ g) + _WEIGHT_DECAY * weights)
        bias -= _LEARNING_RATE * g.sum(axis=0)
    return weights, bias

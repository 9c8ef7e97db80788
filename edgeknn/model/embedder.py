"""The Embedder (image -> L2-normalised vector) on a TFLite model: an embedding extractor's output, or a
classifier's penultimate pooled tensor found from the graph.

The six augmented views an added example stores are made here too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeknn.model.tflite import Model, ModelError, TensorInfo


class Embedder:
    """Image → L2-normalised float32 embedding.

    Works with an embedding extractor (its output is the embedding) and with a full classifier,
    whose penultimate (pooled) tensor is read; that needs ``experimental_preserve_all_tensors``,
    which costs memory and some time per invoke (see the README).
    """

    def __init__(
        self, path: Path, threads: int = 0, probe: Model | None = None, classifier: bool | None = None
    ):
        """``probe``: the model already loaded; ``classifier``: whether it ends in class scores (None: guess
        from the output's name, metadata and width)."""
        probe = probe or Model(path, threads)
        if classifier is None:
            classifier = _looks_like_classifier(probe) or ends_in_probabilities(probe)
        self.is_classifier = classifier
        self.model = Model(path, threads, preserve_all_tensors=True) if self.is_classifier else probe
        self.feature = _penultimate(self.model) if self.is_classifier else self.model.output
        self.dim = self.feature.size
        self.identity = self.model.sha256
        self.storage = storage_of(self.feature)  # what ``store.storage = "auto"`` keeps its rows in

    def embed(self, image: np.ndarray) -> np.ndarray:
        self.model.invoke(image)
        return self.embedding()

    def embedding(self) -> np.ndarray:
        """The L2-normalised embedding of the last invoke."""
        vector = self.model.tensor(self.feature)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector

    def embed_views(self, image: np.ndarray, each: Callable[[], None] | None = None) -> np.ndarray:
        """Embeddings of ``augmented_views(image)``: what one added example stores, shape (6, dim).

        ``each`` is called after every view: the daemon pings systemd's watchdog there, since six
        invokes on a slow or emulated CPU can outlast WatchdogSec.
        """
        rows = []
        for view in augmented_views(image, self.model.width / self.model.height):
            rows.append(self.embed(view))
            if each is not None:
                each()
        return np.stack(rows)


def storage_of(feature: TensorInfo) -> str:
    """``"uint8"`` when the embedding is a quantized 8-bit tensor whose lowest value is 0 (uint8 with
    zero point 0, int8 with -128: ReLU outputs, 256 non-negative multiples of its scale, which a
    store's uint8 rows keep up to rounding), else ``"float32"`` (a float model such as Teachable
    Machine's model_unquant, or an output that can be negative)."""
    lowest = {"uint8": 0, "int8": -128}.get(feature.dtype)
    quantized = lowest is not None and feature.zero_point == lowest and feature.scale > 0
    return "uint8" if quantized else "float32"


def augmented_views(image: np.ndarray, aspect: float = 1.0, zoom: float = 0.8) -> list[np.ndarray]:
    """The frame as the model sees it, its mirror image, and its four corners at ``zoom``.

    Storing these six views per added example raised few-shot accuracy (1 shot: +2.5 points on
    the sign-digit photos; see the README), at the cost of six invokes per added example.
    """
    h, w = image.shape[:2]
    cw, ch = (round(h * aspect), h) if w / h > aspect else (w, round(w / aspect))
    top, left = (h - ch) // 2, (w - cw) // 2
    seen = image[top : top + ch, left : left + cw]
    zh, zw = max(1, round(ch * zoom)), max(1, round(cw * zoom))
    corners = [seen[y : y + zh, x : x + zw] for y in (0, ch - zh) for x in (0, cw - zw)]
    return [seen, seen[:, ::-1], *corners]


def ends_in_probabilities(model: Model) -> bool:
    """The model ends in a small vector of class probabilities (2..999: an ImageNet-sized one is told
    apart by ``_looks_like_classifier``), checked on a grey frame: a Teachable Machine export."""
    if len(model.output.shape) != 2 or not 2 <= model.output.size < 1000:
        return False
    model.invoke(np.full((model.height, model.width, 3), 128, np.uint8))
    probs = model.tensor(model.output)
    return bool(probs.min() >= -1e-3 and abs(float(probs.sum()) - 1) < 0.05)


def _looks_like_classifier(model: Model) -> bool:
    """A classifier ends in per-class scores (a softmax, or labels in its metadata)."""
    return (
        "softmax" in model.output.name.lower()
        or "prediction" in model.output.name.lower()
        or model.labels_from_metadata() is not None
        or len(model.output.shape) == 2
        and model.output.shape[1] in (1000, 1001)
    )


def _penultimate(model: Model) -> TensorInfo:
    """The pooled features: the input of the model's final classifier op, else (no graph to read) the
    highest-numbered pooled tensor."""
    found = _classifier_input(model)
    return TensorInfo.of(found) if found is not None else _highest_pooled(model)


def _pooled(shape: tuple[int, ...]) -> bool:
    return (len(shape) == 4 and shape[:3] == (1, 1, 1)) or (len(shape) == 2 and shape[0] == 1)


def _classifier_input(model: Model) -> dict | None:
    """Walk back from the output to the last op with a weight matrix (the final fully connected or
    1x1 conv); its data input is the feature layer.

    Read from the graph because the tensor numbering is no guide: on MobileNet v3 the highest-numbered
    pooled tensor is a squeeze-excite gate inside the last block. Works on delegated graphs too (the op
    names there are all DELEGATE): a weight is a constant (no op makes it, not an input) of 2+ dimensions.
    """
    try:
        ops = model.interpreter._get_ops_details()
    except Exception:  # an interpreter without the graph API
        return None
    tensors = {int(d["index"]): d for d in model.interpreter.get_tensor_details()}
    made_by = {int(t): op for op in ops for t in op["outputs"]}
    inputs = {int(d["index"]) for d in model.interpreter.get_input_details()}
    tensor = model.output.index
    for _ in range(len(ops)):
        op = made_by.get(tensor)
        if op is None:
            return None
        data = [int(t) for t in op["inputs"] if t >= 0 and (int(t) in made_by or int(t) in inputs)]
        weights = [
            int(t)
            for t in op["inputs"]
            if t >= 0
            and int(t) in tensors
            and int(t) not in made_by
            and int(t) not in inputs
            and len(tensors[int(t)]["shape"]) >= 2
        ]
        if len(data) != 1:
            return None
        if weights:
            found = tensors[data[0]]
            shape = tuple(int(x) for x in found["shape"])
            return found if _pooled(shape) and data[0] not in inputs else None
        tensor = data[0]
    return None


def _highest_pooled(model: Model) -> TensorInfo:
    """The last pooled feature tensor before the logits: shape [1,1,1,C] or [1,C], C != the output width."""
    n_out = model.output.size
    candidates = []
    for d in model.interpreter.get_tensor_details():
        shape = tuple(int(x) for x in d["shape"])
        if (
            _pooled(shape)
            and shape[-1] not in (n_out, n_out - 1)
            and shape[-1] >= 16
            and d["index"] != model.input.index
        ):
            candidates.append(d)
    if not candidates:
        raise ModelError(f"{model.path}: cannot find a pooled feature tensor to use as the embedding")
    return TensorInfo.of(max(candidates, key=lambda d: d["index"]))

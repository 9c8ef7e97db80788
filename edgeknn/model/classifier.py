"""Classifier models: image -> top-k labels, for `edgeknn classify` and for the device.

A classifier model (Teachable Machine's export, an ImageNet MobileNet) answers with its own class
probabilities. ``Classifier`` gives the top-k of one image (ml5's ``imageClassifier`` result);
``open_model`` gives the device either the k-NN ``Embedder`` or, for a classifier, a ``ScoreReader``
(an Embedder whose vector is the model's probabilities) with ``ModelClasses`` in place of the store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeknn.model.embedder import Embedder, ends_in_probabilities
from edgeknn.model.tflite import Model, ModelError, TensorInfo, load_interpreter, parse_labels, read_model
from edgeknn.store.knn import KnnStore
from edgeknn.store.matcher import Prediction
from edgeknn.store.names import UNKNOWN

log = logging.getLogger(__name__)

KINDS = ("auto", "embedder", "classifier")
SMALL = 100  # a model with fewer labels is "small": its top-k is every label (ml5's rule for TM models)
IMAGENET_TOP_K = 3  # ml5's default top-k for MobileNet
LABELS_BESIDE = "labels.txt"  # Teachable Machine's zip puts it beside model.tflite


def read_labels(path: Path) -> list[str]:
    """The labels of a labels file (see ``model.parse_labels``); ModelError names the file."""
    try:
        return parse_labels(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read labels file ({e})") from None


def fit_labels(labels: list[str], outputs: int, source: object) -> list[str]:
    """The labels for a model with ``outputs`` scores; one clear ModelError if they do not fit.

    Only an ImageNet model (1001 outputs) with 1000 labels gets "background" prepended: its index 0 is
    that class and many labels files leave it out. Anywhere else one label short would shift every class.
    """
    if len(labels) == outputs:
        return labels
    if outputs == 1001 and len(labels) == 1000:
        return ["background", *labels]
    raise ModelError(f"{source}: {len(labels)} labels for a model with {outputs} outputs")


def find_labels(model: Model, labels: Path | None) -> tuple[list[str], str] | None:
    """The model's labels and where they came from: ``labels`` if given, else those in the model's
    metadata, else a labels.txt beside the model (Teachable Machine's export); None if there are none."""
    if labels:
        return read_labels(labels), str(labels)
    found = model.labels_from_metadata()
    if found:
        return found, f"{model.path} (its metadata)"
    beside = model.path.parent / LABELS_BESIDE
    if beside.is_file():
        return read_labels(beside), str(beside)
    return None


PROBABILITY_SCALE = 1 / 256  # how TFLite quantizes a softmax's output: uint8 zero point 0, int8 -128
PASS_THROUGH = {"RESHAPE", "SQUEEZE", "QUANTIZE", "DEQUANTIZE"}  # ops that keep a softmax a softmax


def outputs_probabilities(interpreter, output: TensorInfo) -> bool:
    """Whether ``output`` holds probabilities, read from the model: the op that makes it (through reshapes
    and (de)quantization) is SOFTMAX, or it is quantized as TFLite quantizes a softmax (scale 1/256).

    Not from the values: a uint8 softmax's 256 steps round each of 1001 classes down, so its outputs sum
    to 0.95 on grace_hopper.bmp (mobilenet_v1_0.75_192), and a second softmax flattened them to 0.0015.
    """
    if output.scale and abs(output.scale - PROBABILITY_SCALE) < 1e-9 and output.zero_point in (0, -128):
        return True
    try:
        ops = interpreter._get_ops_details()
    except Exception:  # an interpreter without the graph API: logits, as a float output would be
        return False
    tensor = output.index
    for _ in range(len(ops)):
        makers = [op for op in ops if tensor in {int(t) for t in op["outputs"]}]
        if any(op["op_name"] == "SOFTMAX" for op in makers):
            return True
        through = [op for op in makers if op["op_name"] in PASS_THROUGH and len(op["inputs"])]
        if not through:
            return False
        tensor = int(through[0]["inputs"][0])
    return False


def probabilities(scores: np.ndarray, already: bool) -> np.ndarray:
    """The model's scores as probabilities: as they are if ``already`` (``outputs_probabilities``: a
    softmax's output), else their softmax (logits)."""
    scores = np.asarray(scores, np.float32).reshape(-1)
    if already:
        return scores
    e = np.exp(scores - scores.max())
    return e / e.sum()


def top_indices(probs: np.ndarray, top: int) -> np.ndarray:
    """The indices of the ``top`` highest probabilities, best first (ties: the lower index first)."""
    top = max(1, min(top, probs.size))
    best = np.argpartition(-probs, top - 1)[:top]
    return best[np.lexsort((best, -probs[best]))]


def default_top_k(classes: int) -> int:
    """Every class of a small model, 3 of an ImageNet-sized one (as ml5 does)."""
    return classes if classes < SMALL else IMAGENET_TOP_K


@dataclass(frozen=True)
class Label:
    """One of a classification's top-k answers."""

    label: str
    confidence: float


class Classifier:
    """Image → top-k ``[{label, confidence}]``, as ml5's ``imageClassifier.classify()`` returns.

    From a classifier model with a labels file or labels in its metadata (Teachable Machine's
    TFLite export with its labels.txt loads the same way), or from the embedding extractor plus a
    separate head model that takes the extractor's output tensor.
    """

    def __init__(self, path: Path, labels: Path | None = None, head: Path | None = None, threads: int = 0):
        self.model = Model(path, threads)
        self.head = _Head(Path(head), self.model, threads) if head else None
        scores_info = self.head.model_output if self.head else self.model.output
        found = find_labels(self.model, labels)
        if not found:
            raise ModelError(f"{path}: no labels: pass a labels file (--labels)")
        self.labels: list[str] = fit_labels(found[0], scores_info.size, found[1])
        scorer = self.head.interpreter if self.head else self.model.interpreter
        self.probabilities_out = outputs_probabilities(scorer, scores_info)

    def classify(self, image: np.ndarray, top: int = 5) -> list[Label]:
        self.model.invoke(image)
        scores = self.head.run() if self.head else self.model.tensor(self.model.output)
        probs = probabilities(scores, self.probabilities_out)
        return [Label(self.labels[i], float(probs[i])) for i in top_indices(probs, top)]


class _Head:
    """A head model fed with the extractor's raw output tensor."""

    def __init__(self, path: Path, extractor: Model, threads: int):
        content = read_model(path)
        self.interpreter, _ = load_interpreter(content, str(path), threads)
        self.extractor = extractor
        self.input = TensorInfo.of(self.interpreter.get_input_details()[0])
        self.model_output = TensorInfo.of(self.interpreter.get_output_details()[0])
        if self.input.size != extractor.output.size:
            raise ModelError(
                f"{path}: head input has {self.input.size} values, "
                f"the model's output has {extractor.output.size}"
            )

    def run(self) -> np.ndarray:
        raw = self.extractor.interpreter.get_tensor(self.extractor.output.index)
        self.interpreter.set_tensor(self.input.index, raw.reshape(self.input.shape))
        self.interpreter.invoke()
        return self.model_output.dequantize(self.interpreter.get_tensor(self.model_output.index))


class SideHead:
    """A head model beside the k-NN (``model.head``): the extractor + head pair gives the taught label
    and the head's own top-k (ImageNet's) from one invoke of the extractor."""

    def __init__(self, embedder: Embedder, head: Path, labels: Path | None, top_k: int = 0, threads: int = 0):
        self._head = _Head(Path(head), embedder.model, threads)
        if labels is None:
            raise ModelError(f"model.head = {head}: its labels are needed: set model.labels")
        self.labels = fit_labels(read_labels(labels), self._head.model_output.size, labels)
        self.top_k = top_k or default_top_k(len(self.labels))
        self._probabilities_out = outputs_probabilities(self._head.interpreter, self._head.model_output)

    def scores(self) -> np.ndarray:
        """The head's probabilities for the extractor's last invoke (on the thread that invoked it)."""
        return probabilities(self._head.run(), self._probabilities_out)

    def results(self, probs: np.ndarray) -> tuple[tuple[str, float], ...]:
        """The top-k (label, probability), best first."""
        return tuple((self.labels[i], float(probs[i])) for i in top_indices(probs, self.top_k))


# --- the device: a classifier model in place of the embedder and the store ---------------------------


class ScoreReader(Embedder):
    """The device's "embedder" for a classifier model: a frame's vector is the model's probabilities."""

    def __init__(self, model: Model, labels: list[str]):
        self.model = model
        self.is_classifier = True
        self.feature = model.output
        self.dim = model.output.size
        self.identity = model.sha256
        self.labels = labels
        self._probabilities_out = outputs_probabilities(model.interpreter, model.output)

    def embedding(self) -> np.ndarray:
        """The class probabilities of the last invoke."""
        return probabilities(self.model.tensor(self.feature), self._probabilities_out)


class ModelClasses(KnnStore):
    """In place of the store for a classifier model: its classes are the model's labels, it holds no
    examples (teaching is refused by the daemon) and ``classify`` reads a ScoreReader's probabilities.

    A Prediction's ``scores`` are the top-k (best first, ml5's result), its ``similarity`` the top-1
    probability; below ``threshold`` (a probability) the label is UNKNOWN.
    """

    def __init__(self, labels: list[str], model_id: str, top_k: int = 0, threshold: float = 0.0):
        super().__init__(len(labels), model_id)
        self.classes = list(labels)
        self.top_k = top_k or default_top_k(len(labels))
        self.threshold = threshold

    @property
    def rule(self) -> str:
        return "model"

    @property
    def effective_threshold(self) -> float:
        """The probability below which the answer is UNKNOWN."""
        return float(self.threshold or 0.0)

    def observe(self, vector: np.ndarray) -> None:
        """Nothing to learn from frames: the model's probabilities are the answer."""

    def fit(self) -> None:
        """Nothing to fit."""

    def classify(self, vector: np.ndarray) -> Prediction:
        probs = np.asarray(vector, np.float32).reshape(-1)
        best = top_indices(probs, self.top_k)
        scores: dict[str, float] = {}
        for i in best:  # a label twice in the file (ImageNet's "crane"): its best score
            scores.setdefault(self.classes[i], float(probs[i]))
        first = float(probs[best[0]])
        label = self.classes[best[0]] if first >= self.effective_threshold else UNKNOWN
        return Prediction(label, first, scores, first)


def open_model(path: Path, threads: int = 0, kind: str = "auto", labels: Path | None = None) -> Embedder:
    """The device's model: an ``Embedder`` (k-NN), or a ``ScoreReader`` for a classifier.

    ``kind`` "auto" takes a model whose output is a small probability vector (fewer than 1000 classes:
    an ImageNet model stays an embedder unless asked) and that has labels (``labels``, its metadata or
    a labels.txt beside it) as a classifier; the embedding extractor is an embedder.
    """
    if kind not in KINDS:
        raise ModelError(f'model.kind: expected one of "auto", "embedder", "classifier", got "{kind}"')
    probe = Model(path, threads)
    scores = ends_in_probabilities(probe)
    if kind == "embedder" or (kind == "auto" and not scores):  # a classifier's pooled features, if so
        return Embedder(path, threads, probe, classifier=scores or None)
    found = find_labels(probe, labels)
    if found is None:
        if kind == "classifier":
            raise ModelError(f"{path}: no labels: set model.labels (a labels file)")
        log.warning("%s: ends in class scores but has no labels: used as an embedder (k-NN)", path)
        return Embedder(path, threads, probe, classifier=True)
    return ScoreReader(probe, fit_labels(found[0], probe.output.size, found[1]))


def led_labels(configured: list[str], labels: list[str], leds: int) -> list[str]:
    """Which label each LED lights for (``panel.led_labels``; empty: the model's labels in order when
    there are no more of them than LEDs, else none); ModelError names a label the model does not have."""
    if not configured:
        return list(labels) if len(labels) <= leds else []
    for name in configured:
        if name not in labels:
            shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
            raise ModelError(f"panel.led_labels: {name!r} is not a label of the model ({shown})")
    return list(configured)

"""The pretrained-classifier path: image -> top-k ImageNet or Teachable Machine labels (`edgeknn classify`).

Built on ``model.Model``; the k-NN path (``model.Embedder``) does not need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeknn.model import Model, ModelError, TensorInfo, load_interpreter, parse_labels, read_model


def read_labels(path: Path) -> list[str]:
    """The labels of a labels file (see ``model.parse_labels``); ModelError names the file."""
    try:
        return parse_labels(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read labels file ({e})") from None


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
        found = read_labels(labels) if labels else self.model.labels_from_metadata()
        if not found:
            raise ModelError(f"{path}: no labels: pass a labels file (--labels)")
        n = scores_info.size
        if len(found) == n - 1:  # labels without the "background" class at index 0
            found = ["background", *found]
        self.labels: list[str] = found
        if len(self.labels) != n:
            raise ModelError(f"{labels or path}: {len(self.labels)} labels for a model with {n} outputs")

    def classify(self, image: np.ndarray, top: int = 5) -> list[Label]:
        self.model.invoke(image)
        scores = self.head.run() if self.head else self.model.tensor(self.model.output)
        if not (scores.min() >= 0 and abs(float(scores.sum()) - 1) < 0.05):  # logits: apply softmax
            e = np.exp(scores - scores.max())
            scores = e / e.sum()
        top = min(top, scores.size)
        best = np.argpartition(-scores, top - 1)[:top]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [Label(self.labels[i], float(scores[i])) for i in best]


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

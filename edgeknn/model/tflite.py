"""TFLite models: loading, preprocessing, quantization; the Embedder is in ``embedder``.

Knows numpy and the interpreter only. The interpreter comes from the first backend that can
*construct* an interpreter on the model: ai_edge_litert (LiteRT, with XNNPACK for uint8 on x86
and arm), then tflite_runtime (the armv7 wheels), then tensorflow.lite. Importing is not enough:
tflite-runtime 2.14 imports under numpy 2 but fails at construction.
The pretrained-classifier path (top-k labels) is built on this in ``classifier``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeknn.model.registry import by_file
from edgeknn.model.stderrfilter import without_xnnpack_banner

BACKENDS = ("ai_edge_litert", "tflite_runtime", "tensorflow")


class ModelError(Exception):
    """A model cannot be loaded or used; the message is one line naming the file."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _interpreter_class(backend: str):
    if backend == "ai_edge_litert":
        from ai_edge_litert.interpreter import Interpreter
    elif backend == "tflite_runtime":
        from tflite_runtime.interpreter import Interpreter
    else:
        from tensorflow.lite import Interpreter  # type: ignore[import-not-found]
    return Interpreter


def load_interpreter(content: bytes, name: str, threads: int = 0, preserve_all_tensors: bool = False):
    """Construct and allocate an interpreter with the first backend that works; return (it, backend)."""
    threads = threads or os.cpu_count() or 1
    failures = []
    for backend in BACKENDS:
        try:
            cls = _interpreter_class(backend)
        except Exception as e:  # ImportError, or a broken wheel raising anything at import
            failures.append(f"{backend}: not importable ({type(e).__name__}: {e})")
            continue
        try:
            with warnings.catch_warnings(), without_xnnpack_banner():
                warnings.simplefilter("ignore")  # LiteRT warns that preserving tensors is for debugging
                it = cls(
                    model_content=content,
                    num_threads=threads,
                    experimental_preserve_all_tensors=preserve_all_tensors,
                )
                it.allocate_tensors()
            return it, backend
        except ValueError as e:
            raise ModelError(f"{name}: not a valid TFLite model ({str(e).splitlines()[0]})") from None
        except Exception as e:
            cause = e.__cause__ or e.__context__ or e
            failures.append(f"{backend}: cannot construct an interpreter ({type(cause).__name__}: {cause})")
    raise ModelError(f"{name}: no TFLite interpreter works here: " + "; ".join(failures))


def read_model(path: Path) -> bytes:
    try:
        content = Path(path).read_bytes()
    except FileNotFoundError:
        hint = "set model.path or run `edgeknn model fetch`"
        known = by_file(path)
        if known is not None:  # offline, `model fetch` cannot work: say what goes where
            hint = (
                f"copy it there from {known.url} (sha256 {known.sha256}), "
                f"or run `edgeknn model fetch {known.name}` where there is network"
            )
        raise ModelError(f"{path}: model file not found ({hint})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read model file ({e.strerror})") from None
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ModelError(f"{path}: not a TFLite model (no TFL3 identifier)")
    return content


def crop_and_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop ``image`` to the target aspect ratio, then resize it bilinearly (uint8 RGB in and out).

    Cropping keeps proportions (measured: 0.5-9 accuracy points better than stretching). A crop much
    larger than the target is first box-averaged by an integer factor, so downscaling does not alias.
    A frame already of the target size is returned as is.
    """
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    target = width / height
    if w / h > target:
        cw, ch = max(1, round(h * target)), h
    else:
        cw, ch = w, max(1, round(w / target))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = image[top : top + ch, left : left + cw]
    factor = min(ch // height, cw // width)
    if factor >= 2:
        crop = _box_reduce(crop, factor)
        ch, cw = crop.shape[:2]
    if (ch, cw) == (height, width):
        return crop
    ys = np.clip((np.arange(height, dtype=np.float32) + 0.5) * (ch / height) - 0.5, 0, ch - 1)
    xs = np.clip((np.arange(width, dtype=np.float32) + 0.5) * (cw / width) - 0.5, 0, cw - 1)
    y0, x0 = ys.astype(np.intp), xs.astype(np.intp)
    y1, x1 = np.minimum(y0 + 1, ch - 1), np.minimum(x0 + 1, cw - 1)
    # Separable: interpolate each source row horizontally once, then blend pairs of those rows.
    # Rows are (ch, cw * 3) so columns gather with np.take and the weights broadcast along whole
    # rows (about 10x faster than per-pixel fancy indexing of (H, W, 3)). The weights are float64
    # (float32 minus intp), so each product is rounded as in the plain per-pixel formula.
    channels = np.arange(3)
    rows = crop.reshape(ch, cw * 3)
    a = np.take(rows, (x0[:, None] * 3 + channels).ravel(), axis=1).astype(np.float32)
    b = np.take(rows, (x1[:, None] * 3 + channels).ravel(), axis=1).astype(np.float32)
    b -= a
    a += b * np.repeat(xs - x0, 3)
    top, bottom = a[y0], a[y1]
    bottom -= top
    top += bottom * (ys - y0)[:, None]
    top += 0.5
    return top.astype(np.uint8).reshape(height, width, 3)


def _box_reduce(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks (integer sums of strided views: no per-pixel Python)."""
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    total = np.zeros((h // factor, w // factor, 3), np.uint32)
    for dy in range(factor):
        for dx in range(factor):
            total += image[dy:h:factor, dx:w:factor]
    total += factor * factor // 2
    total //= factor * factor
    return total.astype(np.uint8)


def _input_lut(dtype, scale: float, zero_point: int) -> np.ndarray | None:
    """Map raw pixels 0..255 to the model's input values, following the exporter that made the model.

    - float input (Teachable Machine's model_unquant, Keras): ``(x/127.5)-1``, MobileNet's [-1, 1].
    - uint8 input with scale 1/255 and zero point 0 (older Teachable Machine quantized exports): the
      raw pixels, as TM's own code feeds them. Mapping [-1, 1] through that quantization (pycoral's
      rule) gives ``clip(2x-255)``, which zeroes every value below 128.
    - any other quantized input (TF1 MobileNets: 1/128 at 128; current TM exports: their calibrated
      scale): ``(x/127.5)-1`` through the model's own scale and zero point.

    Returns None when that is the raw pixels (within 1), else a 256-entry lookup table.
    """
    pixels = np.arange(256, dtype=np.float64)
    wanted = pixels / 127.5 - 1.0
    if dtype == np.float32:
        return wanted.astype(np.float32)
    if scale == 0:  # unquantized integer input: raw pixels
        return None if dtype == np.uint8 else pixels.astype(dtype)
    if dtype == np.uint8 and zero_point == 0 and abs(scale * 255 - 1) < 1e-3:  # [0, 1]: older TM exports
        return None
    info = np.iinfo(dtype)
    q = np.clip(np.round(wanted / scale + zero_point), info.min, info.max)
    if dtype == np.uint8 and np.abs(q - pixels).max() <= 1:
        return None
    return q.astype(dtype)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of an interpreter: where it is, its shape and its quantization (scale 0 = none)."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @classmethod
    def of(cls, details: dict) -> TensorInfo:
        """From one entry of the interpreter's get_input_details() / get_tensor_details()."""
        scale, zero_point = details.get("quantization", (0.0, 0))
        shape = tuple(int(x) for x in details["shape"])
        return cls(
            details["name"], int(details["index"]), shape, details["dtype"].__name__, scale, zero_point
        )

    @property
    def size(self) -> int:
        """How many values the tensor holds."""
        return int(np.prod(self.shape))

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """The tensor's raw values as a flat float32 array of real values."""
        raw = raw.reshape(-1)
        if self.scale:
            return (raw.astype(np.float32) - self.zero_point) * np.float32(self.scale)
        return raw.astype(np.float32)


class Model:
    """A loaded TFLite model with one image input: preprocessing and invoke."""

    def __init__(self, path: Path, threads: int = 0, preserve_all_tensors: bool = False):
        self.path = Path(path)
        content = read_model(self.path)
        self.sha256 = hashlib.sha256(content).hexdigest()
        self.interpreter, self.backend = load_interpreter(content, str(path), threads, preserve_all_tensors)
        self.threads = threads or os.cpu_count() or 1
        self._content = content
        inp = self.interpreter.get_input_details()[0]
        self.input = TensorInfo.of(inp)
        self.output = TensorInfo.of(self.interpreter.get_output_details()[0])
        shape = self.input.shape
        if len(shape) != 4 or shape[3] != 3:
            raise ModelError(f"{path}: expected an image input of shape [1, H, W, 3], got {list(shape)}")
        self.height, self.width = int(shape[1]), int(shape[2])
        self._lut = _input_lut(inp["dtype"], self.input.scale, self.input.zero_point)

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the model's input, as cameras count it."""
        return self.width, self.height

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Crop and resize an RGB uint8 frame to the model's input size (done on the camera thread)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        return crop_and_resize(image, self.height, self.width)

    def set_input(self, image: np.ndarray) -> None:
        """Prepare one RGB uint8 frame of any size and place it in the input tensor."""
        pixels = self.prepare(image)
        if self._lut is not None:
            pixels = self._lut[pixels]
        self.interpreter.set_tensor(self.input.index, np.ascontiguousarray(pixels[np.newaxis]))

    def invoke(self, image: np.ndarray) -> None:
        """Run the model on one RGB uint8 frame of any size."""
        self.set_input(image)
        self.interpreter.invoke()

    def tensor(self, info: TensorInfo) -> np.ndarray:
        """A dequantized float32 copy of a tensor after invoke."""
        return info.dequantize(self.interpreter.get_tensor(info.index))

    def labels_from_metadata(self) -> list[str] | None:
        """Labels from the zip that TFLite metadata appends to the model file, if any."""
        try:
            with zipfile.ZipFile(io.BytesIO(self._content)) as z:
                names = [n for n in z.namelist() if n.endswith(".txt")]
                if not names:
                    return None
                return parse_labels(z.read(names[0]).decode("utf-8"))
        except (zipfile.BadZipFile, UnicodeDecodeError):
            return None

    def describe(self) -> dict:
        """What `edgeknn model info` prints."""
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "backend": self.backend,
            "threads": self.threads,
            "inputs": [_jsonable(TensorInfo.of(d)) for d in inputs],
            "outputs": [_jsonable(TensorInfo.of(d)) for d in outputs],
            "labels_in_metadata": len(self.labels_from_metadata() or []),
        }


def _jsonable(info: TensorInfo) -> dict:
    return {
        "name": info.name,
        "shape": list(info.shape),
        "dtype": info.dtype,
        "scale": info.scale,
        "zero_point": info.zero_point,
    }


def parse_labels(text: str) -> list[str]:
    """One label per line; a leading "<index> " on every line (Teachable Machine's labels.txt) is dropped.

    A UTF-8 byte-order mark (Windows Notepad saves one) and CRLF line ends are ignored.
    """
    lines = [line.strip() for line in text.removeprefix("\ufeff").splitlines() if line.strip()]
    numbered = [re.match(r"^(\d+)[\s:]+(.+)$", line) for line in lines]
    if lines and all(m and int(m.group(1)) == i for i, m in enumerate(numbered)):
        return [m.group(2) for m in numbered if m]
    return lines

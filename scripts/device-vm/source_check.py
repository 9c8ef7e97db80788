"""edgeknn's Picamera2Source on the real picamera2 and the VM's vimc camera: one result row per check.

    python source_check.py RESULTS_TSV FRAME_PNG

Appends "check<TAB>PASS|FAIL<TAB>seconds<TAB>detail" lines to RESULTS_TSV and saves the first frame as
FRAME_PNG. vimc's sensor draws 75% colour bars (white, yellow, cyan, green, magenta, red, blue, black, left to
right): read as R,G,B, the second bar is yellow (191, 191, 0) and the sixth red (191, 0, 0); with red and blue
swapped they would read cyan and blue.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
from PIL import Image

from edgeknn.camera.sources import Picamera2Source

BARS = ["white", "yellow", "cyan", "green", "magenta", "red", "blue", "black"]
RGB = {  # 75% bars: 191 is 0.75 of 255
    "white": (191, 191, 191),
    "yellow": (191, 191, 0),
    "cyan": (0, 191, 191),
    "green": (0, 191, 0),
    "magenta": (191, 0, 191),
    "red": (191, 0, 0),
    "blue": (0, 0, 191),
    "black": (0, 0, 0),
}

results_path, frame_path = sys.argv[1], sys.argv[2]
log_records: list[str] = []


class Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log_records.append(self.format(record))


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger().addHandler(Keep())


def record(name: str, ok: bool, started: float, detail: str) -> None:
    line = f"{name}\t{'PASS' if ok else 'FAIL'}\t{time.monotonic() - started:.0f}\t{detail}"
    with open(results_path, "a") as f:
        f.write(line.replace("\n", " ") + "\n")
    print("check: " + line.replace("\t", " | "), flush=True)


def bars(frame: np.ndarray) -> list[tuple[int, int, tuple[int, int, int]]]:
    """Runs of one colour along the middle row: (first column, width, mean RGB), at least 4 pixels wide."""
    row = frame[frame.shape[0] // 2].astype(int)
    runs: list[list[int]] = []
    for x in range(row.shape[0]):
        if runs and np.abs(row[x] - row[runs[-1][0]]).max() <= 40:
            runs[-1][1] += 1
        else:
            runs.append([x, 1])
    out = []
    for x, n in runs:
        if n >= 4:
            mean = row[x : x + n].mean(axis=0)
            out.append((x, n, (int(mean[0]), int(mean[1]), int(mean[2]))))
    return out


def nearest(rgb: tuple[int, int, int]) -> str:
    return min(RGB, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, RGB[name], strict=True)))


# 1. open, configure, start: the controls it asked for and what the camera advertises
t = time.monotonic()
try:
    source = Picamera2Source(0, size=(224, 224), fps=30.0)
    cam = source._camera
    asked = dict(cam.camera_config["controls"])
    advertised = set(cam.camera_controls)
    record(
        "Picamera2Source opens, configures, starts",
        True,
        t,
        f"asked controls {asked}; advertised: {sorted(advertised)}",
    )
except Exception as e:
    record("Picamera2Source opens, configures, starts", False, t, f"{type(e).__name__}: {e}")
    sys.exit(1)

# 2. only advertised controls, and the log says once what was skipped
t = time.monotonic()
unadvertised = [k for k in asked if Picamera2Source.STANDS_FOR.get(k, k) not in advertised]
said = [r for r in log_records if "does not advertise" in r]
record(
    "only advertised controls set, skipped ones logged",
    not unadvertised and (("FrameDurationLimits" in advertised) or len(said) == 1),
    t,
    f"set {sorted(asked)}; unadvertised among them: {unadvertised}; log: {said}",
)

# 3. frames of the configured size, uint8 RGB
t = time.monotonic()
frame = source.read()
frames = [frame] + [source.read() for _ in range(4)]
ok = all(f.shape == (224, 224, 3) and f.dtype == np.uint8 for f in frames)
record("frames 224x224x3 uint8", ok, t, f"{len(frames)} frames, shape {frame.shape} {frame.dtype}")
Image.fromarray(frame).save(frame_path)

# 4. channel order: vimc's colour bars read left to right as R,G,B
t = time.monotonic()
runs = bars(frame)
names = [nearest(rgb) for _, _, rgb in runs]
described = "; ".join(f"x={x}+{n} {rgb}={nearest(rgb)}" for x, n, rgb in runs)
record("colour bars in R,G,B order", names == BARS, t, described)

# 5. close and reopen: the same camera again, frames again
t = time.monotonic()
try:
    source.close()
    again = Picamera2Source(0, size=(224, 224), fps=30.0)
    frame2 = again.read()
    again.close()
    said = [r for r in log_records if "does not advertise" in r]
    record(
        "close and reopen",
        frame2.shape == (224, 224, 3) and len(said) <= 1,
        t,
        f"reopened, frame {frame2.shape}; skipped-controls lines in the log: {len(said)}",
    )
except Exception as e:
    record("close and reopen", False, t, f"{type(e).__name__}: {e}")

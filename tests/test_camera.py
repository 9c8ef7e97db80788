"""Camera sources (camera.py) and the camera thread (capture.py).

Against fake picamera2 / cv2 modules and real image files.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, needs_data
from PIL import Image
from rig import wait_for

from edgeknn.camera import capture as capture_module
from edgeknn.camera import uri as camerauri
from edgeknn.camera.capture import Capture, check_frame
from edgeknn.camera.sources import (
    OPENCV_MISSING,
    CameraError,
    OpenCVSource,
    Pacer,
    Picamera2Source,
    ReplaySource,
)
from edgeknn.camera.uri import open_source, source_opener
from edgeknn.imagefiles import ImageError, find_images, load_rgb

RED = (255, 0, 0)
SIZE = (224, 224)


def camera_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == Capture.THREAD_NAME and t.is_alive()]


@pytest.fixture(autouse=True)
def no_camera_thread_left():
    yield
    assert wait_for(lambda: not camera_threads(), 10), "a test left a camera thread running"


# --- a fake picamera2 that stores pixels the way the real one does -------------------------------------

# picamera2's byte order per pixel for each format (its names follow DRM fourcc, not the byte order).
STORED_ORDER = {"BGR888": "RGB", "RGB888": "BGR", "XBGR8888": "RGBA", "XRGB8888": "BGRA"}


# What picamera2's camera_controls (name -> (min, max, default)) lists: a Pi camera module's ISP has frame
# durations (the 30 fps of create_video_configuration's default); the kernel's vimc test camera, through
# libcamera 0.4 in scripts/check-device-vm.sh, has only these three, and no FrameDurationLimits.
PI_CONTROLS = {
    "FrameDurationLimits": (33333, 120000, 33333),
    "ExposureTime": (1, 66666, 20000),
    "AnalogueGain": (1.0, 16.0, 1.0),
    "NoiseReductionMode": (0, 4, 0),
}
VIMC_CONTROLS = {"Brightness": (-1.0, 1.0, 0.0), "Contrast": (0.0, 2.0, 1.0), "Saturation": (0.0, 2.0, 1.0)}
# picamera2's own names that stand for a libcamera control (its Controls._VIRTUAL_FIELDS_MAP_).
VIRTUAL_CONTROLS = {"FrameRate": "FrameDurationLimits"}


class FakePicamera2:
    instances: list[FakePicamera2] = []
    colour = RED
    fail_stop = False
    gone = False  # unplugged: no frame ever comes
    advertised = PI_CONTROLS

    def __init__(self, camera_num: int = 0):
        self.camera_num = camera_num
        self.calls: list[str] = []
        self.asked: dict = {}
        self.config: dict | None = None
        type(self).instances.append(self)

    @property
    def camera_controls(self) -> dict[str, tuple]:
        return dict(self.advertised)

    def _check_controls(self, controls: dict) -> None:
        """As picamera2's Controls: an unadvertised control (FrameRate as FrameDurationLimits) is refused."""
        for name in controls:
            name = VIRTUAL_CONTROLS.get(name, name)
            if name not in self.advertised:
                raise RuntimeError(f"Control {name} is not advertised by libcamera")

    # The real keyword arguments, so that a misspelt one fails here as it would on a Pi.
    def create_video_configuration(
        self,
        main=None,
        lores=None,
        raw=None,
        transform=None,
        colour_space=None,
        buffer_count=6,
        controls=None,
        display="main",
        encode="main",
        queue=True,
        sensor=None,
        use_case="video",
    ) -> dict:
        self.asked = {
            "main": dict(main or {}),
            "buffer_count": buffer_count,
            "controls": controls,
            "queue": queue,
        }
        return {"main": dict(main or {}), "lores": lores, "buffer_count": buffer_count, "controls": controls}

    create_preview_configuration = create_video_configuration

    def configure(self, config: dict) -> None:
        self._check_controls(config.get("controls") or {})  # picamera2 makes its Controls here
        self.calls.append("configure")
        self.config = config

    def set_controls(self, controls: dict) -> None:
        self._check_controls(controls)

    def start(self) -> None:
        assert self.config is not None, "start() before configure()"
        self.calls.append("start")

    def capture_array(self, name: str = "main", wait=None, signal_function=None) -> np.ndarray:
        assert "start" in self.calls
        if self.gone:
            # A camera that vanished delivers no request: picamera2's job waits ``wait`` seconds (forever if
            # None) and raises the future's TimeoutError.
            assert isinstance(wait, int | float) and not isinstance(wait, bool), "would wait forever"
            raise TimeoutError()
        stream = self.config[name]
        width, height = stream["size"]
        order = STORED_ORDER[stream["format"]]
        values = dict(zip("RGB", self.colour, strict=True), A=255)
        frame = np.empty((height, width, len(order)), np.uint8)
        for i, channel in enumerate(order):
            frame[..., i] = values[channel]
        # Mark the columns so a test can see where a crop was taken.
        frame[..., order.index("G")] = np.arange(width, dtype=np.uint8)[None, :]
        return frame

    def cancel_all_and_flush(self) -> None:
        self.calls.append("cancel_all_and_flush")

    def stop(self) -> None:
        self.calls.append("stop")
        if self.fail_stop:
            raise RuntimeError("camera was not started")

    def close(self) -> None:
        self.calls.append("close")


@pytest.fixture
def picamera2(monkeypatch):
    monkeypatch.setattr(Picamera2Source, "_said_skipped", set())
    module = types.ModuleType("picamera2")
    module.Picamera2 = type("Picamera2", (FakePicamera2,), {"instances": []})
    monkeypatch.setitem(sys.modules, "picamera2", module)
    return module.Picamera2


def test_picamera2_asks_the_isp_for_a_small_rgb_stream(picamera2):
    source = Picamera2Source(1, size=SIZE, fps=15)
    cam = picamera2.instances[0]
    assert cam.camera_num == 1
    assert cam.asked["main"] == {"size": (224, 224), "format": "BGR888"}
    assert 2 <= cam.asked["buffer_count"] <= 4
    assert cam.asked["controls"] == {"FrameRate": 15.0}
    assert cam.asked["queue"] is False
    assert cam.calls == ["configure", "start"]
    source.close()


def test_picamera2_sets_only_the_controls_the_camera_advertises_and_says_so_once(picamera2, caplog):
    picamera2.advertised = VIMC_CONTROLS  # no FrameDurationLimits: FrameRate would fail configure()
    with caplog.at_level(logging.INFO, logger="edgeknn.camera.sources"):
        first = Picamera2Source(0, size=SIZE, fps=30)
        assert picamera2.instances[0].asked["controls"] == {}
        assert picamera2.instances[0].calls == ["configure", "start"]
        assert first.read().shape == (224, 224, 3)
        first.close()
        Picamera2Source(0, size=SIZE, fps=30).close()  # the capture thread reopens after a failure
    said = [r.getMessage() for r in caplog.records if "does not advertise" in r.getMessage()]
    assert said == [
        "picamera2 camera 0: the camera does not advertise FrameDurationLimits; not set: FrameRate"
    ]


def test_picamera2_a_camera_that_vanished_is_an_error_not_a_hang(picamera2, caplog):
    source = Picamera2Source(0, size=SIZE, fps=30)
    picamera2.gone = True
    with pytest.raises(CameraError, match=r"^picamera2 camera 0: no frame within 10s$"):
        source.read()
    # in the log before the close, which libcamera may turn into an abort
    assert "picamera2 camera 0: no frame within 10s: closing it" in caplog.messages
    source.close()
    assert picamera2.instances[0].calls == ["configure", "start", "cancel_all_and_flush", "stop", "close"]


def test_the_fake_refuses_an_unadvertised_control_as_picamera2_does(picamera2):
    picamera2.advertised = VIMC_CONTROLS
    cam = picamera2(0)
    config = cam.create_video_configuration(
        main={"size": SIZE, "format": "BGR888"}, controls={"FrameRate": 30.0}
    )
    with pytest.raises(RuntimeError, match="^Control FrameDurationLimits is not advertised by libcamera$"):
        cam.configure(config)
    with pytest.raises(RuntimeError, match="^Control Sharpness is not advertised by libcamera$"):
        cam.set_controls({"Sharpness": 1.0})


def test_picamera2_frames_are_rgb_not_swapped(picamera2):
    source = Picamera2Source(0, size=SIZE, fps=30)
    frame = source.read()
    source.close()
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    assert tuple(frame[0, 0, [0, 2]]) == (255, 0), "pure red must come out as R=255, B=0"


def test_picamera2_rounds_the_width_up_and_crops_the_centre(picamera2):
    source = Picamera2Source(0, size=(200, 150), fps=30)
    cam = picamera2.instances[0]
    width, height = cam.asked["main"]["size"]
    assert width % 32 == 0 and 200 <= width < 232 and height == 150
    frame = source.read()
    source.close()
    assert frame.shape == (150, 200, 3) and frame.flags.c_contiguous
    assert frame[0, 0, 1] == (width - 200) // 2, "the crop must be centred"
    assert tuple(frame[0, 0, [0, 2]]) == (255, 0)


def test_picamera2_close_stops_and_closes_even_when_stop_fails(picamera2):
    picamera2.fail_stop = True
    source = Picamera2Source(0, size=SIZE, fps=30)
    source.close()
    source.close()  # idempotent
    assert picamera2.instances[0].calls == ["configure", "start", "stop", "close"]
    with pytest.raises(CameraError, match="closed"):
        source.read()


def test_picamera2_open_failure_is_a_camera_error(picamera2, monkeypatch):
    def no_camera(self, camera_num=0):
        raise IndexError("list index out of range")

    monkeypatch.setattr(picamera2, "__init__", no_camera)
    with pytest.raises(CameraError, match=r"picamera2 camera 0: cannot open it \(IndexError"):
        Picamera2Source(0, size=SIZE, fps=30)


def test_picamera2_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)
    with pytest.raises(CameraError) as info:
        Picamera2Source()
    message = str(info.value)
    assert "sudo apt install python3-picamera2" in message
    assert "--system-site-packages" in message
    assert "\n" not in message


# --- a fake cv2 ---------------------------------------------------------------------------------------


class FakeVideoCapture:
    frames: list[np.ndarray] = []
    opened = True

    def __init__(self, device):
        self.device = device
        self.props: dict[int, float] = {}
        self.position = 0
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802 (cv2's name)
        return self.opened

    def set(self, prop: int, value: float) -> bool:
        self.props[prop] = value
        if prop == FakeCv2.CAP_PROP_POS_FRAMES:
            self.position = int(value)
        return True

    def read(self):
        if self.position >= len(self.frames):
            return False, None
        self.position += 1
        return True, self.frames[self.position - 1]

    def release(self) -> None:
        self.released = True


class FakeCv2(types.ModuleType):
    CAP_PROP_BUFFERSIZE = 38
    CAP_PROP_POS_FRAMES = 1


@pytest.fixture
def cv2(monkeypatch):
    module = FakeCv2("cv2")
    captures: list[FakeVideoCapture] = []

    class VideoCapture(FakeVideoCapture):
        frames = [np.full((4, 6, 3), (0, 0, 255), np.uint8)]  # BGR: pure red

        def __init__(self, device):
            super().__init__(device)
            captures.append(self)

    module.VideoCapture = VideoCapture
    module.captures = captures
    monkeypatch.setitem(sys.modules, "cv2", module)
    return module


def test_opencv_source_reads_rgb_with_a_one_frame_buffer(cv2):
    source = OpenCVSource("/dev/video0")
    frame = source.read()
    capture = cv2.captures[0]
    assert capture.device == "/dev/video0"
    assert capture.props[cv2.CAP_PROP_BUFFERSIZE] == 1
    assert frame.shape == (4, 6, 3) and frame.flags.c_contiguous
    assert tuple(frame[0, 0]) == RED
    with pytest.raises(CameraError, match="v4l2 camera /dev/video0: no frame"):
        source.read()  # the fake has one frame only: a failed read
    source.close()
    source.close()
    assert capture.released


def test_opencv_source_that_does_not_open_names_the_device(cv2):
    cv2.VideoCapture.opened = False
    with pytest.raises(CameraError, match="v4l2 camera 3: cannot open it"):
        OpenCVSource(3)
    assert cv2.captures[0].released


def test_opencv_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(CameraError, match=r"pip install edgeknn\[cv\]") as info:
        OpenCVSource(0)
    assert str(info.value) == OPENCV_MISSING


def test_replay_of_a_video_loops_or_ends(cv2, tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not decoded by the fake")
    cv2.VideoCapture.frames = [np.full((2, 2, 3), (i, 0, 0), np.uint8) for i in range(3)]  # B = i
    looping = ReplaySource(video, fps=0, loop=True)
    assert [looping.read()[0, 0, 2] for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    looping.close()
    once = ReplaySource(video, fps=0, loop=False)
    assert [once.read()[0, 0, 2] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(EOFError):
        once.read()
    once.close()


# --- image files -------------------------------------------------------------------------------------


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Four 8x6 images of known colours (PNG, so exact), one JPEG in a subfolder, and clutter."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, colour in enumerate(COLOURS[:3]):
        Image.new("RGB", (8, 6), colour).save(folder / f"{i}.png")
    Image.new("RGB", (8, 6), COLOURS[3]).save(folder / "sub" / "3.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    (folder / "._0.png").write_bytes(b"macOS resource fork")
    return folder


def test_find_images_is_recursive_sorted_and_skips_other_files(image_folder):
    found = find_images(image_folder)
    assert [p.relative_to(image_folder).as_posix() for p in found] == ["0.png", "1.png", "2.png", "sub/3.jpg"]
    assert find_images([image_folder / "2.png", image_folder / "sub"]) == [
        image_folder / "2.png",
        image_folder / "sub" / "3.jpg",
    ]


def test_find_images_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(ImageError, match="^" + re.escape(f"{empty}: no image files")):
        find_images(empty)
    with pytest.raises(ImageError, match="missing: no such file or folder"):
        find_images([tmp_path / "missing"])
    with pytest.raises(ImageError, match="readme.md: not an image file"):
        find_images(empty / "readme.md")


def test_load_rgb_errors_name_the_file(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    truncated = tmp_path / "truncated.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cases = [(tmp_path / "missing.png", "no such file"), (fake, "not an image"), (truncated, "cannot read")]
    for path, why in cases:
        with pytest.raises(ImageError) as info:
            load_rgb(path)
        assert str(info.value).startswith(f"{path}: ") and why in str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError):  # ImageError is a ValueError
        load_rgb(tmp_path)


def test_load_rgb_converts_to_rgb_and_applies_exif_orientation(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (5, 3), 7).save(grey)
    image = load_rgb(grey)
    assert image.shape == (3, 5, 3) and image.dtype == np.uint8 and (image == 7).all()
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.new("RGB", (40, 20), RED).save(rotated, exif=exif)
    assert load_rgb(rotated).shape == (40, 20, 3)


def test_load_rgb_max_side_shrinks_big_jpegs(tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(big, quality=90)
    small = load_rgb(big, max_side=448)
    assert small.shape == (299, 448, 3)
    assert np.abs(small[150, 200].astype(int) - (10, 200, 30)).max() <= 8
    assert load_rgb(big).shape == (2000, 3000, 3)


# --- replay ------------------------------------------------------------------------------------------


def test_replay_plays_a_folder_in_order_then_ends(image_folder):
    source = ReplaySource(image_folder, fps=0, loop=False)
    colours = [tuple(source.read()[0, 0]) for _ in range(4)]
    assert colours[:3] == COLOURS[:3]
    assert np.abs(np.subtract(colours[3], COLOURS[3])).max() <= 8  # the JPEG
    with pytest.raises(EOFError):
        source.read()
    with pytest.raises(EOFError):
        source.read()
    source.close()


def test_replay_loops(image_folder):
    source = ReplaySource(image_folder, fps=0, loop=True)
    colours = [tuple(source.read()[0, 0]) for _ in range(6)]
    source.close()
    assert colours[4:] == COLOURS[:2]


def test_replay_paces_frames_at_fps(image_folder):
    source = ReplaySource(image_folder, fps=50, loop=True)
    start = time.monotonic()
    for _ in range(11):
        source.read()
    elapsed = time.monotonic() - start
    source.close()
    assert 0.19 <= elapsed < 0.6, elapsed  # 10 periods of 20 ms after the first frame


def test_replay_close_interrupts_a_wait(image_folder):
    source = ReplaySource(image_folder, fps=0.5, loop=True)
    source.read()
    threading.Timer(0.05, source.close).start()
    start = time.monotonic()
    with pytest.raises(CameraError, match="closed"):
        source.read()  # would wait 2 s for its turn
    assert time.monotonic() - start < 1


def test_pacer_spaces_frames_and_starts_again_after_falling_behind():
    pacer = Pacer(fps=100)
    assert pacer.wait()  # the first frame is due at once
    time.sleep(0.05)  # the reader falls five periods behind
    start = time.monotonic()
    assert pacer.wait() and pacer.wait()  # no burst: the schedule starts again, the next is a period on
    assert time.monotonic() - start >= 0.009


def test_pacer_without_a_rate_never_waits_and_a_closed_one_refuses():
    free = Pacer(fps=0)
    assert all(free.wait() for _ in range(1000))
    paced = Pacer(fps=0.5)
    assert paced.wait()
    paced.close()
    start = time.monotonic()
    assert not paced.wait() and paced.closed  # would wait 2 s for its turn
    assert time.monotonic() - start < 1
    free.close()
    assert not free.wait()


def test_replay_skips_unreadable_images(image_folder, caplog):
    (image_folder / "1.png").write_bytes(b"broken")
    source = ReplaySource(image_folder, fps=0, loop=False)
    colours = [tuple(source.read()[0, 0]) for _ in range(3)]
    assert colours[:2] == [COLOURS[0], COLOURS[2]]
    assert "1.png" in caplog.text and "skipping" in caplog.text
    with pytest.raises(EOFError):
        source.read()


def test_replay_errors(tmp_path, image_folder):
    with pytest.raises(CameraError, match="nowhere: no such file or folder"):
        ReplaySource(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CameraError, match="no image files"):
        ReplaySource(tmp_path / "empty")
    with pytest.raises(ValueError, match="fps"):
        ReplaySource(image_folder, fps=-1)


@needs_data
def test_replay_of_real_photos_decodes_the_big_ones_small():
    folder = DIGITS / "7"  # holds three 3024x3024 photos among 100x100 ones
    count = len(find_images(folder))
    source = ReplaySource(folder, fps=0, loop=False, size=SIZE)
    start = time.thread_time()  # this thread's CPU time: what decoding costs, however busy the machine is
    shapes = []
    with pytest.raises(EOFError):
        while True:
            shapes.append(source.read().shape)
    elapsed = time.thread_time() - start
    assert len(shapes) == count > 200
    assert max(max(s[:2]) for s in shapes) == 448, "the 3024x3024 photos shrink to 2x the model size"
    assert (100, 100, 3) in shapes
    assert elapsed < 5, elapsed


# --- URIs --------------------------------------------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch):
    """Replace the source classes by recorders, so an opener shows what it would open."""
    for name in ("Picamera2Source", "OpenCVSource", "ReplaySource"):
        monkeypatch.setattr(camerauri, name, lambda *args, _name=name: (_name, args))


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("picamera2", ("Picamera2Source", (0, SIZE, 12.0))),
        ("picamera2:1", ("Picamera2Source", (1, SIZE, 12.0))),
        ("v4l2:/dev/video0", ("OpenCVSource", ("/dev/video0",))),
        ("v4l2:0", ("OpenCVSource", (0,))),
        ("replay:/data/photos", ("ReplaySource", (Path("/data/photos"), 12.0, True, SIZE))),
        ("replay:/data/a b?fps=2.5&loop=0", ("ReplaySource", (Path("/data/a b"), 2.5, False, SIZE))),
        ("replay:/v.mp4?fps=0&loop=true", ("ReplaySource", (Path("/v.mp4"), 0.0, True, SIZE))),
        ("replay:rel/dir?loop=1", ("ReplaySource", (Path.cwd() / "rel/dir", 12.0, True, SIZE))),
    ],
)
def test_uri(recorded, uri, expected):
    assert source_opener(uri, SIZE, 12.0)() == expected
    assert open_source(uri, SIZE, 12.0) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "webcam",
        "Auto",
        "picamera2:",
        "picamera2:x",
        "picamera2:-1",
        "v4l2:",
        "replay:",
        "replay:?fps=1",
        "replay:x?fps=abc",
        "replay:x?fps=-1",
        "replay:x?fps=nan",
        "replay:x?loop=2",
        "replay:x?speed=2",
        "replay:x?fps",
        "replay:x?fps=1&fps=2",
    ],
)
def test_bad_uri_is_a_value_error_naming_it(recorded, uri):
    with pytest.raises(ValueError) as info:
        source_opener(uri, SIZE, 30.0)
    assert repr(uri) in str(info.value) and "\n" not in str(info.value)


def test_auto_prefers_picamera2(picamera2, cv2):
    source = open_source("auto", SIZE, 30.0)
    assert isinstance(source, Picamera2Source)
    assert cv2.captures == []
    source.close()


def test_auto_falls_back_to_v4l2_and_says_so(monkeypatch, cv2, caplog):
    monkeypatch.setitem(sys.modules, "picamera2", None)
    with caplog.at_level(logging.INFO, logger="edgeknn.camera.sources"):
        source = open_source("auto", SIZE, 30.0)
    assert isinstance(source, OpenCVSource) and cv2.captures[0].device == 0
    assert "auto found v4l2:0" in caplog.text
    source.close()


def test_auto_without_any_camera_lists_every_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(CameraError) as info:
        open_source("auto", SIZE, 30.0)
    message = str(info.value)
    assert message.startswith("no camera found (auto): ")
    assert "python3-picamera2" in message and "opencv-python-headless" in message


# --- Capture -----------------------------------------------------------------------------------------


class CountingSource:
    """A fast camera: frame n has pixel value n % 256 (and knows n)."""

    def __init__(self, period: float = 0.001):
        self.period = period
        self.count = 0
        self.closed = False

    def read(self) -> np.ndarray:
        time.sleep(self.period)
        self.count += 1
        return np.full((4, 4, 3), self.count % 256, np.uint8)

    def close(self) -> None:
        self.closed = True


def test_capture_keeps_only_the_newest_frame():
    source = CountingSource()
    with Capture(lambda: source).start() as capture:
        first = capture.latest(after=0, timeout=2)
        assert first is not None and first.number >= 1
        # the reader is slow: frames pile up at the camera, not in a queue
        assert wait_for(lambda: capture.frames_captured > first.number + 5)
        before = capture.frames_captured
        frame = capture.latest(after=first.number, timeout=2)
        after = capture.frames_captured
        assert frame is not None
        assert before <= frame.number <= after, "latest() returns the newest frame"
        assert frame.number > first.number + 5, "stale frames are skipped"
        assert frame.image[0, 0, 0] == frame.number % 256
        assert not frame.image.flags.writeable
        assert capture.ok and capture.error == ""
        assert abs(frame.ts - time.time()) < 1
        assert capture.last_frame_age() < 0.5
        newer = capture.latest(after=frame.number, timeout=2)
        assert newer is not None and newer.number > frame.number
    assert source.closed


def test_capture_runs_prepare_on_the_camera_thread():
    threads = []

    def prepare(image: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return image[:2, :3]

    with Capture(CountingSource, prepare=prepare).start() as capture:
        frame = capture.latest(timeout=2)
    assert frame is not None and frame.image.shape == (2, 3, 3)
    assert set(threads) == {Capture.THREAD_NAME}


class ScriptedSource:
    """Plays a shared script: each step is a frame to return, or an exception to raise."""

    def __init__(self, script: list, opened: list):
        self.script = script
        self.closed = False
        opened.append(self)

    def read(self):
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        return step

    def close(self) -> None:
        self.closed = True


def test_capture_recovers_from_failures_with_backoff(monkeypatch, caplog):
    monkeypatch.setattr(capture_module, "INITIAL_BACKOFF", 0.01)
    good = np.zeros((4, 4, 3), np.uint8)
    script = [
        CameraError("unplugged"),
        None,
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 3), np.float32),
        good,
    ]
    opened: list[ScriptedSource] = []
    seen: list[
        tuple[float, bool, str]
    ] = []  # at each (re)open: when, and the state the previous failure left

    def opener():
        seen.append((time.monotonic(), capture.ok, capture.error))
        if len(seen) == 1:
            raise CameraError("no camera 0")
        return ScriptedSource(script, opened)

    capture = Capture(opener, max_backoff=0.04)
    with caplog.at_level(logging.INFO, logger="edgeknn.camera.capture"), capture.start():
        frame = capture.latest(timeout=5)
        assert frame is not None
        assert capture.ok and capture.error == ""
    errors = [error for _, _, error in seen]
    assert errors == [
        "",
        "no camera 0",
        "unplugged",
        "the source returned no frame (None)",
        "the source returned a frame of shape (4, 4), expected (H, W, 3)",
        "the source returned float32 pixels, expected uint8",
    ]
    assert not any(ok for _, ok, _ in seen)
    gaps = np.diff([t for t, _, _ in seen])
    assert all(gap >= wanted * 0.9 for gap, wanted in zip(gaps, [0.01, 0.02, 0.04, 0.04, 0.04], strict=True))
    assert all(source.closed for source in opened), "every source is closed, the failed ones and the last"
    assert caplog.text.count("retrying in") == 5
    assert "camera: unplugged; retrying in 0.02s" in caplog.text
    assert caplog.text.count("camera: frames again") == 1


def test_capture_backoff_starts_again_after_frames_came(monkeypatch, caplog):
    """A source that delivers, then fails, is retried soon each time: the backoff is per outage."""
    monkeypatch.setattr(capture_module, "INITIAL_BACKOFF", 0.01)
    caplog.set_level(logging.DEBUG, logger="edgeknn.camera.capture")  # every retry, with the wait it chose
    opens: list[float] = []

    def opener():
        opens.append(time.monotonic())
        return ScriptedSource([np.zeros((2, 2, 3), np.uint8), CameraError("flaky")], [])

    with Capture(opener, max_backoff=2.0).start() as capture:
        assert wait_for(lambda: len(opens) >= 8)
    assert len(opens) >= 8 and capture.frames_captured >= 7
    waits = re.findall(r"retrying in ([0-9.]+)s", caplog.text)[:7]
    assert waits == ["0.01"] * 7  # without the reset: 0.01, 0.02, ... 0.64 s


def test_capture_logs_a_repeated_failure_once(monkeypatch, caplog):
    monkeypatch.setattr(capture_module, "INITIAL_BACKOFF", 0.02)
    attempts = []

    def opener():
        attempts.append(time.monotonic())
        raise CameraError("no camera")

    with caplog.at_level(logging.WARNING, logger="edgeknn.camera.capture"):
        capture = Capture(opener, max_backoff=0.05).start()
        assert wait_for(lambda: len(attempts) >= 3)
        capture.close()
    assert len(attempts) >= 3
    assert caplog.text.count("camera: no camera; retrying in") == 1
    assert not capture.ok and capture.error == "no camera"


def test_capture_reports_a_prepare_that_returns_no_image():
    with Capture(CountingSource, prepare=lambda image: image.astype(np.float64)).start() as capture:
        assert wait_for(lambda: capture.error)
        assert capture.error == "prepare returned float64 pixels, expected uint8"
        assert capture.frames_captured == 0 and capture.latest(timeout=0.05) is None


class StalledSource:
    """A camera whose read blocks until it is closed."""

    def __init__(self):
        self.unblock = threading.Event()
        self.reads = 0

    def read(self):
        self.reads += 1
        if self.reads > 1:
            self.unblock.wait()
            raise CameraError("closed")
        return np.zeros((2, 2, 3), np.uint8)

    def close(self) -> None:
        self.unblock.set()


def test_a_stalled_source_shows_in_last_frame_age_and_close_unblocks_it():
    source = StalledSource()
    capture = Capture(lambda: source).start()
    first = capture.latest(timeout=2)
    assert first is not None and first.number == 1
    start = time.monotonic()
    assert capture.latest(after=1, timeout=0.2) is None
    assert time.monotonic() - start >= 0.19
    assert capture.last_frame_age() >= 0.19
    assert capture.ok, "a stall raises nothing; last_frame_age() is how to see it"
    start = time.monotonic()
    capture.close(timeout=0.4)
    assert time.monotonic() - start < 1
    assert source.unblock.is_set() and not capture._thread.is_alive()


def test_capture_finishes_after_a_replay_that_does_not_loop(image_folder):
    capture = Capture(lambda: ReplaySource(image_folder, fps=0, loop=False)).start()
    assert wait_for(lambda: capture.finished)
    assert capture.frames_captured == 4
    start = time.monotonic()
    assert capture.latest(after=4, timeout=5) is None, "no waiting for frames that will never come"
    assert time.monotonic() - start < 1
    last = capture.latest(after=3, timeout=0)
    assert last is not None and last.number == 4
    capture._thread.join(1)
    assert not capture._thread.is_alive()
    capture.close()


def test_close_is_idempotent_and_joins_the_thread():
    source = CountingSource()
    capture = Capture(lambda: source).start()
    assert capture.latest(timeout=2) is not None
    assert camera_threads()
    capture.close()
    assert not capture._thread.is_alive() and not camera_threads()
    assert source.closed
    capture.close()
    start = time.monotonic()
    assert capture.latest(after=10**9, timeout=5) is None
    assert time.monotonic() - start < 0.5, "latest() on a closed capture does not wait"
    Capture(CountingSource).close()  # never started: nothing to do
    with pytest.raises(RuntimeError):
        capture.start()


def test_check_frame():
    image = np.zeros((2, 2, 3), np.uint8)
    assert check_frame(image) is image
    with pytest.raises(CameraError, match="returned a list"):
        check_frame([[0]])
    with pytest.raises(CameraError, match=r"shape \(0, 2, 3\)"):
        check_frame(np.zeros((0, 2, 3), np.uint8))

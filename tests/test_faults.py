"""Mistakes a person makes and faults a device meets (issue 12, cases 13-16): a camera source that can
never work exits 78 with one line, `store --config` counts before the action too, snapshots never
overwrite each other and stay bounded, and a published prediction never contradicts itself.

The `edgeknn run` tests start a real process (run the suite with /tmp/floor/bin/python or any python
where edgeknn is importable); the child blocks cv2 and picamera2, so "not installed" holds everywhere.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS, TINY, needs_data
from rig import Running, Scene, make_config, photo_folders, stable_on, wait_for

from edgeknn import config
from edgeknn.camera import capture
from edgeknn.camera import sources as camera
from edgeknn.camera import uri as camerauri
from edgeknn.cli.main import EX_CONFIG, main
from edgeknn.commands import AddExample, Result, Snapshot
from edgeknn.device import snapshots
from edgeknn.device.build import build
from edgeknn.mqtt.link import MqttLink
from edgeknn.outputs import Reading
from edgeknn.store.knn import KnnStore
from edgeknn.store.names import UNKNOWN

REPO = Path(__file__).resolve().parent.parent

NO_CAMERA_LIBRARIES = """
import sys
sys.modules["cv2"] = None
sys.modules["picamera2"] = None
from edgeknn.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def run_edgeknn(tmp_path: Path, source: str, timeout: float = 30) -> tuple[int | None, str]:
    """`edgeknn run --source SOURCE` without cv2 and picamera2: (exit code, None if still running; stderr)."""
    argv = ["run", "--source", source, "--panel", "none", "--mqtt", "none", "--web", "none"]
    argv += ["--model", str(TINY), "--store", str(tmp_path / "store.npz")]
    env = {**os.environ, "HOME": str(tmp_path), "STATE_DIRECTORY": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_CAMERA_LIBRARIES, *argv],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,  # edgeknn importable without an install
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return None, err
    return proc.returncode, err


# --- case 13: a camera source a person must fix -------------------------------------------------------


def _not_an_image(tmp_path: Path) -> str:
    (tmp_path / "notes.jpg").write_text("not a picture")
    return f"replay:{tmp_path / 'notes.jpg'}"


def _a_video_without_opencv(tmp_path: Path) -> str:
    (tmp_path / "notes.txt").write_text("not a picture either")
    return f"replay:{tmp_path / 'notes.txt'}"


def _empty_folder(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    return f"replay:{tmp_path / 'empty'}"


def _unreadable_images(tmp_path: Path) -> str:
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"\xff\xd8 truncated")
    return f"replay:{folder}"


@needs_data
@pytest.mark.parametrize(
    "make_source, says",
    [
        (lambda tmp: f"replay:{tmp / 'nowhere'}", "no such file or folder"),
        (_empty_folder, "no image files"),
        (_not_an_image, "not an image"),
        (_a_video_without_opencv, "OpenCV is not installed"),
        (_unreadable_images, "no readable images"),  # found only by the first read, after READY
        (lambda tmp: "v4l2:0", "OpenCV is not installed"),
        (lambda tmp: "picamera2", "picamera2 is not installed"),
        (lambda tmp: "auto", "no camera library (auto)"),
    ],
    ids=["missing", "empty", "non-image", "video-no-cv2", "unreadable", "v4l2-no-cv2", "picamera2", "auto"],
)
def test_a_source_a_person_must_fix_exits_78_with_one_line(tmp_path, make_source, says):
    started = time.monotonic()
    code, err = run_edgeknn(tmp_path, make_source(tmp_path))
    assert code == EX_CONFIG, (
        f"exit {code} after {time.monotonic() - started:.0f} s (None: still retrying)\n{err}"
    )
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "camera.source: " in errors[0] and says in errors[0], err
    assert "retrying" not in err and "Traceback" not in err


def test_a_source_error_is_not_retried_but_a_camera_fault_keeps_its_backoff(monkeypatch):
    monkeypatch.setattr(capture, "INITIAL_BACKOFF", 0.01)
    tries = {"unplugged": 0, "missing": 0}

    def unplugged():
        tries["unplugged"] += 1
        raise camera.CameraError("v4l2 camera 0: cannot open it")

    def missing():
        tries["missing"] += 1
        raise camera.SourceError("replay: /nowhere: no such file or folder")

    transient, permanent = capture.Capture(unplugged, max_backoff=0.02), capture.Capture(missing)
    with transient.start(), permanent.start():
        assert wait_for(lambda: permanent.fatal and tries["unplugged"] >= 4, 10)
        assert permanent.latest(timeout=5) is None, "a waiting reader is woken at once"
        time.sleep(0.1)
        assert tries["missing"] == 1 and permanent.error == permanent.fatal
        assert transient.fatal == "" and transient.error == "v4l2 camera 0: cannot open it"


def test_check_source_finds_at_build_time_what_it_can(tmp_path, monkeypatch):
    camerauri.check_source(f"replay:{DIGITS / '1'}")  # a good folder: nothing to say
    photo = next(iter(sorted((DIGITS / "1").iterdir())))
    camerauri.check_source(f"replay:{photo}")
    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setitem(sys.modules, "picamera2", None)
    for uri in (f"replay:{tmp_path / 'nowhere'}", "v4l2:/dev/video0", "picamera2:1", "auto"):
        with pytest.raises(camera.SourceError) as info:
            camerauri.check_source(uri)
        assert "\n" not in str(info.value)


# --- case 14: `store --config` before the action ------------------------------------------------------


def test_store_config_counts_before_the_action_as_after_it(tmp_path, capsys):
    store = tmp_path / "s.npz"
    KnnStore(4, "model").save(store)
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = "abc"\n')
    for argv in (
        ["store", "--config", str(bad), "info", str(store)],
        ["store", "info", str(store), "--config", str(bad)],
    ):
        assert main(argv) == EX_CONFIG, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "mqtt.port" in err, err
    good = tmp_path / "good.toml"
    good.write_text("[store]\nk = 5\n")
    assert main(["store", "--config", str(good), "info", str(store)]) == 0
    assert "rows: 0 of 4 values" in capsys.readouterr().out


# --- case 15: snapshots -------------------------------------------------------------------------------


@pytest.fixture
def running(tmp_path):
    cfg = make_config(tmp_path, **{"panel.kind": "none"})
    scene = Scene(photo_folders(tmp_path))
    run = Running(build(cfg, opener=scene.opener))
    assert run.classified(), "no frames classified"
    yield run
    run.stop()


def ask(run: Running, command_type, times: int = 1, timeout: float = 60, **fields) -> list[Result]:
    """Submit ``times`` commands; wait for every result (in the order they came)."""
    results: list[Result] = []
    for _ in range(times):
        run.daemon.submit(command_type(source="test", reply=results.append, **fields))
    assert wait_for(lambda: len(results) == times, timeout), f"{len(results)} of {times} results"
    return results


def test_snapshots_never_overwrite_each_other_and_the_folder_keeps_the_newest(running, tmp_path):
    folder = tmp_path / "snapshots"
    folder.mkdir()
    (folder / "keep-me.txt").write_text("a person's note")
    count = snapshots.KEEP + 30
    results = ask(running, Snapshot, count)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    files = [Path(r.detail["file"]) for r in results]
    assert len(set(files)) == count, "every snapshot got its own name"
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([f.name for f in files[-snapshots.KEEP :]] + ["keep-me.txt"])


def test_a_snapshot_on_a_full_disk_answers_one_line_and_logs_no_traceback(
    running, tmp_path, monkeypatch, caplog
):
    from PIL import Image

    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\xff\xd8 half a jpeg")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    caplog.set_level(logging.INFO)
    [result] = ask(running, Snapshot)
    assert not result.ok and "\n" not in result.error
    assert result.error.startswith("snapshot: cannot write to ") and "No space left on device" in result.error
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text
    assert not list((tmp_path / "snapshots").glob("*.jpg")), "no half-written file is left"
    monkeypatch.undo()
    [result] = ask(running, Snapshot)
    assert result.ok, "the next one, with space again, works"


# --- case 16: a prediction that never contradicts itself ----------------------------------------------


def test_a_reading_is_consistent_while_the_label_settles(running):
    run = running
    [result] = ask(run, AddExample, class_name="1", count=3)
    assert result.ok, result
    assert stable_on(run, "1"), "the label settled on the taught class"
    readings = list(run.recorder.readings)
    for r in readings:
        assert r.confidence == r.scores.get(r.label, 0.0), r
        frame_says = max(r.scores, key=r.scores.__getitem__) if r.scores else UNKNOWN  # threshold 0
        assert (r.candidate or r.label) == frame_says, r
        assert r.candidate != r.label, r
    settling = [r for r in readings if r.label == UNKNOWN and r.scores == {"1": 1.0}]
    assert settling and all(r.candidate == "1" for r in settling), "the issue's case, now explained"


def test_the_published_prediction_names_the_candidate_only_while_settling():
    cfg = config.replace(config.load(None), **{"mqtt.enabled": True})
    link = MqttLink(cfg.mqtt, base_topic="edgeknn/t", device_id="t", classes=["1"], submit=print, version="0")
    sent: list[dict] = []
    link._publish_json = lambda topic, body, **_: sent.append(body)  # type: ignore[method-assign]
    link.show(Reading(UNKNOWN, 0.0, {"1": 1.0}, 0.9, 1, time.time(), 1.0, True, candidate="1"))
    link.show(Reading("1", 1.0, {"1": 1.0}, 0.9, 2, time.time(), 1.0, True))
    assert sent[0]["label"] == UNKNOWN and sent[0]["confidence"] == 0.0 and sent[0]["candidate"] == "1"
    assert sent[1]["label"] == "1" and sent[1]["confidence"] == 1.0 and "candidate" not in sent[1]
    link.close()


def test_a_snapshot_shows_the_camera_frame_shrunk_to_at_most_640_px(tmp_path):
    """A camera frame bigger than the model's input (the page's "Full frame") is what a snapshot shows,
    its longer side cut to MAX_SIDE: Home Assistant's image is not the model's 192-224 px square."""
    import io

    from PIL import Image

    from edgeknn.camera.capture import Frame
    from edgeknn.device.daemon import _picture

    full = np.zeros((1080, 1920, 3), np.uint8)
    frame = Frame(np.zeros((224, 224, 3), np.uint8), time.time(), 1, full)
    assert _picture(frame) is full
    assert _picture(Frame(frame.image, frame.ts, 2)).shape == (224, 224, 3)  # no bigger one: the model's
    small = Frame(frame.image, frame.ts, 3, np.zeros((100, 100, 3), np.uint8))  # a 100 px photo, upscaled
    assert _picture(small) is small.image
    results: list[Result] = []
    shooter = snapshots.Snapshotter(tmp_path / "snapshots")
    shooter.take(_picture(frame), results.append)
    shooter.close()
    assert results[0].ok, results
    picture = Image.open(io.BytesIO(Path(results[0].detail["file"]).read_bytes()))
    assert picture.size == (snapshots.MAX_SIDE, 360)

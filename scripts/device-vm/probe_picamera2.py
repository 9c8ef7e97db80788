"""The real picamera2 on the VM's vimc camera, without edgeknn: what it advertises and how it answers.

Run by vm-test.sh with the check venv's Python; prints one JSON object per line ({"fact": ..., ...}). These
are the facts the fake picamera2 in tests/test_camera.py follows (camera_controls, where an unadvertised
control fails).
"""

from __future__ import annotations

import json
import sys
import traceback

from picamera2 import Picamera2


def fact(name: str, **values: object) -> None:
    print(json.dumps({"fact": name, **values}, default=repr), flush=True)


def error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def main() -> int:
    fact("cameras", info=Picamera2.global_camera_info())
    cam = Picamera2(0)
    try:
        fact("camera_controls", names=sorted(cam.camera_controls))
        fact("is_rpi_camera", value=cam._is_rpi_camera())
        # picamera2's FrameRate stands for libcamera's FrameDurationLimits: which call refuses it on a camera
        # that does not advertise that control?
        config = cam.create_video_configuration(
            main={"size": (224, 224), "format": "BGR888"},
            buffer_count=3,
            controls={"FrameRate": 30.0},
            queue=False,
        )
        fact("video_configuration", main=config["main"], controls=config["controls"], raw=config["raw"])
        for step in ("configure", "start"):
            try:
                cam.configure(config) if step == "configure" else cam.start()
                fact("FrameRate", step=step, result="accepted")
            except Exception as e:
                fact("FrameRate", step=step, result=error(e))
                break
        try:
            cam.stop()
        except Exception as e:
            fact("stop", result=error(e))
        config = cam.create_video_configuration(
            main={"size": (224, 224), "format": "BGR888"}, buffer_count=3, queue=False
        )
        cam.configure(config)
        fact("configured", main=cam.camera_config["main"], controls=cam.camera_config["controls"])
        cam.start()
        frame = cam.capture_array("main")
        fact("frame", shape=list(frame.shape), dtype=str(frame.dtype))
        try:
            cam.set_controls({"FrameRate": 15.0})
            fact("set_controls FrameRate", result="accepted")
        except Exception as e:
            fact("set_controls FrameRate", result=error(e))
        cam.stop()
    finally:
        cam.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:
        fact("failed", error=error(e), trace=traceback.format_exc())
        sys.exit(1)

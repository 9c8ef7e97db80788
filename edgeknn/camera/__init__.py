"""Frames: the sources (picamera2, OpenCV/V4L2, replay), the ``camera.source`` URI parser, and the
capture thread that keeps only the newest frame and reopens a failing source.
"""

"""Test videos as files: MP4 bytes for ``video_url`` data URLs and calibration rows, and an
independent decoder for the reference (OpenCV, as vLLM's default video loader)."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import numpy as np

MP4_FPS = 4.0


def _cv2():
    import cv2  # opencv-python-headless, a vLLM dependency

    return cv2


def mp4_bytes(frames: np.ndarray, fps: float = MP4_FPS) -> bytes:
    """``[frames, height, width, 3]`` uint8 RGB as an MPEG-4 Part 2 (``mp4v``) file.

    The codec is lossy: what a server decodes is :func:`decode_video` of these bytes, not
    ``frames``; compare against that."""
    cv2 = _cv2()
    height, width = frames.shape[1:3]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "video.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write mp4v video on this machine")
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        return Path(path).read_bytes()


def mp4_data_url(frames: np.ndarray, fps: float = MP4_FPS) -> str:
    """A ``data:video/mp4;base64,...`` URL, what a chat ``video_url`` part takes."""
    return "data:video/mp4;base64," + base64.b64encode(mp4_bytes(frames, fps)).decode()


def decode_video(data: bytes) -> np.ndarray:
    """Every frame of a video file's bytes, ``[frames, height, width, 3]`` uint8 RGB."""
    cv2 = _cv2()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video"
        path.write_bytes(data)
        capture = cv2.VideoCapture(str(path))
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        capture.release()
    if not frames:
        raise ValueError("no frame could be decoded")
    return np.stack(frames)

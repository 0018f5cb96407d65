"""Face landmarks: a one-method detector seam and its MediaPipe FaceLandmarker implementation.

This is the only module that imports mediapipe (lazily). Landmarks are pixel coordinates (x right, y down) of the
478-point MediaPipe face mesh; the first 468 share the legacy FaceMesh topology the official code used.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np

NUM_LANDMARKS = 478
MAX_FACES = 4  # faces looked for in every frame; the target is chosen among them


_STDERR_LOCK = threading.Lock()  # fd 2 is the process's: two threads silencing it at once could leave it silenced


@contextlib.contextmanager
def _quiet_stderr():
    """Silence native libraries writing straight to file descriptor 2."""
    with _STDERR_LOCK:
        saved = os.dup(2)
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class MediaPipeDetector:
    """MediaPipe Tasks FaceLandmarker in VIDEO running mode (frames must come with increasing timestamps)."""

    def __init__(self, model_path: str | os.PathLike, max_faces: int = MAX_FACES) -> None:
        """model_path: a verified face_landmarker.task (see `download.ensure`)."""
        model_path = Path(model_path)
        os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ logging would flood the terminal
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions
        from mediapipe.tasks.python.vision import FaceLandmarker, FaceLandmarkerOptions, RunningMode

        self._mp = mp
        options = FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_buffer=model_path.read_bytes()),
            running_mode=RunningMode.VIDEO,
            num_faces=max_faces,
            min_face_detection_confidence=0.5,
            min_face_presence_confidence=0.5,
            min_tracking_confidence=0.5,
        )
        with _quiet_stderr():  # TFLite announces its CPU delegate on fd 2
            self._landmarker = FaceLandmarker.create_from_options(options)

    def detect(self, frame: np.ndarray, timestamp_ms: int) -> list[np.ndarray]:
        height, width = frame.shape[:2]
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
        result = self._landmarker.detect_for_video(image, timestamp_ms)
        faces = []
        for landmarks in result.face_landmarks:
            points = np.array([(p.x * width, p.y * height) for p in landmarks], dtype=np.float32)
            faces.append(points)
        return faces

    def close(self) -> None:
        self._landmarker.close()

    def __enter__(self) -> MediaPipeDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

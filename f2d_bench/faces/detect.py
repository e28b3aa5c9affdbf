"""Face detection with facenet-pytorch's MTCNN (its weights ship inside the wheel, so it works offline).

MTCNN gives, per face, a box, five landmarks and a probability. The five landmarks are ordered
image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner: the order
of the ArcFace template and of the points FFHQ alignment needs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from f2d_bench.errors import ModelUnavailableError
from f2d_bench.faces.imageio import to_rgb8

DETECTOR_NAME = "facenet-pytorch MTCNN"


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected face, in the pixel coordinates of the image it was found in.

    box: (x1, y1, x2, y2) in pixels, x to the right, y down (may extend past the image border).
    landmarks: 5x2 float64 array of (x, y) pixels, ordered image-left eye, image-right eye, nose,
        image-left mouth corner, image-right mouth corner. Read-only.
    prob: MTCNN's face probability, 0..1.

    Equality is identity (a numpy field makes value equality ambiguous).
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    prob: float

    def __post_init__(self) -> None:
        box = tuple(float(v) for v in self.box)
        if len(box) != 4:
            raise ValueError(f"box must have 4 values (x1, y1, x2, y2), got {len(box)}")
        landmarks = np.array(self.landmarks, dtype=np.float64)
        if landmarks.shape != (5, 2):
            raise ValueError(f"landmarks must be 5x2, got shape {landmarks.shape}")
        landmarks.setflags(write=False)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "landmarks", landmarks)
        object.__setattr__(self, "prob", float(self.prob))

    @property
    def area(self) -> float:
        """Box area in square pixels."""
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


def _as_float_array(value, shape_tail: tuple[int, ...]) -> np.ndarray:
    """Convert MTCNN's output (under numpy 2 often an object array of arrays) to a float64 array."""
    if value is None:
        return np.zeros((0,) + shape_tail)
    items = [np.asarray(v, dtype=np.float64) for v in list(value) if v is not None]
    if not items:
        return np.zeros((0,) + shape_tail)
    return np.stack(items).reshape((-1,) + shape_tail)


class FaceDetector:
    """MTCNN with ``keep_all=True``; the network is built on the first :meth:`detect` call, once.

    device: torch device for MTCNN ("cpu" by default; it is fast enough for a few hundred photos).
    min_face_size: smallest face searched for, in pixels (MTCNN's default, 20).
    """

    def __init__(self, device: str = "cpu", min_face_size: int = 20) -> None:
        self.device = device
        self.min_face_size = int(min_face_size)
        self._mtcnn = None
        self._lock = threading.Lock()

    @property
    def identity(self) -> tuple:
        """The settings that decide the detections (two detectors with equal identities agree)."""
        return ("mtcnn", self.device, self.min_face_size)

    def load(self) -> None:
        """Build MTCNN now (it is built on first use otherwise)."""
        self._model()

    def _model(self):
        with self._lock:
            if self._mtcnn is None:
                try:
                    from facenet_pytorch import MTCNN
                except ImportError as exc:
                    raise ModelUnavailableError(
                        "facenet-pytorch is not installed; install it with "
                        "`pip install --no-deps facenet-pytorch==2.6.0`"
                    ) from exc
                self._mtcnn = MTCNN(keep_all=True, device=self.device, min_face_size=self.min_face_size)
            return self._mtcnn

    def detect(self, image: Image.Image) -> list[Detection]:
        """All faces MTCNN finds in ``image`` (any PIL mode), sorted by probability, highest first."""
        rgb = to_rgb8(image)
        if min(rgb.size) < self.min_face_size:
            # No face of the smallest searched size fits, and MTCNN's image pyramid would be empty
            # (it raises on such images instead of finding nothing).
            return []
        boxes, probs, landmarks = self._model().detect(rgb, landmarks=True)
        boxes = _as_float_array(boxes, (4,))
        landmarks = _as_float_array(landmarks, (5, 2))
        probs = _as_float_array(probs, ()).reshape(-1)
        if not (len(boxes) == len(landmarks) == len(probs)):
            raise RuntimeError(
                f"MTCNN returned inconsistent outputs: {len(boxes)} boxes, {len(landmarks)} landmark "
                f"sets, {len(probs)} probabilities"
            )
        detections = [Detection(tuple(b), lm, p) for b, lm, p in zip(boxes, landmarks, probs)]
        # sorted() is stable: equal probabilities keep MTCNN's order.
        return sorted(detections, key=lambda d: -d.prob)

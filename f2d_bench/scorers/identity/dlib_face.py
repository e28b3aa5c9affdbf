"""dlib's face recognition ResNet (128-d descriptor) with its 5-point shape predictor.

This is the one identity model whose real weights are on PyPI (``face-recognition-models`` ships
``dlib_face_recognition_resnet_model_v1.dat`` and ``shape_predictor_5_face_landmarks.dat``), so it
measures real identity offline. Given an image and a face box (MTCNN's here), the shape predictor finds
dlib's five points inside the box (eye corners and the bottom of the nose: not MTCNN's five), and
``compute_face_descriptor`` aligns a 150x150 chip from them and returns the descriptor.

Distances: dlib's own rule is "same person" when the Euclidean distance of two raw descriptors is below
:data:`SAME_PERSON_DISTANCE` (0.6; 99.38% on LFW per dlib). :func:`embed_dlib` returns the descriptor
L2-normalised, for cosine similarity like the other identity models; :func:`descriptor_dlib` returns
the raw one, for :func:`euclidean_distance` and dlib's threshold.

The shape predictor was trained on dlib's own detector boxes; MTCNN boxes are taller (higher up the
forehead, lower past the chin). On the bundled test photos the descriptor moves by 0.05-0.13 (Euclidean)
between the MTCNN box and dlib's HOG box of the same face, well inside the 0.6 threshold.
dlib objects are not documented as thread-safe: use one :class:`DlibFaceModel` per thread.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from f2d_bench.errors import ModelUnavailableError
from f2d_bench.scorers.identity.crops import box_of, l2_normalise, rgb_array
from f2d_bench.weights import require_file

RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
EMBEDDING_DIM = 128
#: dlib's same-person threshold on the Euclidean distance between raw descriptors.
SAME_PERSON_DISTANCE = 0.6

PUBLISHED = (
    "dlib publishes it as http://dlib.net/files/{name}.bz2 (decompress with bunzip2); the PyPI package "
    "face-recognition-models==0.3.0 ships it in face_recognition_models/models/."
)


def packaged_model_dir() -> Path | None:
    """``face_recognition_models/models`` of the installed package, or None.

    Found with ``importlib.util.find_spec``, which does not run the package's ``__init__`` (it imports
    ``pkg_resources``, which setuptools >= 81 no longer provides).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "models"
        if folder.is_dir():
            return folder
    return None


def _dlib():
    try:
        import dlib
    except ImportError as exc:
        raise ModelUnavailableError(
            "dlib is not installed; install the prebuilt wheel: `pip install dlib-bin`"
        ) from exc
    return dlib


@dataclass(frozen=True, eq=False)
class DlibFaceModel:
    """dlib's shape predictor and recognition network, with the files they came from."""

    shape_predictor: object
    recognizer: object
    shape_predictor_path: Path
    recognition_path: Path


def _model_file(path, name: str) -> Path:
    if path is None:
        folder = packaged_model_dir()
        path = folder / name if folder is not None else None
    return require_file(path, what=f"dlib model {name}", published=PUBLISHED.format(name=name))


def load_dlib(recognition_path=None, shape_predictor_path=None) -> DlibFaceModel:
    """Load dlib's recognition network and 5-point shape predictor.

    Paths default to the files of the installed ``face-recognition-models`` package. Raises
    ModelUnavailableError naming the missing file and where dlib publishes it.
    """
    dlib = _dlib()
    recognition = _model_file(recognition_path, RECOGNITION_FILE)
    predictor = _model_file(shape_predictor_path, SHAPE_PREDICTOR_FILE)
    try:
        shape_predictor = dlib.shape_predictor(str(predictor))
    except RuntimeError as exc:
        raise ModelUnavailableError(f"{str(predictor)!r} is not a dlib shape predictor file: {exc}") from exc
    try:
        recognizer = dlib.face_recognition_model_v1(str(recognition))
    except RuntimeError as exc:
        raise ModelUnavailableError(
            f"{str(recognition)!r} is not a dlib face recognition model file: {exc}"
        ) from exc
    return DlibFaceModel(shape_predictor, recognizer, predictor, recognition)


def _rectangle(box):
    x1, y1, x2, y2 = box_of(box)
    return _dlib().rectangle(int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2)))


def dlib_landmarks(model: DlibFaceModel, image, detection_or_box) -> np.ndarray:
    """dlib's five points inside the box: 5x2 float64 (x, y) pixels (dlib's order, not MTCNN's)."""
    shape = model.shape_predictor(rgb_array(image), _rectangle(detection_or_box))
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def descriptor_dlib(
    model: DlibFaceModel, image, detection_or_box, num_jitters: int = 0, padding: float = 0.25
) -> np.ndarray:
    """The raw (128,) float32 dlib descriptor of the face in the box (a Detection or (x1, y1, x2, y2)).

    num_jitters: dlib's test-time augmentation (0 or 1: none; N > 1: mean over N random jitters, slower
    and not deterministic across dlib builds). padding: the chip's margin around the face, dlib's default.
    """
    pixels = rgb_array(image)
    shape = model.shape_predictor(pixels, _rectangle(detection_or_box))
    vector = model.recognizer.compute_face_descriptor(pixels, shape, int(num_jitters), float(padding))
    return np.asarray(vector, dtype=np.float32)


def embed_dlib(model: DlibFaceModel, image, detection_or_box, num_jitters: int = 0) -> np.ndarray:
    """The dlib descriptor L2-normalised: (128,) float32, for cosine similarity."""
    return l2_normalise(descriptor_dlib(model, image, detection_or_box, num_jitters))


def euclidean_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two raw descriptors (dlib's measure; compare with SAME_PERSON_DISTANCE)."""
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))

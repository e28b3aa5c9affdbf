"""deepface's face-recognition models (ArcFace, Facenet512, Facenet, GhostFaceNet, VGG-Face, ...) as an
optional identity scorer, on the harness's own face and crop (extra ``deepface``).

What stays the harness's: the face (stage 1 of scoring: MTCNN and the recorded choice policy) and the crop,
made here from that face with :mod:`.crops` / :func:`f2d_bench.faces.align.arcface_align`. deepface's own
detectors never run. What is deepface's: the network and its weights, built by deepface's own model class
for the backend engine chosen (default ``pytorch``, so TensorFlow is not needed), and the input steps that
``DeepFace.represent(..., detector_backend="skip")`` applies to an image it is given: RGB crop -> BGR,
``preprocessing.resize_image`` to the model's input shape (letterboxed, scaled to 0..1),
``preprocessing.normalize_input`` (``normalization``; deepface's default ``base`` leaves 0..1), then the
model's ``forward``. :func:`embed_crops` calls exactly those functions, so its embedding equals
``represent``'s on the same crop (checked in tests/test_deepface.py).

Crops (``crop`` setting), square, side = the larger side of the model's input shape:
- ``arcface``: the 5-point ArcFace template warp (scaled from 112 px), for the models trained on such crops
  (ArcFace, SFace, GhostFaceNet, Buffalo_L: the default for them);
- ``box``: the MTCNN box resized, as facenet-pytorch's ``extract_face`` with margin 0 (the default for
  the others, which deepface feeds with a detector's box).

Weights: deepface keeps them in ``$DEEPFACE_HOME/.deepface/weights/`` (``DEEPFACE_HOME`` defaults to the
user's home) and downloads a missing file at first use. Here a missing file is an error naming that path
and deepface's source URL(s), raised before any download, unless ``allow_download`` is true.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from f2d_bench.errors import F2DBenchError, ModelUnavailableError
from f2d_bench.scorers.base import MetricSpec
from f2d_bench.scorers.identity.crops import box_crop, box_of, l2_normalise, landmarks_of, stack_crops
from f2d_bench.scorers.identity.scorer import IdentityScorer
from f2d_bench.weights import WeightsLayoutError

INSTALL_HINT = "pip install 'f2d-bench[deepface]'"
TASK = "facial_recognition"
DEFAULT_MODEL = "ArcFace"
DEFAULT_ENGINE = "pytorch"
CROP_MODES = ("arcface", "box")
#: Models trained on ArcFace-template crops (insightface lineage); the others get the box crop.
TEMPLATE_MODELS = frozenset({"ArcFace", "SFace", "GhostFaceNet", "Buffalo_L"})


def require_deepface():
    """The imported ``deepface`` package (its ``__init__`` holds only the version: cheap), or a
    ModelUnavailableError saying how to install the extra."""
    try:
        import deepface
    except ImportError as exc:
        raise ModelUnavailableError(
            f"the deepface identity scorer needs the optional package deepface: {INSTALL_HINT}"
        ) from exc
    return deepface


def deepface_version() -> str | None:
    try:
        return metadata.version("deepface")
    except metadata.PackageNotFoundError:
        return None


def recognition_models() -> tuple[str, ...]:
    """The model names deepface offers for face recognition (for some backend engine)."""
    require_deepface()
    from deepface.modules import modeling  # imports no framework

    return tuple(modeling.AVAILABLE_MODELS[TASK])


def metric_name(model_name: str) -> str:
    """``deepface_<model>``, lower case, other characters as '_' (``VGG-Face`` -> ``deepface_vgg_face``)."""
    return "deepface_" + re.sub(r"[^a-z0-9]+", "_", model_name.lower()).strip("_")


def default_crop(model_name: str) -> str:
    return "arcface" if model_name in TEMPLATE_MODELS else "box"


def weights_dir() -> Path:
    """Where deepface reads and downloads weight files: ``$DEEPFACE_HOME/.deepface/weights`` (home
    defaults to ``~``), computed by deepface's own ``folder_utils.get_deepface_home``."""
    require_deepface()
    from deepface.commons import folder_utils

    return Path(os.path.normpath(os.path.join(folder_utils.get_deepface_home(), ".deepface", "weights")))


def select_engine(engine: str) -> str:
    """Make deepface run on ``engine`` (tensorflow, pytorch or onnx) and return it.

    deepface picks its engine once per process from ``DEEPFACE_BACKEND_ENGINE`` (else the first of
    tensorflow, pytorch, onnxruntime installed); the variable is set here when unset, so that the values
    do not depend on whether TensorFlow happens to be installed. A conflicting choice is an error.
    """
    require_deepface()
    from deepface.commons import backend_utils

    var = backend_utils.BACKEND_ENGINE_ENV_VAR
    if engine not in backend_utils.BACKENDS:
        raise F2DBenchError(f"scorer deepface: engine must be one of {', '.join(backend_utils.BACKENDS)}, "
                            f"got {engine!r}")
    enforced = os.environ.get(var, "").strip().lower()
    if enforced and enforced != engine:
        raise F2DBenchError(f"scorer deepface: {var} is set to {enforced!r} but the scorer's engine setting "
                            f"is {engine!r}; unset the variable or set the engine to match")
    os.environ.setdefault(var, engine)
    try:
        active = backend_utils.get_backend_engine()
    except ValueError as exc:  # the engine's framework is not installed
        raise ModelUnavailableError(f"scorer deepface: {exc}") from exc
    if active != engine:
        raise F2DBenchError(f"scorer deepface: deepface already runs on {active} in this process; the "
                            f"engine setting {engine!r} can only take effect in a new process")
    return active


def _urls(source_url) -> list[str]:
    return [source_url] if isinstance(source_url, str) else [str(u) for u in source_url]


@contextmanager
def _offline_guard(model_name: str, allow_download: bool, requested: list[Path]):
    """While deepface builds a model, check each weight file it asks for before it could download.

    deepface's model modules all call ``weight_utils.download_weights_if_necessary(file_name, source_url,
    compress_type)``, looked up at call time; it is wrapped here for the duration, so the file name and
    URLs in the message are exactly the ones deepface uses for this model and engine.
    """
    from deepface.commons import weight_utils

    original = getattr(weight_utils, "download_weights_if_necessary", None)
    if original is None:
        raise ModelUnavailableError(
            f"deepface {deepface_version()} has no weight_utils.download_weights_if_necessary; this scorer "
            "supports the deepface versions that do (>= 0.0.103)")

    def guarded(file_name, source_url, compress_type=None):
        target = weights_dir() / file_name
        requested.append(target)
        urls = _urls(source_url)
        packed = f" (served as .{compress_type}: deepface unpacks it to that name)" if compress_type else ""
        where = (f"deepface expects the {model_name} weights file {file_name!r} at {str(target)!r}; it is "
                 f"published at {' or '.join(urls)}{packed}. Set DEEPFACE_HOME to use another folder "
                 "(files go in $DEEPFACE_HOME/.deepface/weights).")
        if not target.is_file() and not allow_download:
            raise ModelUnavailableError(
                f"{where} Download it and place it there, or allow deepface to download it with "
                "scoring.settings: {deepface: {allow_download: true}}.")
        try:
            return original(file_name, source_url, compress_type)
        except Exception as exc:  # no network, an HTTP error, a full disk ...
            raise ModelUnavailableError(f"deepface could not download its weights ({exc}). {where}") from exc

    weight_utils.download_weights_if_necessary = guarded
    try:
        yield
    finally:
        weight_utils.download_weights_if_necessary = original


@dataclass(eq=False)
class DeepFaceModel:
    """A deepface recognition model (deepface's own client object) and what it was built from."""

    client: Any
    model_name: str
    engine: str
    weight_files: list[Path] = field(default_factory=list)

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) in pixels: deepface's ``input_shape`` is (width, height), see represent's
        ``target_size=(input_shape[1], input_shape[0])`` given to ``resize_image`` as (rows, cols)."""
        width, height = self.client.input_shape
        return int(width), int(height)

    @property
    def crop_size(self) -> int:
        """Side of the square crop made for this model (pixels)."""
        return max(self.input_size)

    @property
    def embedding_dim(self) -> int:
        return int(self.client.output_shape)


def load_deepface(model_name: str = DEFAULT_MODEL, engine: str = DEFAULT_ENGINE, device: str | None = None,
                  allow_download: bool = False) -> DeepFaceModel:
    """Build ``model_name`` with deepface's own class for ``engine`` and load its weights from deepface's
    weights folder (:func:`weights_dir`).

    A new instance each call (deepface's ``build_model`` singleton is not used, so the weights folder in
    force now is the one read). device: for the pytorch engine, where to move the network (deepface's
    own choice, ``cuda:0`` when available, otherwise). Raises ModelUnavailableError for a missing weights
    file (naming its path and URL) unless ``allow_download``, and for a model deepface does not offer;
    WeightsLayoutError (a ModelUnavailableError) for a file deepface cannot load.
    """
    require_deepface()
    select_engine(engine)
    from deepface.modules import modeling
    from deepface.modules.exceptions import UnimplementedError

    try:
        cls = modeling.get_model_class(task=TASK, model_name=model_name)
    except UnimplementedError as exc:
        raise ModelUnavailableError(f"scorer deepface: {exc}; models: {', '.join(recognition_models())}") from exc
    requested: list[Path] = []
    with _offline_guard(model_name, allow_download, requested):
        try:
            client = cls()
        except ModelUnavailableError:
            raise
        except (ValueError, RuntimeError) as exc:  # an unreadable file; another layout (strict load)
            files = ", ".join(repr(str(p)) for p in requested)
            raise WeightsLayoutError(f"deepface could not load its {model_name} weights file {files} "
                                     f"({type(exc).__name__}: {str(exc)[:500]}); delete it and place the file "
                                     "deepface publishes there") from exc
    if device is not None and engine == "pytorch" and hasattr(client, "device"):
        import torch

        client.device = torch.device(device)
        client.model = client.model.to(client.device)
    return DeepFaceModel(client, model_name, engine, requested)


def crop_deepface(image, detection, mode: str, size: int) -> np.ndarray:
    """The harness's crop of ``detection`` in ``image``: (size, size, 3) uint8 RGB.

    mode ``arcface``: ArcFace 5-point template warp (template scaled by size/112, F2D's interpolation);
    ``box``: the MTCNN box, margin 0, resized (Pillow bilinear).
    """
    from f2d_bench.faces.align import arcface_align

    if mode == "arcface":
        return arcface_align(image, landmarks_of(detection), size=int(size))
    if mode == "box":
        return box_crop(image, box_of(detection), int(size))
    raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, got {mode!r}")


def model_input(model: DeepFaceModel, crops, normalization: str = "base") -> np.ndarray:
    """(N, H, W, 3) float32 BGR network input, made from RGB uint8 crops by deepface's own steps (those
    ``represent`` applies with ``detector_backend="skip"``): ``resize_image`` then ``normalize_input``."""
    from deepface.modules import preprocessing

    width, height = model.input_size
    side = model.crop_size
    batch = stack_crops(crops, side, side)
    rows = []
    for crop in batch:
        pixels = preprocessing.resize_image(img=crop[:, :, ::-1], target_size=(height, width))
        rows.append(preprocessing.normalize_input(img=pixels, normalization=normalization))
    return np.concatenate(rows, axis=0)


def embed_crops(model: DeepFaceModel, crops, normalization: str = "base") -> np.ndarray:
    """(N, d) float32 unit embeddings of RGB uint8 crops from :func:`crop_deepface` (d: the model's
    ``output_shape``, e.g. 512 for ArcFace). Cosine similarity of two faces = dot product, -1..1."""
    batch = model_input(model, crops, normalization)
    if len(batch) == 0:
        return np.zeros((0, model.embedding_dim), np.float32)
    raw = np.asarray(model.client.forward(batch), dtype=np.float64).reshape(len(batch), -1)
    return l2_normalise(raw)


def _metric(model_name: str) -> MetricSpec:
    return MetricSpec(name=metric_name(model_name), higher_is_better=True, low=-1.0, high=1.0, in_mean=False,
                      description=f"cosine similarity of deepface {model_name} embeddings of the input face "
                                  "and the generated face (the harness's face and crop); 0.0 when no face "
                                  "is detected")


class DeepFaceScorer(IdentityScorer):
    """deepface recognition model (``model_name``) on the harness's face and crop. Optional extra
    (``pip install 'f2d-bench[deepface]'``), not a default scorer, not part of hMean/gMean.

    Settings: ``model_name`` (deepface's name: ArcFace, Facenet512, Facenet, GhostFaceNet, VGG-Face,
    SFace, ...), ``engine`` (deepface's backend: pytorch, tensorflow or onnx), ``crop`` (``arcface`` or
    ``box``; None: the model's default, resolved and recorded), ``normalization`` (deepface's
    ``normalize_input`` name), ``allow_download`` (let deepface fetch a missing weights file).
    The metric is ``deepface_<model>`` (e.g. ``deepface_arcface``).
    """

    name = "deepface"
    version = "1"
    metric = metric_name(DEFAULT_MODEL)
    #: The default model's metric; an instance declares its own model's.
    metrics: ClassVar[tuple[MetricSpec, ...]] = (_metric(DEFAULT_MODEL),)
    defaults = {"weights": "official", "model_name": DEFAULT_MODEL, "engine": DEFAULT_ENGINE, "crop": None,
                "normalization": "base", "allow_download": False}

    @staticmethod
    def check_installed() -> None:
        """ModelUnavailableError with the install command when deepface is missing (checked at run start)."""
        require_deepface()

    def __init__(self, settings, context):
        super().__init__(settings, context)
        require_deepface()
        s = self.settings
        if s["weights"] != "official":
            raise F2DBenchError("scorer deepface: deepface builds its models only with their weights files; "
                                "weights must be 'official'")
        models = recognition_models()
        if s["model_name"] not in models:
            raise F2DBenchError(f"scorer deepface: unknown model_name {s['model_name']!r}; deepface offers "
                                f"{', '.join(models)}")
        s["crop"] = s["crop"] or default_crop(s["model_name"])
        if s["crop"] not in CROP_MODES:
            raise F2DBenchError(f"scorer deepface: crop must be one of {', '.join(CROP_MODES)}, got {s['crop']!r}")
        s["allow_download"] = bool(s["allow_download"])
        self.metric = metric_name(s["model_name"])
        self.metrics = (_metric(s["model_name"]),)

    def cache_identity(self) -> dict:
        # another deepface release may port a network differently: values are not reused across versions
        return super().cache_identity() | {"deepface": deepface_version()}

    def describe(self) -> dict:
        out = super().describe() | {"deepface": deepface_version(), "metric": self.metric}
        if self._model is not None:
            out["weight_files"] = [str(p) for p in self._model.weight_files]
        return out

    def _load_official(self):
        s = self.settings
        return load_deepface(s["model_name"], engine=s["engine"], device=self.context.device,
                             allow_download=s["allow_download"])

    def _embed(self, images: Sequence, detections: Sequence) -> np.ndarray:
        model = self.model()
        crops = [crop_deepface(im, d, self.settings["crop"], model.crop_size) for im, d in zip(images, detections)]
        return embed_crops(model, crops, self.settings["normalization"])

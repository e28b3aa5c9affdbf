"""The method plugin API: ``prepare(face)`` once per face, ``generate(requests)`` for a batch.

A method that learns something per face (TextualInversion, DreamBooth, ...) sets ``tunes`` and
implements ``tune(face, work_dir)`` (writes the artifact) and ``load_tuned(face, artifact_dir)`` (what
``generate`` gets as ``prepared``, instead of ``prepare``'s result). The engine tunes each face once per
run, keeps the artifact in the run directory and reuses it in every later command (``f2d_bench.tuning``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

from PIL import Image

from f2d_bench.config import ModelConfig, RunConfig, SamplingConfig, canonical_hash
from f2d_bench.errors import ConfigError
from f2d_bench.grid import ItemKey
from f2d_bench.prompts import Prompt, PromptSet

if TYPE_CHECKING:  # keep torch and diffusers out of import time
    import torch
    from diffusers import StableDiffusionPipeline

    from f2d_bench.faces.faceset import Face


#: :meth:`Method.faceless`'s verdicts: (detector id, the photo's file_version) -> a usable face was found.
_HAS_FACE: dict[tuple, bool] = {}


@dataclass(frozen=True)
class MethodContext:
    """What a method may use: the run's config, its prompt set, its base pipeline and its sampling."""

    config: RunConfig
    prompt_set: PromptSet
    #: Loads (once, shared by every method of the run with the same base model) this method's base
    #: Stable Diffusion pipeline, with this method's scheduler.
    pipeline: Callable[[], "StableDiffusionPipeline"]
    #: The base model this method renders with (its config's ``base``, else the run's ``model``).
    model: ModelConfig | None = None
    #: The sampling settings this method renders with (the run's, or its native ones).
    sampling: SamplingConfig | None = None
    #: ``protocol`` or ``native`` (:data:`f2d_bench.config.SAMPLING_MODES`).
    sampling_mode: str = "protocol"

    def __post_init__(self):
        # A context built without them (tests, one-method tools) renders on the run's model and sampling.
        if self.model is None:
            object.__setattr__(self, "model", self.config.model)
        if self.sampling is None:
            object.__setattr__(self, "sampling", self.config.sampling)


@dataclass
class GenerationRequest:
    """One image to render."""

    key: ItemKey
    prompt: Prompt
    face: "Face"
    #: Whatever ``prepare(face)`` returned for this face.
    prepared: Any
    #: A CPU generator seeded from the key, used for this image only.
    generator: "torch.Generator"


@dataclass(frozen=True)
class Skipped:
    """A request the method could not fulfil; the reason is reported and the image stays missing."""

    reason: str


class Method:
    """Base class of generation methods.

    Subclasses set ``name`` and ``summary``, validate ``params`` in ``__init__`` and implement
    ``generate``. ``identity()`` returns every setting that decides the images: its hash becomes part
    of the method id, so two settings never share files.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: Parameters accepted in the config's ``params`` and their defaults.
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: Whether images depend on the base model and sampling settings.
    uses_pipeline: ClassVar[bool] = True
    #: Whether the method tunes per face (``tune`` and ``load_tuned`` instead of ``prepare``).
    tunes: ClassVar[bool] = False
    #: Whether a tuning method's artifact depends on the sampling settings (class images rendered with
    #: them); False: entries that differ only in ``sampling`` share each face's tuning (``tuning_id``).
    tuning_reads_sampling: ClassVar[bool] = True
    #: The official scheduler, steps and CFG (SamplingConfig keys) that ``sampling: native`` selects;
    #: None: the method has no sampling of its own.
    native_sampling: ClassVar[Mapping[str, Any] | None] = None
    #: The base model the method was released on (shown in `f2d-bench methods`; a run on another
    #: base model is noted when it starts). None: any SD 1.x.
    released_base: ClassVar[str | None] = None
    #: Components of the base pipeline the method brings its own weights for (FastComposer: its UNet
    #: and text encoder); recorded in method.json and shown in reports.
    replaces: ClassVar[tuple[str, ...]] = ()
    #: Display name in reports (the config's ``label``, else the registry name); set by the engine.
    label: str = ""
    #: A folder of the run for what a method makes once for all faces (e.g. class images); set by the
    #: engine once the run directory exists (None before).
    shared_dir: Path | None = None

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "(none)"
            raise ConfigError(f"method {self.name}: unknown param {unknown[0]!r}; allowed: {allowed}")
        self.params = {**self.defaults, **params}
        self.context = context

    def require_positive_ints(self, *keys: str) -> None:
        """ConfigError naming the first of ``keys`` whose param is not an integer >= 1."""
        for key in keys:
            value = self.params[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"param {key} must be a positive integer, got {value!r}")

    def require_number(self, key: str, low: float, high: float, note: str = "") -> None:
        """ConfigError naming ``key`` unless its param is a number (not a bool) in [low, high]."""
        value = self.params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ConfigError(f"param {key} must be a number in [{low:g}, {high:g}]"
                              f"{f' ({note})' if note else ''}, got {value!r}")

    # -- identity -------------------------------------------------------------------------------
    def identity(self) -> dict:
        ident: dict[str, Any] = {"method": self.name, "params": dict(self.params)}
        if self.uses_pipeline:
            model = self.context.model.to_dict()
            model.pop("device")  # the device changes float rounding, not what the images are
            ident["model"] = model
            ident["sampling"] = self.context.sampling.to_dict()
            if self.context.sampling_mode != "protocol":  # protocol runs keep the ids they always had
                ident["sampling_mode"] = self.context.sampling_mode
        return ident

    @property
    def method_id(self) -> str:
        """``<name>-<8 hex>``: the registry name plus a hash of ``identity()``."""
        return f"{self.name}-{canonical_hash(self.identity(), 8)}"

    @property
    def tuning_id(self) -> str:
        """``<name>-<8 hex>`` of every setting that decides a tuning method's artifact: the method id's
        settings, less the sampling when the tuning does not read it. Two entries of a run with one
        tuning id tune each face once (:func:`f2d_bench.tuning.stage.ensure_tuned`)."""
        ident = self.identity()
        if not self.tuning_reads_sampling:
            ident = {k: v for k, v in ident.items() if k not in ("sampling", "sampling_mode")}
        return f"{self.name}-{canonical_hash(ident, 8)}"

    def info(self) -> dict:
        """Facts recorded in ``methods/<id>/method.json`` and shown in reports.

        ``trained_params``: number of trained parameters (Table 2's #Params) or None;
        ``weights``: ``"official"``, ``"none"`` or ``"random weights: not meaningful"``.
        """
        return {"trained_params": None, "weights": "none"}

    def setup(self) -> dict:
        """How the method renders, recorded in method.json beside ``info()``: its base model, which of
        the base's components it replaces, and its sampling mode (None for methods without a pipeline)."""
        if not self.uses_pipeline:
            return {"sampling_mode": None, "replaces": []}
        return {"sampling_mode": self.context.sampling_mode, "replaces": list(self.replaces),
                "released_base": self.released_base}

    # -- work -----------------------------------------------------------------------------------
    def preflight(self, face_ids: Sequence[str], prompt_ids: Sequence[str], seeds: Sequence[int]) -> list[str]:
        """Problems found before generating (reported, not fatal). Default: none."""
        return []

    # -- the face in each photo (methods that encode one) -------------------------------------------
    #: What the method does with the detected face, for the error when a photo has none ("F2D needs a
    #: visible face to encode"); None for methods that need no face detected.
    face_need: ClassVar[str | None] = None

    def detect_input(self, image: Image.Image) -> list:
        """The faces (``f2d_bench.faces.detect.Detection``) this method's detector finds in ``image``.
        Default: those of ``self.detector``, the :class:`~f2d_bench.faces.detect.FaceDetector` (MTCNN)
        the method sets."""
        return self.detector.detect(image)

    def detect_input_id(self) -> tuple:
        """What decides :meth:`detect_input`'s answer besides the image: methods with equal ones share
        :meth:`faceless`'s detections within a process. Default: ``self.detector``'s settings."""
        return self.detector.identity

    def input_face(self, face: "Face", image: Image.Image):
        """The face of ``image`` (``face``'s photo) this method encodes: the one the identity scorers
        choose (``INPUT_FACE_RULE``), so the face encoded is the face scored against. An error naming the
        file when there is none."""
        from f2d_bench.errors import F2DBenchError

        chosen = self._chosen_input(image)
        if chosen is None:
            raise F2DBenchError(f"{self.name}: no face detected in {face.path} (face {face.face_id}); "
                                f"{self.face_need}. Replace the image or remove it from the face set.")
        return chosen

    def _chosen_input(self, image: Image.Image):
        """The detection :meth:`input_face` takes from ``image``, or None."""
        from f2d_bench.faces.choice import INPUT_FACE_RULE, choose_face

        return choose_face(self.detect_input(image), INPUT_FACE_RULE)[0]

    def faceless(self, faces: Sequence["Face"]) -> list["Face"]:
        """The faces whose photo has no face this method can use (none when :attr:`face_need` is None).

        ``generate`` asks before the run folder exists, so a photo that would stop the run at its face,
        hours in, is named at the start, while the face set can still be corrected for the same --out."""
        if self.face_need is None:
            return []
        from f2d_bench.faces.imageio import read_image
        from f2d_bench.files import file_version

        out = []
        for f in faces:
            # Each start of generate asks (every Ray shard, every method that encodes a face): a photo is
            # searched once per process and detector, unless the file changes.
            key = (self.detect_input_id(), file_version(f.path))
            # Only the verdict is kept: prepare detects again, as the per-face time it records (Table 2's
            # cost per face) includes the detection.
            if key not in _HAS_FACE:
                _HAS_FACE[key] = self._chosen_input(read_image(f.path)) is not None
            if not _HAS_FACE[key]:
                out.append(f)
        return out

    @property
    def encodes_faces(self) -> bool:
        """Whether :meth:`prepare` does per-face work (it is overridden): only then is its time Table 2's
        encoding time; a method that prepares nothing has no time to report, not a near-zero one."""
        return type(self).prepare is not Method.prepare

    def prepare(self, face: "Face") -> Any:
        """Per-face work done once (encoders, tuned weights). Its wall time is recorded per face."""
        return None

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Image.Image | Skipped]:
        """One RGB image (or a Skipped) per request, in order."""
        raise NotImplementedError

    # -- per-face tuning (methods with ``tunes = True``) ------------------------------------------
    def tune(self, face: "Face", work_dir: Path) -> dict:
        """Learn ``face`` and write the artifact files into ``work_dir`` (an empty folder).

        Returns facts recorded in the face's ``tune.json``: ``trained_params`` (int), ``steps`` (int),
        ``losses`` (training loss per update). Called once per face by whichever command needs it first;
        a call that was interrupted is started again from scratch, so it must depend only on the face
        and the method's settings (seed included).
        """
        raise NotImplementedError

    def load_tuned(self, face: "Face", artifact_dir: Path) -> Any:
        """What ``generate`` receives as ``prepared`` for a tuned face, read from its artifact folder."""
        raise NotImplementedError

    def artifact_bytes(self) -> int | None:
        """Bytes of weights one face's tuning writes to the run (None: small enough not to check), so
        that a run which would fill the disk is refused before the first face rather than hours in."""
        return None

    def keeps_weights(self) -> bool:
        """False: render each face right after tuning it and delete its weights (a full UNet per face).

        Such a method must render each face in a pipeline call of its own (its images may not depend on
        which other faces share a batch): on resume the engine leaves complete faces out of a batch.
        """
        return True


def render_per_face(requests: Sequence[GenerationRequest], render: Callable[[list[GenerationRequest]], list]) -> list:
    """``render(group)`` once per face's requests (methods whose weights differ per face); results in
    request order. Each face's images are then independent of which other faces share the batch."""
    by_face: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        by_face.setdefault(request.face.face_id, []).append(i)
    out: list = [None] * len(requests)
    for indices in by_face.values():
        for i, image in zip(indices, render([requests[i] for i in indices])):
            out[i] = image
    return out


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def check_method_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(f"method name {name!r} must match {_NAME_RE.pattern}")

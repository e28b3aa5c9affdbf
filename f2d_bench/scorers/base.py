"""The scorer plugin API: metrics declared as data, one value per image per metric.

A scorer gets batches of ``ScoreItem`` (the generated image, its prompt, the input face, the reference
image of the same method, face and seed, and the face found in the generated image) and returns one dict
of metric values per item. Scorers never see a method.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Sequence

from f2d_bench.config import PRECISIONS, canonical_hash
from f2d_bench.errors import ConfigError
from f2d_bench.faces.imageio import read_image
from f2d_bench.grid import ItemKey

if TYPE_CHECKING:
    from PIL import Image

    from f2d_bench.faces.detect import Detection
    from f2d_bench.faces.faceset import Face
    from f2d_bench.prompts import Prompt, PromptSet

#: What reports print beside a metric computed with random weights (offline smoke runs).
RANDOM_WEIGHTS_NOTE = "random weights: not meaningful"


@dataclass(frozen=True)
class MetricSpec:
    """A metric's display metadata: column name, direction and range of values."""

    name: str
    higher_is_better: bool
    low: float
    high: float
    description: str
    #: Part of the paper's hMean/gMean (the six Table 1 metrics).
    in_mean: bool = False


@dataclass
class ScoreItem:
    """One generated image to score."""

    key: ItemKey
    image: "Image.Image"  # RGB, 8 bit
    prompt: "Prompt"
    face: "Face"
    #: The same method's "a photo of S*" image for this face and seed (None for the reference itself).
    reference_path: Path | None
    #: The face chosen in the generated image (policy in ScoringContext), or None when none was found.
    detection: "Detection | None"


@dataclass
class ScoringContext:
    """What scorers share: the prompt set, the device and the input-face detections."""

    prompt_set: "PromptSet"
    device: str
    #: face_id -> the chosen detection in the input face image (None: no face found there).
    input_detections: Mapping[str, "Detection | None"]
    #: ``scoring.precision``: the default of scorers that support it (see :attr:`Scorer.precisions`).
    precision: str = "fp32"
    #: Reads a run image as 8-bit RGB (`score` passes the images it has already decoded).
    read_image: Callable[[Path], "Image.Image"] = read_image


@contextmanager
def precision_scope(precision: str, device: str) -> Iterator[None]:
    """Run torch models under ``precision``: ``fp32`` turns TF32 off for CUDA matmuls and cuDNN (exact
    float32), ``tf32`` turns it on (no effect on the CPU), ``bf16`` adds bfloat16 autocast on ``device``.
    The process's previous TF32 switches are restored on exit."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    with tf32_scope(precision == "tf32"):
        if precision == "bf16":
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
                yield
        else:
            yield


@contextmanager
def tf32_scope(enabled: bool) -> Iterator[None]:
    """CUDA's TF32 switches (matmuls and cuDNN) both set to ``enabled``, restored on exit. They are
    process-wide, not per thread."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class Scorer:
    """Base class. Subclasses set ``name``, ``version``, ``metrics`` and ``defaults`` and implement ``score``.

    ``version`` is bumped whenever the values a scorer returns change for the same settings; it is part
    of the cache key with the name and the settings, so cached values are never reused across versions.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: Whether values depend on the face chosen in the generated image (then the face stage's
    #: settings are part of the cache key).
    uses_faces: ClassVar[bool] = False
    #: The ``precision`` values this scorer's model runs in (fp32 only: no torch model to change).
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def __init__(self, settings: Mapping[str, Any], context: ScoringContext):
        # ``precision`` is a setting of every scorer, kept apart from ``settings`` so that an fp32 scorer
        # keeps the cache key it had before precision was a setting.
        settings = dict(settings)
        asked = settings.pop("precision", None)
        if asked is not None and asked not in self.precisions:
            raise ConfigError(f"scorer {self.name}: precision {asked!r} is not one of "
                              f"{', '.join(self.precisions)}" + (" (it runs no torch model)"
                                                                 if self.precisions == ("fp32",) else ""))
        self.precision = asked or (context.precision if context.precision in self.precisions else "fp32")
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise ConfigError(f"scorer {self.name}: unknown setting {unknown[0]!r}; allowed: {self.allowed_settings()}")
        self.settings = {**self.defaults, **settings}
        self.context = context

    @classmethod
    def allowed_settings(cls) -> str:
        """The settings this scorer takes, as text for an error: its own and ``precision`` (every scorer's)."""
        return ", ".join(sorted({*cls.defaults, "precision"}))

    def cache_identity(self) -> dict:
        ident = {"scorer": self.name, "version": self.version, "settings": self.settings}
        if self.precision != "fp32":  # fp32 keys are those from before precision was a setting
            ident["precision"] = self.precision
        return ident

    def load(self) -> None:
        """Build or load the model now instead of at the first batch (``generate --score`` loads every
        model before its scoring thread starts, since seeded random builds use torch's global RNG)."""

    def precision_scope(self):
        """The context :meth:`score` runs in: this scorer's precision on its device."""
        return precision_scope(self.precision, self.context.device)

    @property
    def cache_id(self) -> str:
        """``<name>-<hash>``: the folder of this scorer's cached values."""
        return f"{self.name}-{canonical_hash(self.cache_identity(), 10)}"

    def describe(self) -> dict:
        """Recorded in the run and shown in reports: checkpoint, backend, weight status."""
        return {"name": self.name, "version": self.version, "settings": self.settings, "note": self.note(),
                "precision": self.precision}

    def note(self) -> str | None:
        """A caveat for reports, e.g. RANDOM_WEIGHTS_NOTE. None when the values are meaningful."""
        return RANDOM_WEIGHTS_NOTE if self.settings.get("weights") == "random" else None

    def score(self, items: Sequence[ScoreItem]) -> list[dict[str, float]]:
        """One ``{metric name: value}`` per item, in order."""
        raise NotImplementedError

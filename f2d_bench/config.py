"""Run configuration: one YAML file per run, loaded strictly into frozen dataclasses.

Unknown keys and values of the wrong type are errors that name the key path (``sampling.height``)
and the file. Presets are YAML files shipped in ``f2d_bench/presets/``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from f2d_bench.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
#: The face-set value that names the photos shipped in ``f2d_bench/assets/faces`` (prepared on first use).
BUILTIN_TEST_FACES = "builtin:test-faces"


@dataclass(frozen=True)
class ModelConfig:
    """The base text-to-image model shared by the methods that render with Stable Diffusion."""

    #: Hugging Face id, local directory, or ``f2d-bench/tiny-sd14`` (tiny offline model).
    pretrained: str = "CompVis/stable-diffusion-v1-4"
    revision: str | None = None
    #: ``auto`` (float16 on CUDA, float32 on CPU), ``float16``, ``bfloat16`` or ``float32``.
    dtype: str = "auto"
    #: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("model.dtype", self.dtype, ("auto", "float16", "bfloat16", "float32"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"model.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class SamplingConfig:
    """Diffusion sampling settings (paper: EulerAncestral, 30 steps, CFG 7.0, 512x512)."""

    scheduler: str = "EulerAncestralDiscreteScheduler"
    num_inference_steps: int = 30
    guidance_scale: float = 7.0
    #: Output size in pixels; a multiple of 8 (SD's VAE downsamples by 8).
    height: int = 512
    width: int = 512

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ConfigError(f"sampling.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 8 or value % 8:
                raise ConfigError(f"sampling.{name} must be a positive multiple of 8, got {value}")


@dataclass(frozen=True)
class MethodConfig:
    """One method of the grid: a registry name and its settings."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    #: Display name in reports; defaults to the registry name.
    label: str | None = None

    def __post_init__(self) -> None:
        # Freeze the params so the config stays hashable-by-content and immutable.
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))

    @property
    def display_name(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class ScoringConfig:
    """How `f2d-bench score` scores a run. Not part of the grid: rescoring never touches the images."""

    #: Scorer names (see `f2d-bench scorers`); empty means the default set.
    scorers: tuple[str, ...] = ()
    #: Per-scorer settings, e.g. ``{adaface: {checkpoint: /w/adaface_ir101_webface12m.ckpt}}``.
    settings: Mapping[str, Any] = field(default_factory=dict)
    device: str = "auto"
    #: Images per scorer call.
    batch_size: int = 16
    #: Which face counts when a generated image shows several: ``most-confident`` (highest MTCNN
    #: probability, as FastComposer's evaluation takes MTCNN's first face) or ``largest`` (box area).
    face_policy: str = "most-confident"
    #: Detections below this MTCNN probability are ignored (0: every face MTCNN returns counts).
    min_face_prob: float = 0.0
    #: Rows per cache file: a killed score run loses at most this many computed values per scorer.
    chunk_size: int = 256
    #: Reference statistics (.npz from `f2d-bench fid-ref build`) for FID per method; None: no FID.
    fid_reference: str | None = None
    #: FID feature backend: ``pytorch-fid`` (the paper's default) or ``clean-fid-torchscript`` (offline).
    fid_backend: str = "pytorch-fid"
    #: Local Inception weights for the backend (None: the backend's published file).
    fid_weights: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", types.MappingProxyType(dict(self.settings)))
        _check_choice("scoring.face_policy", self.face_policy, ("most-confident", "largest"))
        if not 0.0 <= self.min_face_prob <= 1.0:
            raise ConfigError(f"scoring.min_face_prob must be in [0, 1], got {self.min_face_prob}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ConfigError(f"scoring.batch_size and scoring.chunk_size must be >= 1, got "
                              f"{self.batch_size} and {self.chunk_size}")
        for name, value in self.settings.items():
            if not isinstance(value, Mapping):
                raise ConfigError(f"scoring.settings.{name}: expected a mapping of settings, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's grid and images."""

    name: str
    methods: tuple[MethodConfig, ...]
    #: Directory of prepared faces (``f2d-bench faces prepare``) or ``builtin:test-faces``.
    faces: str | None = None
    #: Built-in prompt-set name (``prompts/NAME.yaml``) or a path to a prompt-set file.
    prompts: str = "human40"
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    #: Images per pipeline call. Changes float rounding slightly (about 1e-6), never the noise.
    batch_size: int = 8
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("methods: at least one method is needed")
        if not self.seeds:
            raise ConfigError("seeds: at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: duplicates in {list(self.seeds)}")
        if any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds: must be >= 0, got {list(self.seeds)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable form (the resolved config written into a run)."""
        return _to_plain(self)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def grid_hash(self) -> str:
        """Short hash of everything that decides which images exist and what they look like.

        ``batch_size`` is left out: it only changes float rounding, and a run may resume with another;
        ``scoring`` too: it decides how images are scored, not which exist; and ``methods``, which the
        run identifies by method ids.
        """
        data = self.to_dict()
        data.pop("batch_size")
        data.pop("scoring")
        # Methods are identified by their method ids (grid.json), which hash what decides their images
        # by content (F2D's checkpoints by sha256): moving a checkpoint file or relabelling a method
        # must not look like another experiment.
        data.pop("methods")
        data.pop("name")
        return canonical_hash(data)


def canonical_hash(data: Any, length: int = 12) -> str:
    """sha256 of the canonical JSON of ``data`` (sorted keys), as ``length`` hex digits."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


# --- strict loading -------------------------------------------------------------------------------


def config_from_dict(data: Any, source: str = "<config>") -> RunConfig:
    """Build a RunConfig from plain data; every error names ``source`` and the key path."""
    try:
        return _build(RunConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path) -> RunConfig:
    """Load a run config from a YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return config_from_dict(data, str(path))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> RunConfig:
    """Load a shipped preset (``paper``, ``smoke``)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return load_config(path)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; allowed keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp}")  # a bug, not user input

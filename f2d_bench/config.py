"""Run configuration: one YAML file per run, loaded strictly into frozen pydantic models.

Unknown keys and values of the wrong type are errors that name the key path (``sampling.height``)
and the file. Presets are YAML files shipped in ``f2d_bench/presets/``.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Mapping

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      model_validator)

from f2d_bench.errors import ConfigError
from f2d_bench.faces.choice import DEFAULT_FACE_RULE, FACE_RULES

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

PRESET_DIR = Path(__file__).resolve().parent / "presets"
#: Run names: the default run folder is ``runs/<name>``, so a name is one safe path component.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: The face-set value that names the photos shipped in ``f2d_bench/assets/faces`` (prepared on first use).
BUILTIN_TEST_FACES = "builtin:test-faces"
#: ``scoring.precision`` (and ``scoring.settings.<scorer>.precision``) values.
PRECISIONS = ("fp32", "tf32", "bf16")
#: ``scoring.no_face`` values: an image without a face scores 0.0, or is left out of identity means.
NO_FACE_POLICIES = ("zero", "drop")
#: ``methods[].sampling`` values: the run's sampling settings, or the method's official ones.
SAMPLING_MODES = ("protocol", "native")

# Strict pydantic takes only tuples for a tuple field, and YAML gives lists; nothing else becomes a tuple.
_Listed = BeforeValidator(lambda value: tuple(value) if isinstance(value, list) else value)
# Frozen models must not hold a mutable dict: params and settings become read-only views of a copy.
_Frozen = AfterValidator(lambda value: types.MappingProxyType(dict(value)))
_Settings = Annotated[Mapping[Any, Any], _Frozen]


#: The largest seed a torch generator takes.
MAX_SEED = 2**64 - 1


class _Section(BaseModel):
    """Shared behaviour: frozen, unknown keys forbidden, no type coercion (``"8"`` is not an int, ``true``
    is not a number; an int is accepted for a float and becomes a float).

    Build sections with :func:`config_from_dict` or :meth:`replace`, which raise ConfigError; the
    constructor raises pydantic's ValidationError. (No custom ``__init__``: pydantic would then build
    nested sections through it, and the errors would lose their key paths.)
    """

    # allow_inf_nan: a NaN guidance scale passed every check and meant no guidance at all (NaN > 1 is False)
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied, validated again (ConfigError if the result is invalid)."""
        cls = type(self)
        try:
            return cls.model_validate({**{name: getattr(self, name) for name in cls.model_fields}, **changes})
        except ValidationError as exc:
            raise _config_error(exc, cls) from None

    def to_dict(self, *, complete: bool = False) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable form: fields in declaration order, tuples as lists.

        Hashes of it identify grids and methods, so its form must never change: keys added later appear
        only once set. ``complete``: every key, set or not (records of what ran, never hashed).
        """
        return _to_plain(self, complete)


class ModelConfig(_Section):
    """The base text-to-image model shared by the methods that render with Stable Diffusion."""

    #: Hugging Face id, local directory, or ``f2d-bench/tiny-sd14`` (tiny offline model).
    pretrained: str = "CompVis/stable-diffusion-v1-4"
    revision: str | None = None
    #: ``auto`` (float16 on CUDA, float32 on CPU), ``float16``, ``bfloat16`` or ``float32``.
    dtype: str = "auto"
    #: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        _check_choice("model.dtype", self.dtype, ("auto", "float16", "bfloat16", "float32"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"model.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        return self


class SamplingConfig(_Section):
    """Diffusion sampling settings (paper: EulerAncestral, 30 steps, CFG 7.0, 512x512)."""

    scheduler: str = "EulerAncestralDiscreteScheduler"
    num_inference_steps: int = 30
    guidance_scale: float = 7.0
    #: Output size in pixels; a multiple of 8 (SD's VAE downsamples by 8).
    height: int = 512
    width: int = 512

    @model_validator(mode="after")
    def _check(self) -> SamplingConfig:
        if self.num_inference_steps < 1:
            raise ValueError(f"sampling.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 8 or value % 8:
                raise ValueError(f"sampling.{name} must be a positive multiple of 8, got {value}")
        return self


class MethodConfig(_Section):
    """One method of the grid: a registry name and its settings."""

    name: str
    params: _Settings = Field(default_factory=lambda: types.MappingProxyType({}))
    #: Display name in reports; defaults to the registry name.
    label: str | None = None
    #: The base pipeline this method renders with (Hugging Face id or local diffusers directory), for a
    #: method released on another model (IP-Adapter-FaceID and FastComposer on SD 1.5). None: the run's
    #: ``model``. dtype and device always follow the run's ``model``.
    base: str | None = None
    #: Revision of ``base`` (Hugging Face ids only).
    base_revision: str | None = None
    #: ``protocol``: the run's ``sampling`` (the paper ran every method with SD 1.4's settings);
    #: ``native``: the method's official scheduler, steps and CFG (its ``native_sampling``), the run's size.
    sampling: str = "protocol"

    _LATER_KEYS: ClassVar[tuple[str, ...]] = ("base", "base_revision", "sampling")

    @model_validator(mode="after")
    def _check(self) -> MethodConfig:
        _check_choice("sampling", self.sampling, SAMPLING_MODES)
        if self.base_revision is not None and self.base is None:
            raise ValueError("base_revision is set but base is not: a revision belongs to a base model id")
        return self

    @property
    def display_name(self) -> str:
        """The label, or the registry name when there is none."""
        return self.label or self.name

    def base_model(self, run_model: ModelConfig) -> ModelConfig:
        """The model this method renders with: ``base`` (if set) with the run's dtype and device."""
        if self.base is None:
            return run_model
        return run_model.replace(pretrained=self.base, revision=self.base_revision)


class ScoringConfig(_Section):
    """How `f2d-bench score` scores a run. Not part of the grid: rescoring never touches the images."""

    #: Scorer names (see `f2d-bench scorers`); empty means the default set.
    scorers: Annotated[tuple[str, ...], _Listed] = ()
    #: Per-scorer settings, e.g. ``{adaface: {checkpoint: /w/adaface_ir101_webface12m.ckpt}}``.
    settings: _Settings = Field(default_factory=lambda: types.MappingProxyType({}))
    device: str = "auto"
    #: Images per scorer call.
    batch_size: int = 16
    #: Which face counts when a generated image shows several (:mod:`f2d_bench.faces.choice`):
    #: ``largest`` (box area; FastComposer's evaluation, whose MTCNN sorts faces by size) or
    #: ``most-confident`` (highest MTCNN probability). Input faces always use ``INPUT_FACE_RULE``.
    face_policy: str = DEFAULT_FACE_RULE
    #: Detections below this MTCNN probability are ignored (0: every face MTCNN returns counts).
    min_face_prob: float = 0.0
    #: Rows per cache file: a killed score run loses at most this many computed values per scorer.
    chunk_size: int = 256
    #: Clamp each identity similarity at 0 (FastComposer's ``max(sim, 0)``); False keeps the raw cosine.
    #: Applied when records are assembled, so changing it recomputes nothing.
    identity_clamp: bool = False
    #: Identity value of an image without a face: ``zero`` (0.0, the paper and FastComposer) or ``drop``
    #: (left empty and out of the means, as CelebBasis's evaluation skips such images).
    no_face: str = "zero"
    #: Reference statistics (.npz from `f2d-bench fid-ref build`) for FID per method; None: no FID.
    fid_reference: str | None = None
    #: FID feature backend: ``pytorch-fid`` (the paper's default) or ``clean-fid-torchscript`` (offline).
    fid_backend: str = "pytorch-fid"
    #: Local Inception weights for the backend (None: the backend's published file).
    fid_weights: str | None = None
    #: Arithmetic of every scorer's model unless ``settings.<scorer>.precision`` says otherwise: ``fp32``
    #: (exact: TF32 off for matmuls and cuDNN), ``tf32`` (TF32 on; a no-op on the CPU) or ``bf16``
    #: (bfloat16 autocast, CPU and CUDA). Part of the cache key of each scorer it changes; scorers
    #: without a torch model (dlib, deepface) stay fp32. The face detector and FID are always fp32.
    precision: str = "fp32"
    #: Threads that decode the run's PNGs for scoring (0: in the scoring thread; None: one per core but
    #: one, at most 4; Pillow decodes without the GIL). Decoding is the same either way: it changes no value.
    workers: int | None = None
    #: Images decoded and held at once; each is decoded once and shared by every stage.
    block_size: int = 256

    _LATER_KEYS: ClassVar[tuple[str, ...]] = ("precision", "workers", "block_size")

    def resolved_workers(self) -> int:
        """``workers``, with None resolved for this machine."""
        from f2d_bench.scoring.decode import default_workers

        return default_workers() if self.workers is None else self.workers

    @model_validator(mode="after")
    def _check(self) -> ScoringConfig:
        _check_choice("scoring.face_policy", self.face_policy, FACE_RULES)
        _check_choice("scoring.no_face", self.no_face, NO_FACE_POLICIES)
        if not 0.0 <= self.min_face_prob <= 1.0:
            raise ValueError(f"scoring.min_face_prob must be in [0, 1], got {self.min_face_prob}")
        _check_choice("scoring.precision", self.precision, PRECISIONS)
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"scoring.workers must be >= 0 (0: decode in-process), got {self.workers}")
        if self.block_size < 1:
            raise ValueError(f"scoring.block_size must be >= 1, got {self.block_size}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(f"scoring.batch_size and scoring.chunk_size must be >= 1, got "
                             f"{self.batch_size} and {self.chunk_size}")
        for name, value in self.settings.items():
            if not isinstance(value, Mapping):
                raise ValueError(f"scoring.settings.{name}: expected a mapping of settings, got {value!r}")
        return self


class RunConfig(_Section):
    """Everything that decides a run's grid and images."""

    name: str
    methods: Annotated[tuple[MethodConfig, ...], _Listed]
    #: Directory of prepared faces (``f2d-bench faces prepare``) or ``builtin:test-faces``.
    faces: str | None = None
    #: Built-in prompt-set name (``prompts/NAME.yaml``) or a path to a prompt-set file.
    prompts: str = "human40"
    seeds: Annotated[tuple[int, ...], _Listed] = (0, 1, 2, 3)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    #: Images per pipeline call. Changes float rounding slightly (about 1e-6), never the noise.
    batch_size: int = 8
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if not _NAME.fullmatch(self.name) or ".." in self.name:
            raise ValueError(f"name: {self.name!r} must be a plain name of letters, digits, '.', '_' and '-' "
                             "starting with a letter or digit (it names the folder runs/<name>)")
        if not self.methods:
            raise ValueError("methods: at least one method is needed")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: duplicates in {list(self.seeds)}")
        if any(s < 0 or s > MAX_SEED for s in self.seeds):
            # torch generators take seeds below 2**64; a larger one failed hours in, at its first image
            raise ValueError(f"seeds: must be in 0..{MAX_SEED} (2**64 - 1), got {list(self.seeds)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        return self

    def grid_hash(self) -> str:
        """Short hash of everything that decides which images exist and what they look like.

        ``batch_size`` is left out: it only changes float rounding, and a run may resume with another;
        ``scoring`` too: it decides how images are scored, not which exist; and ``methods``, which the
        run identifies by method ids. ``model.device`` is hashed as ``auto`` whatever it says: where a
        shard renders changes rounding, not the images (method ids leave it out too), so shards pinned to
        ``cuda:0`` and ``cuda:1``, or a resume with ``--device auto``, stay one run. The one thing a device
        decides beyond rounding, the weight dtype ``auto`` resolves to, is checked against the run's
        earlier writers when generating (``f2d_bench.engine.check_rendering``).
        """
        return self._grid_hash(device="auto")

    def earlier_grid_hashes(self) -> tuple[str, ...]:
        """Hashes that earlier versions gave this grid: runs made by them open with the hash they hold.

        Until the device was hashed as ``auto``, it was hashed as written.
        """
        return (self._grid_hash(device=self.model.device),)

    def _grid_hash(self, *, device: str) -> str:
        data = self.to_dict()
        data["model"]["device"] = device
        for key in UNHASHED_KEYS:
            data.pop(key)
        return canonical_hash(data)


#: Top-level config keys the grid hash leaves out (see ``RunConfig.grid_hash``). Methods are identified by
#: their method ids (grid.json), which hash what decides their images by content (F2D's checkpoints by
#: sha256): moving a checkpoint file or relabelling a method must not look like another experiment.
UNHASHED_KEYS = ("batch_size", "scoring", "methods", "name")


#: The sections a key path steps into: the model class below each nested field.
_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "sampling": SamplingConfig, "methods": MethodConfig, "scoring": ScoringConfig,
}
_EXPECTED = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
             "tuple_type": "a list", "dict_type": "a mapping"}


def canonical_hash(data: Any, length: int = 12) -> str:
    """sha256 of the canonical JSON of ``data`` (sorted keys), as ``length`` hex digits."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _to_plain(value: Any, complete: bool = False) -> Any:
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        # Keys added after a section's form was fixed are written only when set, so configs and hashes of
        # runs that do not use them keep the form they always had.
        later = () if complete else getattr(type(value), "_LATER_KEYS", ())
        return {name: _to_plain(getattr(value, name), complete) for name in fields
                if name not in later or getattr(value, name) != fields[name].default}
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v, complete) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, complete) for v in value]
    return value


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(choices)}")


# --- errors ---------------------------------------------------------------------------------------


def _config_error(exc: ValidationError, root: type[_Section], source: str | None = None) -> ConfigError:
    """One ConfigError for pydantic's errors: the first one in the order a reader checks the file.

    That order is: unknown keys of a mapping (alphabetically) before its values, values in field order,
    list items by index. A section's own checks (the validators) only run once its values are valid.
    """
    errors = exc.errors()

    def rank(error: Any) -> list[tuple[int, Any]]:
        ranks, cls, loc = [], root, error["loc"]
        for i, part in enumerate(loc):
            if i == len(loc) - 1 and error["type"] in ("extra_forbidden", "invalid_key"):
                ranks.append((0, str(part)))
            elif isinstance(part, int):
                ranks.append((1, part))
            else:
                ranks.append((1, list(cls.model_fields).index(part)))
                cls = _SECTIONS.get(part, cls)
        return ranks

    error = min(errors, key=rank)
    message = _message(error, root)
    return ConfigError(f"{source}: {message}" if source else message)


def _message(error: Any, root: type[_Section]) -> str:
    """The message for one pydantic error, naming its key path as ``methods[0].params``."""
    kind, loc, value = error["type"], error["loc"], error.get("input")
    if kind == "value_error":  # the sections' own checks, whose messages name their keys
        # ... relative to a list entry (methods[0]) when the section is one.
        listed = any(isinstance(part, int) for part in loc)
        return (f"{_key_path(loc)}: " if listed else "") + str(error["ctx"]["error"])
    if kind in ("extra_forbidden", "invalid_key"):
        cls = root
        for part in loc[:-1]:
            cls = _SECTIONS.get(part, cls) if isinstance(part, str) else cls
        return (f"unknown key {_key_path(loc[:-1] + (str(loc[-1]),))}; "
                f"allowed keys here: {', '.join(sorted(cls.model_fields))}")
    key = _key_path(loc)
    if kind == "missing":
        return f"missing required key {key}"
    if kind == "model_type":
        return f"{key or 'config'}: expected a mapping, got {type(value).__name__}"
    if kind in _EXPECTED:
        return f"{key}: expected {_EXPECTED[kind]}, got {value!r}"
    return f"{key or 'config'}: {error['msg']}"  # a kind the fields above cannot produce today


def _key_path(loc: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if i else p for i, p in enumerate(loc))


# --- loading --------------------------------------------------------------------------------------


def config_from_dict(data: Any, source: str = "<config>") -> RunConfig:
    """Build a RunConfig from plain data; every error names ``source`` and the key path."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, RunConfig, source) from None


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one
    silently, so a second ``seeds:`` further down a config would quietly replace the first).

    Each mapping is checked once, as written, before PyYAML splices the keys of its merges (``<<:``) in:
    a key that overrides a merged one is no duplicate, at any depth of merging."""

    def __init__(self, stream):
        super().__init__(stream)
        self._checked: set[int] = set()  # ids of the mappings checked (flatten_mapping meets some again)

    def flatten_mapping(self, node):
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # a merge; a list key gets YAML's own error
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise _DuplicateKey(None, None, f"the key {key!r} is given twice (first on line {seen[key]}); "
                                        "YAML would keep only the last one: remove one of them", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        super().flatten_mapping(node)


def load_config(path: str | Path) -> RunConfig:
    """Load a run config from a YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        if isinstance(exc, _DuplicateKey):
            raise ConfigError(f"{path}:{where}: {exc.problem}") from None
        raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return config_from_dict(data, str(path))


def preset_names() -> list[str]:
    """The names of the shipped presets, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> RunConfig:
    """Load a shipped preset (``paper``, ``smoke``)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return load_config(path)

"""``f2d``: Face2Diffusion on the run's base Stable Diffusion pipeline.

Per face (``prepare``, timed by the engine as Table 2's "Time"): MTCNN's five landmarks on the face-set
image, a similarity warp onto the ArcFace 112x112 template, RGB scaled to [-1, 1], the MSID encoder
(1536-d) and the mapping network (two word embeddings S1*, S2*). Per batch (``generate``): every prompt is
rendered with the subject "f l" and the two tokens are written over the "f" and "l" rows of the text
embeddings; the unconditional branch stays the empty prompt.

Params:
- ``weights``: ``official`` (the authors' ``msid.pt`` and ``mapping.pt``) or ``random`` (the same
  structure with seeded random weights: offline smoke runs, images not meaningful).
- ``msid``, ``mapping``: paths of the official files (``weights: official`` only).
- ``expression``: null (the learned ``null_exp``) or a ``.npy``/``.pt`` file with a 64-d expression feature.
- ``device``: where the encoders run; null follows the run's ``model.device``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from f2d_bench.devices import resolve_device
from f2d_bench.errors import ConfigError
from f2d_bench.faces.align import arcface_align
from f2d_bench.faces.choice import INPUT_FACE_RULE
from f2d_bench.faces.detect import FaceDetector
from f2d_bench.faces.imageio import read_image
from f2d_bench.files import weights_sha256
from f2d_bench.methods.base import GenerationRequest, MethodContext
from f2d_bench.methods.f2d.checkpoints import (
    CheckpointError,
    load_strict,
    missing_checkpoints_message,
    read_state_dict,
)
from f2d_bench.methods.f2d.expression import load_expression
from f2d_bench.methods.f2d.injection import SUBJECT, injected_tokens, placeholder_ids
from f2d_bench.methods.f2d.mapping import MappingNetwork
from f2d_bench.methods.f2d.msid import IMAGE_SIZE, MSIDEncoder
from f2d_bench.methods.stable_diffusion import StableDiffusionMethod

WEIGHTS = ("official", "random")
#: Seed of the random weights (``weights: random``); part of the method's identity.
RANDOM_SEED = 0
#: Names the face-input procedure in the identity, so that a change to it gives new method ids.
FACE_INPUT = f"mtcnn-5pt/{INPUT_FACE_RULE}-face/arcface-112/rgb-[-1,1]"


@dataclass(frozen=True, eq=False)
class F2DFace:
    """What ``prepare(face)`` returns.

    tokens: (2, text width) float32 on the CPU, S1* and S2*.
    landmarks: (5, 2) float64 MTCNN landmarks in face-image pixels (x, y), the ones the warp used.
    """

    tokens: torch.Tensor
    landmarks: np.ndarray


@dataclass(frozen=True)
class _Encoders:
    msid: MSIDEncoder
    mapping: MappingNetwork
    device: torch.device
    placeholder_ids: tuple[int, int]


def mapping_parameter_count(text_width: int) -> int:
    """Parameters of the mapping network for a text width: F2D's trained parameters (Table 2, #Params).

    2 MLPs x [Linear(1600,1536) + Linear(1536,1536) + Linear(1536,width)] + null_exp (64). For SD 1.4
    (width 768): 2 x (2,459,136 + 2,360,832 + 1,180,416) + 64 = 12,000,832, the paper's 1.20e7. The
    MSID encoder is pretrained separately and frozen, so Table 2 does not count it.
    """
    with torch.device("meta"):  # shapes only, no memory, no initialisation cost
        return sum(p.numel() for p in MappingNetwork(text_width).parameters())


def to_model_input(crops: np.ndarray) -> torch.Tensor:
    """(N, 112, 112, 3) uint8 RGB crops -> (N, 3, 112, 112) float32 in [-1, 1], as ``(x/255 - 0.5)/0.5``."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
    return (x / 255.0 - 0.5) / 0.5


class F2DMethod(StableDiffusionMethod):
    name = "f2d"
    summary = "Face2Diffusion: MSID identity encoder + mapping network, two injected word tokens"
    defaults: Mapping[str, Any] = {"weights": "official", "msid": None, "mapping": None, "expression": None,
                                   "device": None}

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        self.weights = self.params["weights"]
        if self.weights not in WEIGHTS:
            raise ConfigError(f"params.weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        self.checkpoints: dict[str, Path] = {}
        if self.weights == "official":
            problems = {}
            for param in ("msid", "mapping"):
                value = self.params[param]
                if not value:
                    problems[param] = "not set"
                elif not Path(value).expanduser().is_file():
                    problems[param] = f"no file at {Path(value).expanduser()}"
                else:
                    self.checkpoints[param] = Path(value).expanduser()
            if problems:
                raise ConfigError(missing_checkpoints_message(problems))
        else:
            given = [p for p in ("msid", "mapping") if self.params[p]]
            if given:
                raise ConfigError(
                    f"params.{given[0]} is not used with weights: random; remove it or set weights: official"
                )
        # Content hashes, not paths, identify the weights: the same files elsewhere give the same method id.
        self._checkpoint_sha256 = {param: weights_sha256(path) for param, path in self.checkpoints.items()}
        self.expression: torch.Tensor | None = None
        self._expression_sha256 = None
        if self.params["expression"] is not None:
            self.expression = load_expression(self.params["expression"])
            self._expression_sha256 = weights_sha256(Path(self.params["expression"]).expanduser())
        device = self.params["device"] if self.params["device"] is not None else context.config.model.device
        self.device = resolve_device(device)
        # On the CPU whatever the device: same landmarks on every machine, and MTCNN is fast enough.
        self.detector = FaceDetector()
        self._encoders: _Encoders | None = None

    # -- identity and facts ---------------------------------------------------------------------
    def identity(self) -> dict:
        ident = super().identity()
        params = dict(ident["params"])
        params.pop("device")  # float rounding only
        for param, digest in self._checkpoint_sha256.items():
            params[param] = {"sha256": digest}
        if self.weights == "random":
            params["random_seed"] = RANDOM_SEED
        if self._expression_sha256 is not None:
            params["expression"] = {"sha256": self._expression_sha256}
        ident["params"] = params
        ident["subject"] = SUBJECT
        ident["face_input"] = FACE_INPUT
        return ident

    def info(self) -> dict:
        width = self._text_width()
        with torch.device("meta"):
            msid_params = sum(p.numel() for p in MSIDEncoder().parameters())
        return {
            "trained_params": mapping_parameter_count(width),
            "weights": "official" if self.weights == "official" else "random weights: not meaningful",
            "frozen_params": {"msid_encoder": msid_params},
            "text_width": width,
            "checkpoints": {param: str(path) for param, path in self.checkpoints.items()},
            "expression": str(self.params["expression"]) if self.expression is not None else "null_exp",
        }

    def _text_width(self) -> int:
        return int(self.context.pipeline().text_encoder.config.hidden_size)

    # -- loading --------------------------------------------------------------------------------
    def _build(self, text_width: int) -> tuple[MSIDEncoder, MappingNetwork]:
        if self.weights == "random":
            # A private RNG stream: the same weights every time, and the caller's RNG state is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                return MSIDEncoder(), MappingNetwork(text_width)
        msid, mapping = MSIDEncoder(), MappingNetwork(text_width)
        load_strict(msid, read_state_dict(self.checkpoints["msid"], "MSID encoder"), "MSID encoder",
                    str(self.checkpoints["msid"]))
        state = read_state_dict(self.checkpoints["mapping"], "mapping network")
        out = state.get("i2t_first.fc_out.weight")
        if out is not None and out.ndim == 2 and out.shape[0] != text_width:
            raise CheckpointError(
                f"mapping network checkpoint {self.checkpoints['mapping']} makes {out.shape[0]}-d tokens, but "
                f"the text encoder of model {self.context.config.model.pretrained!r} is {text_width}-d "
                "(the official file is for Stable Diffusion 1.x, 768-d)"
            )
        load_strict(mapping, state, "mapping network", str(self.checkpoints["mapping"]))
        return msid, mapping

    def load(self) -> _Encoders:
        """Build (and for official weights strictly load) the encoders once; later calls return them."""
        if self._encoders is None:
            pipe = self.context.pipeline()
            msid, mapping = self._build(self._text_width())
            self._encoders = _Encoders(
                msid=msid.eval().to(self.device), mapping=mapping.eval().to(self.device), device=self.device,
                placeholder_ids=placeholder_ids(pipe.tokenizer),
            )
        return self._encoders

    def preflight(self, face_ids: Sequence[str], prompt_ids: Sequence[str], seeds: Sequence[int]) -> list[str]:
        """Load and warm up everything here, so that each face's recorded prepare time is its encoding only."""
        self.load()
        self.detector.detect(Image.new("RGB", (64, 64), (127, 127, 127)))  # builds MTCNN (no face found)
        self.encode_crops(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))  # first-call overheads
        if self.weights == "random":
            return ["f2d runs with random weights (weights: random): its images are not meaningful"]
        return []

    # -- work -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_crops(self, crops: np.ndarray) -> torch.Tensor:
        """(N, 112, 112, 3) uint8 RGB ArcFace crops -> (N, 2, text width) float32 CPU tokens S1*, S2*."""
        enc = self.load()
        x = to_model_input(crops).to(enc.device)
        expression = None if self.expression is None else self.expression.to(enc.device)
        tokens = enc.mapping(enc.msid(x), expression)
        return tokens.float().cpu()  # .cpu() also waits for the GPU, so the engine times the real work

    face_need = "F2D needs a visible face to encode"

    def prepare(self, face) -> F2DFace:
        """Detect the face (MTCNN; the one :data:`INPUT_FACE_RULE` chooses), warp it to the ArcFace 112
        template, encode it into two tokens."""
        image = read_image(face.path)
        # The identity scorers' input face (a reflection-padding ghost can be MTCNN's most probable face).
        landmarks = self.input_face(face, image).landmarks
        crop = arcface_align(image, landmarks, size=IMAGE_SIZE)
        return F2DFace(tokens=self.encode_crops(crop[None])[0], landmarks=landmarks)

    def prompt_text(self, request: GenerationRequest) -> str:
        return request.prompt.render(SUBJECT)

    @torch.inference_mode()
    def prompt_embeds(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """Text embeddings (batch, 77, width) with each request's own S1*, S2* injected."""
        enc = self.load()
        for r in requests:
            if not isinstance(r.prepared, F2DFace):
                raise RuntimeError(f"f2d: request {r.key.as_string()} has no prepared face tokens")
        pipe = self.context.pipeline()
        vectors = torch.stack([r.prepared.tokens for r in requests]).to(pipe.device)
        with injected_tokens(pipe.text_encoder, enc.placeholder_ids, vectors):
            return super().prompt_embeds(requests)

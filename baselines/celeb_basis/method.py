"""``celeb-basis``: CelebBasis (Yuan et al., NeurIPS 2023), two word vectors per face on a celebrity basis.

Tuning (per face): the face photo's CelebBasis crop and its mirror go once through the frozen IResNet-100
(``backbone.py``); their L2-normalised 512-d features feed a fresh face MLP (Linear 512 -> 2k with
``randn`` weights and zero bias, LeakyReLU 0.2, each k-vector L2-normalised), whose coefficients place the
two word vectors on the celebrity basis (``basis.py``). AdamW trains the MLP with the denoising loss for
``steps`` updates of ``batch_size`` samples: each sample is the photo at the UNet's training resolution,
mirrored with probability ``flip_p`` (the backbone sees the same mirror), captioned by a template with
``caption_subject`` ("face of <token> person"). An exponential moving average (``momentum``) of the
MLP's coefficients, started from ``randn``, is updated with every sample; it is what CelebBasis keeps
per identity (2 x 512 = 1024 numbers for SD 1.4, Table 2's #Params) and what renders the face.

Artifact: ``learned_embeds.safetensors`` (``{"<face_id>": (2, width)}``, diffusers'
``load_textual_inversion`` format, which expands it to the tokens ``<face_id>`` and ``<face_id>_1``) and
``coefficients.safetensors`` (``{"coefficients": (2, k)}``, the record). Rendering writes each face's two
vectors into the prompt's subject, ``subject`` ("<token> person"; faces share a batch). See README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.celeb_basis.backbone import (
    FEATURE_DIM, INPUT_SIZE, PUBLISHED as BACKBONE_PUBLISHED, IResNet, backbone_parameter_count, build_iresnet100,
    load_backbone, to_input,
)
from baselines.celeb_basis.basis import (
    N_TOKENS, NAMES_PUBLISHED, OFFICIAL_BASIS_SIZE, effective_basis_size, name_token_ids, pca_basis,
    random_token_columns, read_names, token_rows, word_vectors,
)
from f2d_bench.errors import ConfigError, F2DBenchError, ModelUnavailableError
from f2d_bench.faces.choice import INPUT_FACE_RULE
from f2d_bench.faces.detect import FaceDetector
from f2d_bench.files import weights_sha256
from f2d_bench.methods.base import MethodContext
from f2d_bench.methods.token_slots import token_embedding_module
from f2d_bench.methods.word_vectors import TOKEN, WordVectorMethod, WordVectors
from f2d_bench.tuning.diffusion import (
    DenoisingLoss, encode_posterior, encode_text, face_seed, frozen, needs_loss_scaling, optimise,
    training_pixels, training_resolution,
)
from f2d_bench.weights import require_file

ARTIFACT = "learned_embeds.safetensors"
COEFFICIENTS = "coefficients.safetensors"
RANDOM = "random"
#: Seed of the offline stand-ins (``backbone: random``, ``names: random``); part of the method's identity.
RANDOM_SEED = 0
#: Names the face-input procedure in the identity, so that a change to it gives new method ids.
FACE_INPUT = f"mtcnn-5pt/{INPUT_FACE_RULE}-face/celebbasis-112/rgb-[-1,1]/iresnet100/l2"
#: Captions of the training samples ("{}" is ``caption_subject``). Our own short list in the spirit of
#: the official templates (a deviation recorded in README.md).
TEMPLATES = ("a photo of a {}", "a close-up photo of a {}", "a cropped photo of a {}", "a good photo of a {}",
             "a bright photo of a {}")
LEAKY_SLOPE = 0.2


def token_name(face_id: str) -> str:
    """The token a face's vectors are saved under (diffusers adds ``<face_id>`` and ``<face_id>_1``)."""
    return f"<{face_id}>"


def coefficient_count(basis_size: int) -> int:
    """What is kept per face: 2 tokens x ``basis_size`` coefficients (1024 for SD 1.4)."""
    return N_TOKENS * int(basis_size)


def mlp_parameter_count(basis_size: int) -> int:
    """Trainable parameters of the face MLP: Linear(512, 2k) weight and bias (525,312 for k = 512)."""
    out = N_TOKENS * int(basis_size)
    return out * FEATURE_DIM + out


class FaceMLP(nn.Module):
    """CelebBasis's one-layer face MLP (an EqualLinear with ``lr_mul`` 1, then LeakyReLU 0.2).

    forward: unit face features (B, 512) -> coefficients (B, 2, k), each k-vector of unit length.
    ``generator`` draws the ``randn`` weights (the official initialisation); the bias starts at zero.
    """

    def __init__(self, basis_size: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.basis_size = int(basis_size)
        out = N_TOKENS * self.basis_size
        self.weight = nn.Parameter(torch.randn(out, FEATURE_DIM, generator=generator))
        self.bias = nn.Parameter(torch.zeros(out))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(F.linear(features, self.weight, self.bias), LEAKY_SLOPE)
        return F.normalize(x.view(-1, N_TOKENS, self.basis_size), dim=-1)


@dataclass(frozen=True, eq=False)
class Basis:
    """The celebrity basis of this method's names and text encoder.

    tensor: (2, 1 + size, width) float32 CPU (per token: mean, then ``size`` orthonormal directions).
    rows: rows per column the basis was computed from. source: "names file" or "random tokens".
    """

    tensor: torch.Tensor
    rows: tuple[int, ...]
    source: str

    @property
    def size(self) -> int:
        return int(self.tensor.shape[1]) - 1


@dataclass(eq=False)
class TuningStart:
    """A face's tuning before the first update: its seeded generator, the fresh MLP, the EMA coefficients
    (2, k) (``randn``, as the official ``id_coefficients``)."""

    generator: torch.Generator
    mlp: FaceMLP
    coefficients: torch.Tensor


class CelebBasisMethod(WordVectorMethod):
    name = "celeb-basis"
    summary = "CelebBasis (Yuan et al. 2023): face MLP to 2 x 512 coefficients on a celebrity-name basis"
    tunes = True
    tuning_reads_sampling = False  # no class images: sampling decides only the renders
    n_vectors = N_TOKENS
    # 02_start_test.sh: stable_txt2img.py with DDIM (eta 0), 50 steps, scale 10.0.
    native_sampling = {"scheduler": "DDIMScheduler", "num_inference_steps": 50, "guidance_scale": 10.0}
    defaults = {
        # Files the user supplies (or "random" for offline checks); see README.md for where they are published.
        "backbone": None,
        "names": None,
        "basis_size": OFFICIAL_BASIS_SIZE,
        # aigc_id.yaml: base lr 5e-3 scaled by the batch (2); 400 steps per identity (its README's rule).
        "steps": 400,
        "learning_rate": 5e-3,
        "scale_lr": True,
        "batch_size": 2,
        "momentum": 0.99,
        "flip_p": 0.5,
        "templates": list(TEMPLATES),
        "caption_subject": f"face of {TOKEN} person",
        "subject": f"{TOKEN} person",
        "seed": 0,
    }

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        p = self.params
        self.require_positive_ints("steps", "batch_size", "basis_size")
        if not isinstance(p["momentum"], (int, float)) or not 0.0 <= p["momentum"] < 1.0:
            raise ConfigError(f"param momentum must be a number in [0, 1), got {p['momentum']!r}")
        templates = p["templates"]
        if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise ConfigError("param templates must be a non-empty list of captions, each with one {}")
        caption = p["caption_subject"]
        if not isinstance(caption, str) or caption.count(TOKEN) != 1:
            raise ConfigError(f"param caption_subject {caption!r} must contain {TOKEN} exactly once")
        self.files = {key: self._file_param(key, what, published) for key, what, published in (
            ("backbone", "CelebBasis face-recognition backbone (arcface_torch IResNet-100)", BACKBONE_PUBLISHED),
            ("names", "CelebBasis celebrity names list", NAMES_PUBLISHED))}
        # Content hashes, not paths, identify the files: the same files elsewhere give the same method id.
        self._sha256 = {key: weights_sha256(path) for key, path in self.files.items() if path is not None}
        self._basis: Basis | None = None
        self._backbone: IResNet | None = None
        self._features: dict[tuple[str, str], torch.Tensor] = {}
        self.detector = FaceDetector()  # on the CPU: the same landmarks on every machine

    def _file_param(self, key: str, what: str, published: str) -> Path | None:
        """The file a param names (None for "random"); a missing one is a ConfigError saying where to get it."""
        value = self.params[key]
        if value == RANDOM:
            return None
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"param {key} must be a file path or {RANDOM!r}, got {value!r}")
        try:
            return require_file(value, what=what, published=published)
        except ModelUnavailableError as exc:
            raise ConfigError(f"params.{key}: {exc}") from None

    # -- identity and facts -----------------------------------------------------------------------------
    def identity(self) -> dict:
        ident = super().identity()
        params = dict(ident["params"])
        for key in self.files:
            params[key] = {"sha256": self._sha256[key]} if key in self._sha256 else {"random_seed": RANDOM_SEED}
        ident["params"] = params
        ident["face_input"] = FACE_INPUT
        return ident

    @property
    def random_parts(self) -> list[str]:
        return [key for key, path in self.files.items() if path is None]

    def info(self) -> dict:
        basis = self.basis()
        return {
            "trained_params": coefficient_count(basis.size),
            "weights": "random weights: not meaningful" if self.random_parts else "official",
            "mlp_params": mlp_parameter_count(basis.size),
            "basis": {"size": basis.size, "rows": list(basis.rows), "source": basis.source},
            "frozen_params": {"backbone": backbone_parameter_count()},
            "files": {key: str(path) for key, path in self.files.items() if path is not None},
        }

    def effective_learning_rate(self) -> float:
        p = self.params
        return float(p["learning_rate"]) * (p["batch_size"] if p["scale_lr"] else 1)

    def preflight(self, face_ids: Sequence[str], prompt_ids: Sequence[str], seeds: Sequence[int]) -> list[str]:
        if self.random_parts:
            given = " and ".join(f"{key}: random" for key in self.random_parts)
            return [f"celeb-basis runs with {given}: its images are not meaningful"]
        return []

    # -- the frozen parts -------------------------------------------------------------------------------
    def basis(self) -> Basis:
        """The celebrity basis (computed once: it depends only on the names and the text encoder)."""
        if self._basis is None:
            pipe = self.context.pipeline()
            table = token_embedding_module(pipe.text_encoder).weight
            if self.files["names"] is None:
                generator = torch.Generator("cpu").manual_seed(RANDOM_SEED)
                columns, source = random_token_columns(table.shape[0], generator), "random tokens"
            else:
                names = read_names(self.files["names"])
                columns, source = name_token_ids(pipe.tokenizer, names), "names file"
            rows = tuple(len(c) for c in columns)
            if min(rows) < 2:
                raise F2DBenchError(f"{self.files['names']}: {rows} names with a first and second token; a "
                                    "basis needs at least 2 in each column (the official list has 646 and 638)")
            size = effective_basis_size(self.params["basis_size"], rows, table.shape[1])
            self._basis = Basis(pca_basis(token_rows(table, columns), size), rows, source)
        return self._basis

    def backbone(self) -> IResNet:
        """The frozen IResNet-100 (built or loaded once), on the pipeline's device."""
        if self._backbone is None:
            if self.files["backbone"] is None:
                # A private RNG stream: the same weights every time, and the caller's RNG state is untouched.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(RANDOM_SEED)
                    model = build_iresnet100()
            else:
                model = load_backbone(self.files["backbone"])
            model.requires_grad_(False)
            self._backbone = model.to(self.context.pipeline().device).eval()
        return self._backbone

    face_need = "its face MLP needs a visible face"

    @torch.no_grad()
    def face_features(self, face) -> torch.Tensor:
        """(2, 512) float32 CPU: unit backbone features of the face's CelebBasis crop and of its mirror
        (computed once per face). The crop is the official one: MTCNN's five landmarks warped onto
        ``CELEBBASIS_TEMPLATE_112`` (CelebBasis's FFHQ-512 alignment and fixed affine, composed)."""
        from f2d_bench.faces.imageio import read_image
        from f2d_bench.scorers.identity.crops import warp_to_template
        from f2d_bench.scorers.identity.sphereface import CELEBBASIS_TEMPLATE_112

        key = (face.face_id, str(face.path))
        if key not in self._features:
            image = read_image(face.path)
            chosen = self.input_face(face, image)  # the scorers' face too
            crop = warp_to_template(image, chosen.landmarks, CELEBBASIS_TEMPLATE_112, (INPUT_SIZE, INPUT_SIZE))
            model = self.backbone()
            features = model(to_input(np.stack([crop, crop[:, ::-1]])).to(model.fc.weight.device))
            self._features[key] = F.normalize(features.float(), dim=-1).cpu()
        return self._features[key]

    # -- tuning -----------------------------------------------------------------------------------------
    def start(self, face) -> TuningStart:
        """The face's seeded generator, fresh MLP and initial EMA coefficients, drawn in this order."""
        size = self.basis().size
        generator = torch.Generator("cpu").manual_seed(face_seed(self.params["seed"], face.face_id))
        mlp = FaceMLP(size, generator)
        return TuningStart(generator, mlp, torch.randn((N_TOKENS, size), generator=generator))

    def caption_text(self, template: str) -> str:
        return template.format(self.params["caption_subject"].replace(TOKEN, self.slot_text))

    def tune(self, face, work_dir: Path) -> dict:
        from safetensors.torch import save_file

        pipe = self.context.pipeline()
        p = self.params
        basis = self.basis().tensor
        features = self.face_features(face)
        state = self.start(face)
        generator, mlp, ema = state.generator, state.mlp, state.coefficients
        loss_of = DenoisingLoss(pipe, generator)
        posterior = encode_posterior(pipe.vae, training_pixels(face.path, training_resolution(pipe)))
        templates = list(p["templates"])
        momentum = float(p["momentum"])

        def loss() -> torch.Tensor:
            b = p["batch_size"]
            # One mirror draw per sample, shared by the image the UNet sees and the crop the MLP sees.
            flips = (torch.rand(b, generator=generator) < p["flip_p"]).long()
            latents = torch.cat([posterior.sample(1, generator, float(f)) for f in flips.tolist()])
            coefficients = mlp(features[flips])  # (b, 2, k)
            picks = torch.randint(0, len(templates), (b,), generator=generator).tolist()
            with self.written(word_vectors(basis, coefficients)):
                text = encode_text(pipe, [self.caption_text(templates[i]) for i in picks])
            for row in coefficients.detach():  # the official EMA takes every sample in turn
                ema.mul_(momentum).add_(row, alpha=1.0 - momentum)
            return loss_of(pipe.unet, latents, text)

        with frozen(pipe.unet, pipe.vae, pipe.text_encoder), torch.enable_grad():
            losses = optimise(mlp.parameters(), steps=p["steps"], learning_rate=self.effective_learning_rate(),
                              accumulation=1, loss=loss, loss_scaling=needs_loss_scaling(pipe))
        vectors = word_vectors(basis, ema[None])[0]
        save_file({token_name(face.face_id): vectors.contiguous()}, str(work_dir / ARTIFACT))
        save_file({"coefficients": ema.contiguous()}, str(work_dir / COEFFICIENTS))
        return {"trained_params": ema.numel(), "steps": p["steps"], "losses": losses,
                "learning_rate": self.effective_learning_rate(), "loss_scaling": needs_loss_scaling(pipe),
                "mlp_params": mlp_parameter_count(mlp.basis_size), "basis_size": mlp.basis_size,
                "ema_updates": p["steps"] * p["batch_size"]}

    def load_tuned(self, face, artifact_dir: Path) -> WordVectors:
        from safetensors.torch import load_file

        path = artifact_dir / ARTIFACT
        tensors = load_file(str(path))
        width = int(token_embedding_module(self.context.pipeline().text_encoder).weight.shape[1])
        name = token_name(face.face_id)
        if set(tensors) != {name} or tuple(tensors[name].shape) != (N_TOKENS, width):
            found = {k: tuple(v.shape) for k, v in tensors.items()}
            raise F2DBenchError(f"{path}: expected one tensor {name!r} of shape ({N_TOKENS}, {width}), found "
                                f"{found}; delete the folder to tune the face again")
        return WordVectors(tensors[name].float())

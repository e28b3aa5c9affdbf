"""AdaFace (Kim et al., CVPR 2022): the IR backbones of ``mk-minchul/AdaFace`` ``net.py``, re-written.

Architecture (``build_model('ir_101')`` etc.): a 3x3 conv stem (64 channels, BN, PReLU) at 112x112; four
stages of "improved residual" units (BN, conv3x3, BN, PReLU, conv3x3 with the stage's stride, BN, plus a
shortcut that is a 1x1 max-pool when the width is unchanged and a strided 1x1 conv + BN otherwise), widths
64/128/256/512, each stage halving the resolution (112 -> 7); then BN2d, dropout 0.4, flatten,
Linear(512*7*7, 512), BatchNorm1d(512, affine=False). ``forward`` returns ``(embedding / ||embedding||,
||embedding||)``: (N, 512) unit vectors and (N, 1) norms (AdaFace's image-quality proxy).

Units per stage: IR-18 (2,2,2,2), IR-34 (3,4,6,3), IR-50 (3,4,14,3), IR-101 (3,13,30,3).
Learnable parameters: IR-18 24,020,352; IR-34 34,134,080; IR-50 43,585,600; IR-101 65,150,912.

Input: the ArcFace 112x112 template warp from the 5 landmarks, **BGR**, ``((x / 255) - 0.5) / 0.5``
(range -1..1). The official README stresses that its models take BGR, unlike InsightFace's.

Weight files (strict):
- ``layout="lightning"`` (the official ``adaface_ir{18,50,101}_*.ckpt``, Google Drive links in the
  AdaFace README): a PyTorch Lightning checkpoint; ``ckpt["state_dict"]`` holds ``model.<backbone key>``
  (plus ``head.kernel``, the margin head, which is not used); keys starting ``model.`` are kept, the
  prefix stripped. Lightning pickles hyper-parameters besides tensors; they are read as inert records
  (``weights.LIGHTNING_METADATA``) by torch's tensors-only unpickler, and a file asking for any other
  global is refused without running it.
- ``layout="cvlface"`` (CVLface's Hugging Face copies, e.g. ``minchul/cvlface_adaface_ir101_webface12m``,
  file ``pretrained_model/model.pt``): a plain state dict with ``net.<backbone key>``; keys starting
  ``net.`` are kept. These models were trained on **RGB** input and return an unnormalised embedding;
  the loaded model records ``input_color = "rgb"`` and :func:`embed_batch` follows it (the L2
  normalisation applied here gives the same direction). The key layout of that repository was read from
  public code that loads it, not checked against the file itself.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from f2d_bench.faces.align import arcface_align
from f2d_bench.scorers.identity import model_device
from f2d_bench.scorers.identity.crops import l2_normalise, landmarks_of, stack_crops
from f2d_bench.weights import LIGHTNING_METADATA, WeightsLayoutError, load_checked, read_torch_file, require_file

#: Units per stage, keyed by the name ``build_model`` takes in the official code.
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "ir_18": (2, 2, 2, 2),
    "ir_34": (3, 4, 6, 3),
    "ir_50": (3, 4, 14, 3),
    "ir_101": (3, 13, 30, 3),
}
_WIDTHS = (64, 128, 256, 512)
INPUT_SIZE = 112  # pixels, square
EMBEDDING_DIM = 512

#: Prefix of the backbone's keys in each supported file layout, and the colour order that model takes.
LAYOUTS: dict[str, tuple[str, str]] = {"lightning": ("model.", "bgr"), "cvlface": ("net.", "rgb")}

PUBLISHED = (
    "The official AdaFace checkpoints (adaface_ir101_webface12m.ckpt, adaface_ir101_webface4m.ckpt, "
    "adaface_ir101_ms1mv2.ckpt, adaface_ir101_ms1mv3.ckpt, adaface_ir50_ms1mv2.ckpt, ...) are linked "
    "(Google Drive) from the 'Pretrained Models' table of https://github.com/mk-minchul/AdaFace ; CVLface "
    "copies are on Hugging Face (e.g. minchul/cvlface_adaface_ir101_webface12m, "
    "pretrained_model/model.pt, layout='cvlface')."
)


class _IRUnit(nn.Module):
    """One improved-residual unit; key names follow the official ``BasicBlockIR``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        if c_in == c_out:
            # a 1x1 max-pool with stride: plain subsampling, no parameters
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.PReLU(c_out),
            nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIResNet(nn.Module):
    """AdaFace's IR backbone for 112x112 input. ``forward(x)``: x (N, 3, 112, 112) in -1..1, colour
    order ``input_color``; returns ((N, 512) unit embeddings, (N, 1) norms)."""

    def __init__(self, arch: str = "ir_101") -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown AdaFace architecture {arch!r}; known: {', '.join(ARCHS)}")
        self.arch = arch
        #: colour order of the input tensor the weights were trained on ("bgr" for the official .ckpt)
        self.input_color = "bgr"
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        # registered before the body, so that state_dict() lists keys in the official file's order
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, EMBEDDING_DIM),
            nn.BatchNorm1d(EMBEDDING_DIM, affine=False),
        )
        units = []
        c_in = 64
        for width, count in zip(_WIDTHS, ARCHS[arch]):
            # the first unit of every stage (the first stage too) halves the resolution
            units.append(_IRUnit(c_in, width, 2))
            units += [_IRUnit(width, width, 1) for _ in range(count - 1)]
            c_in = width
        self.body = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.output_layer(self.body(self.input_layer(x)))
        norm = torch.norm(x, 2, 1, True)
        return x / norm, norm


def build_model(arch: str = "ir_101") -> AdaFaceIResNet:
    """The architecture with freshly initialised weights (PyTorch defaults), in eval mode."""
    return AdaFaceIResNet(arch).eval()


def infer_arch(backbone_state) -> str | None:
    """The architecture whose unit count matches the ``body.N.`` keys of a backbone state dict, if any."""
    units = {
        int(k.split(".")[1]) for k in backbone_state if k.startswith("body.") and k.split(".")[1].isdigit()
    }
    count = max(units) + 1 if units else 0
    for name, stages in ARCHS.items():
        if sum(stages) == count:
            return name
    return None


def load_adaface(path, arch: str = "ir_101", layout: str = "lightning", device="cpu") -> AdaFaceIResNet:
    """Load an AdaFace backbone from a weight file in an official layout (see the module docstring).

    path: the ``.ckpt`` (layout "lightning") or CVLface ``model.pt`` (layout "cvlface") the user names.
    arch: "ir_101" (default, the paper's), "ir_50", "ir_34" or "ir_18".
    Returns the model in eval mode on ``device``, with ``input_color`` set for the layout.
    Raises ModelUnavailableError for a missing file, WeightsLayoutError for a file of another layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown AdaFace file layout {layout!r}; known: {', '.join(LAYOUTS)}")
    prefix, color = LAYOUTS[layout]
    file = require_file(path, what=f"AdaFace {arch} checkpoint", published=PUBLISHED)
    # Lightning pickles hyper-parameters beside the tensors: read as inert records, never run.
    raw = read_torch_file(file, metadata=LIGHTNING_METADATA)
    if layout == "lightning":
        if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
            found = sorted(raw)[:5] if isinstance(raw, dict) else type(raw).__name__
            raise WeightsLayoutError(
                f"{str(file)!r} is not an AdaFace Lightning checkpoint: it has no 'state_dict' entry "
                f"(top level: {found}). A CVLface model.pt needs layout='cvlface'."
            )
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise WeightsLayoutError(f"{str(file)!r}: expected a state dict, got {type(raw).__name__}")
    state = {k[len(prefix) :]: v for k, v in raw.items() if isinstance(k, str) and k.startswith(prefix)}
    if not state:
        raise WeightsLayoutError(
            f"{str(file)!r} has no keys starting with {prefix!r} (layout {layout!r}); first keys: "
            f"{sorted(map(str, raw))[:5]}"
        )
    model = AdaFaceIResNet(arch)
    model.input_color = color
    source = f"{str(file)!r} (keys {prefix}*, layout {layout!r})"
    try:
        load_checked(model, state, source=source)
    except WeightsLayoutError as exc:
        guess = infer_arch(state)
        if guess is not None and guess != arch:
            raise WeightsLayoutError(f"{exc}. The file looks like arch={guess!r}.") from exc
        raise
    return model.to(device).eval()


def crop_adaface(image, detection_or_landmarks) -> np.ndarray:
    """The ArcFace-template 112x112 crop, RGB uint8 (112, 112, 3)."""
    return arcface_align(image, landmarks_of(detection_or_landmarks), size=INPUT_SIZE)


def preprocess(crops, color: str = "bgr") -> torch.Tensor:
    """(N, 112, 112, 3) RGB uint8 crops -> (N, 3, 112, 112) float32 in -1..1, channels in ``color`` order."""
    batch = stack_crops(crops, INPUT_SIZE, INPUT_SIZE)
    if color == "bgr":
        batch = batch[..., ::-1]
    elif color != "rgb":
        raise ValueError(f"color must be 'bgr' or 'rgb', got {color!r}")
    pixels = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return (pixels / 255.0 - 0.5) / 0.5


@torch.inference_mode()
def embed_batch(model: AdaFaceIResNet, crops, color: str | None = None, return_norms: bool = False):
    """Embeddings of 112x112 RGB crops (from :func:`crop_adaface`): (N, 512) float32, unit rows.

    color: channel order fed to the network; default the model's ``input_color`` ("bgr" for the
    official checkpoints). return_norms: also return the (N,) pre-normalisation norms.
    """
    tensor = preprocess(crops, color or getattr(model, "input_color", "bgr")).to(model_device(model))
    embedding, norm = model(tensor)
    vectors = l2_normalise(embedding.float().cpu().numpy())
    if return_norms:
        return vectors, norm.float().cpu().numpy().reshape(-1)
    return vectors


def embed_adaface(
    model: AdaFaceIResNet, image, detection_or_landmarks, color: str | None = None
) -> np.ndarray:
    """The (512,) float32 unit embedding of the face with these landmarks in ``image`` (PIL, any mode)."""
    return embed_batch(model, [crop_adaface(image, detection_or_landmarks)], color=color)[0]

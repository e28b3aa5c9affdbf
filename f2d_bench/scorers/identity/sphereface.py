"""SphereFace-family 20-layer networks, in the variants public evaluations use (PROTOCOL.md section 5).

There is no single standard "SphereFace" scorer, so the variant is a choice, recorded by name
(``VARIANTS``, ``DEFAULT_VARIANT``). Each variant fixes the architecture, the weight file, the crop
template and size, the colour order and the normalisation:

``cosface-sphere20-112`` (default)
    The sphere20 of ``MuggleWang/CosFace_pytorch`` (``net.sphere``, trained with the CosFace loss)
    widened to 112x112 input (``fc`` is Linear(512*7*7, 512) instead of 512*7*6), as CelebBasis's
    evaluation (``evaluation/face_align/cosface/net.py``) builds it for
    ``net_sphere20_data_vggface2_acc_9955.pth``. Default because a published personalization evaluation
    (CelebBasis; ReliableSwap uses the same file) scored identity with exactly these weights, so its
    numbers are the nearest published reference for "SphereFace" here. Input RGB,
    ``(x / 255 - 0.5) / 0.5``. Crop: CelebBasis aligns the face to an FFHQ-like 512 template, warps that
    with a fixed matrix ("align to insightface") and resizes to 112; composed, that puts the five
    landmarks at :data:`CELEBBASIS_TEMPLATE_112` (eyes about 25 px apart, a looser crop than ArcFace's
    35 px). Crop mode ``celebbasis`` (below) reproduces that chain; ``warp`` goes there in one step. The file is a plain state dict
    (``torch.save(model.state_dict())``, no ``module.`` prefix): ``layer{1..4}.*``, ``fc.*``.
``cosface-sphere20-112-arcface``
    The same network and file, fed the standard ArcFace 112x112 template crop (for comparison with the
    other identity models, which all see that crop or a box crop).
``sphere20a-112x96``
    The original SphereFace (A-Softmax) sphere20a of ``clcarwin/sphereface_pytorch``
    (``sphere20a_20171020.pth``, CASIA-WebFace, LFW 99.22%): 112 high x 96 wide, **BGR**
    ``(x - 127.5) / 128``, template :data:`SPHEREFACE_TEMPLATE_96x112` (the ArcFace points 8 px to the
    left). The file is a plain state dict with flat keys ``conv1_1.*``, ``relu1_1.weight``, ...,
    ``fc5.*`` and the A-Softmax classifier ``fc6.weight`` [512, 10574], which is checked and dropped.

Crop modes (``CROP_MODES``; the scorer's ``crop`` setting, default the variant's own):

``celebbasis`` (the default of ``cosface-sphere20-112``)
    CelebBasis's evaluation chain (``evaluation/clip_eval.py``, ``IdentityEvaluator``) step by step, on the
    harness's MTCNN landmarks: uint8 truncation of the [-1, 1] image, a warp onto its 512 "ffhq" template
    with a black border, normalisation to [-1, 1], ``grid_sample`` with its fixed matrix and zero padding
    (a 4-6 px frame of mid-gray, about 16% of the 112 input), a bilinear resize to 112. Default because
    this variant exists to reproduce the one published personalization evaluation that used these
    weights, and the paper does not say how its SphereFace was run (PROTOCOL.md section 5): the one-step
    warp puts the landmarks at the same place (within 0.07 px) but fills that frame with image content,
    which changes the scores (tests/test_peer_conventions.py: the ``celebbasis`` mode equals a re-typed
    CelebBasis chain to 1e-6 on the shipped photos; ``warp`` does not).
``warp``
    One similarity warp of the photo onto the variant's template at its input size, bilinear, black
    outside the photo; then ``(x - mean) / std``. The default of the other variants.

``sfnet20-112``
    opensphere's SFNet-20 (``ydwen/opensphere``, ``model/backbone/sfnet_deprecated.py``, the backbone of
    its VGGFace2 SFNet-20 configurations, ``type: sfnet20_deprecated``): four stages of a stride-2 conv
    with bias and ReLU, then 1, 2, 4, 1 residual units ``x + ReLU(conv2(ReLU(conv1(x))))`` (the ReLU
    before the sum), ``fc`` Linear(512*7*7, 512); no BatchNorm. Input: opensphere's 112x112 aligned faces
    (the ArcFace 5-point template), RGB, ``(x - 127.5) / 127.5``. Checkpoint layout: the trainer saves
    ``backbone_<iter>.pth`` from its DistributedDataParallel wrapper, so every key carries a ``module.``
    prefix (``module.layer1.0.conv.weight``, ..., ``module.fc.bias``); it is required and stripped.
    (opensphere's own tests add the embedding of the horizontally flipped crop; this variant does not.)

Every variant's embedding is the 512-d ``fc``/``fc5`` output, L2-normalised (both reference evaluations
compare by cosine). Learnable parameters: CosFace sphere20 at 112x112 24,501,952; sphere20a 22,670,656
without its classifier (28,084,544 with ``fc6``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from f2d_bench.faces.align import ARCFACE_TEMPLATE_112, similarity_transform
from f2d_bench.scorers.identity import model_device
from f2d_bench.scorers.identity.crops import l2_normalise, landmarks_of, rgb_array, stack_crops, warp_to_template
from f2d_bench.weights import WeightsLayoutError, load_checked, read_torch_file, require_file

EMBEDDING_DIM = 512


# --- templates -----------------------------------------------------------------------------------------
#: clcarwin/sphereface_pytorch's 96x112 (width x height) template (``alignment`` in lfw_eval.py).
SPHEREFACE_TEMPLATE_96x112 = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]]
)
SPHEREFACE_TEMPLATE_96x112.setflags(write=False)

# CelebBasis's two published constants: the 512x512 "ffhq" template of its norm_crop (PIPNet
# alignment.py) and the affine_grid matrix (normalised coordinates, align_corners=True) it applies after.
_CELEBBASIS_FFHQ_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ]
)
_CELEBBASIS_THETA = np.array(
    [[1.07695457, -0.03625215, -1.56352194 / 512], [0.03625215, 1.07695457, -5.32134629 / 512]]
)


def _celebbasis_template() -> np.ndarray:
    """Where CelebBasis's crop chain puts the five landmarks in its 112x112 network input.

    affine_grid samples the input at ``theta @ [u, 1]`` for an output position u (both normalised to
    -1..1 at pixel centres 0 and size-1), so a landmark at input position p lands at
    ``u = A^-1 (p - t)``; the 512 -> 112 resize (align_corners=True) then scales pixel centres by 111/511.
    """
    a, t = _CELEBBASIS_THETA[:, :2], _CELEBBASIS_THETA[:, 2]
    p = _CELEBBASIS_FFHQ_512 / 511.0 * 2.0 - 1.0
    u = (np.linalg.inv(a) @ (p - t).T).T
    return (u + 1.0) / 2.0 * 111.0


#: The 5 landmarks' (x, y) positions in CelebBasis's 112x112 SphereFace input, derived above
#: (about (43.0, 53.3), (68.3, 52.5), (56.3, 67.8), (45.5, 79.8), (68.1, 78.9)).
CELEBBASIS_TEMPLATE_112 = _celebbasis_template()
CELEBBASIS_TEMPLATE_112.setflags(write=False)


# --- architectures -------------------------------------------------------------------------------------
class _Residual(nn.Module):
    """x + PReLU(conv(PReLU(conv(x)))), the CosFace_pytorch ``Block`` (convs without bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.prelu1 = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.prelu2 = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.prelu2(self.conv2(self.prelu1(self.conv1(x))))


#: Residual units per stage; each stage starts with a stride-2 conv (with bias) and a PReLU.
_SPHERE_UNITS = {20: (1, 2, 4, 1), 64: (3, 7, 16, 3)}
_SPHERE_WIDTHS = (64, 128, 256, 512)


class CosFaceSphere(nn.Module):
    """CosFace_pytorch's ``sphere``: x (N, 3, 112, W) -> (N, 512) unnormalised; W = ``input_width``."""

    def __init__(self, depth: int = 20, input_width: int = 112) -> None:
        super().__init__()
        if depth not in _SPHERE_UNITS:
            raise ValueError(f"sphere depth must be 20 or 64, got {depth}")
        if input_width not in (96, 112):
            raise ValueError(
                f"input width must be 112 (CelebBasis) or 96 (CosFace_pytorch), got {input_width}"
            )
        c_in = 3
        for index, (width, count) in enumerate(zip(_SPHERE_WIDTHS, _SPHERE_UNITS[depth]), start=1):
            stage = [nn.Conv2d(c_in, width, 3, 2, 1), nn.PReLU(width)] + [
                _Residual(width) for _ in range(count)
            ]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            c_in = width
        # four stride-2 stages: 112 -> 7 rows, 112 -> 7 or 96 -> 6 columns
        self.fc = nn.Linear(512 * 7 * (input_width // 16), EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.flatten(1))


class Sphere20a(nn.Module):
    """clcarwin's ``sphere20a`` feature trunk: x (N, 3, 112, 96) -> (N, 512) ``fc5`` output.

    Flat key names as in the official file: stage s starts with ``conv{s}_1``/``relu{s}_1`` (stride 2),
    then residual pairs ``conv{s}_{2k}``, ``conv{s}_{2k+1}`` (each conv with bias, each followed by its
    PReLU ``relu{s}_{j}``), pairs per stage 1, 2, 4, 1.
    """

    _PAIRS = (1, 2, 4, 1)

    def __init__(self) -> None:
        super().__init__()
        c_in = 3
        for stage, (width, pairs) in enumerate(zip(_SPHERE_WIDTHS, self._PAIRS), start=1):
            for j in range(1, 2 * pairs + 2):
                self.add_module(
                    f"conv{stage}_{j}", nn.Conv2d(c_in if j == 1 else width, width, 3, 2 if j == 1 else 1, 1)
                )
                self.add_module(f"relu{stage}_{j}", nn.PReLU(width))
            c_in = width
        self.fc5 = nn.Linear(512 * 7 * 6, EMBEDDING_DIM)

    def _unit(self, x: torch.Tensor, stage: int, j: int) -> torch.Tensor:
        return getattr(self, f"relu{stage}_{j}")(getattr(self, f"conv{stage}_{j}")(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage, pairs in enumerate(self._PAIRS, start=1):
            x = self._unit(x, stage, 1)
            for k in range(pairs):
                x = x + self._unit(self._unit(x, stage, 2 * k + 2), stage, 2 * k + 3)
        return self.fc5(x.flatten(1))


class _SFConvBlock(nn.Module):
    """opensphere's ``ConvBlock``: a 3x3 conv with bias (stride ``stride``) and a ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=True)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class _SFBasicBlock(nn.Module):
    """opensphere's deprecated ``BasicBlock``: x + ReLU(conv2(ReLU(conv1(x)))), convs with bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=True)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=True)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x)))) + x


class SFNet20(nn.Module):
    """opensphere's SFNet-20 (``sfnet20_deprecated``): x (N, 3, 112, 112) -> (N, 512) unnormalised."""

    _UNITS = (1, 2, 4, 1)

    def __init__(self) -> None:
        super().__init__()
        c_in = 3
        for index, (width, units) in enumerate(zip(_SPHERE_WIDTHS, self._UNITS), start=1):
            stage = [_SFConvBlock(c_in, width, 2)] + [_SFBasicBlock(width) for _ in range(units)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            c_in = width
        self.fc = nn.Linear(512 * 7 * 7, EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.flatten(1))


# --- variants ------------------------------------------------------------------------------------------
_NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "cosface-sphere20-112x112": lambda: CosFaceSphere(20, 112),
    "sphere20a-112x96": Sphere20a,
    "sfnet20-112x112": SFNet20,
}


@dataclass(frozen=True)
class SphereVariant:
    """Everything that makes a SphereFace score reproducible: network, weights, crop, normalisation.

    width, height: crop size in pixels; template: 5x2 landmark positions in that crop; color: channel
    order fed to the network; network: a key of ``_NETWORKS`` (variants sharing it share weights);
    mean, std: ``(x - mean) / std`` on 0..255 pixels; weights_file: the official file name;
    optional_keys: keys of that file the embedding does not use, with their shape (None: any size).
    """

    name: str
    description: str
    network: str
    width: int
    height: int
    template: np.ndarray = field(repr=False)
    color: str
    mean: float
    std: float
    weights_file: str
    published: str
    optional_keys: dict = field(default_factory=dict)
    #: The crop mode used when none is named (``CROP_MODES``).
    crop: str = "warp"
    #: A prefix every key of the official file carries (a training wrapper's), required and stripped.
    key_prefix: str = ""

    def build(self) -> nn.Module:
        """The variant's network with fresh weights."""
        return _NETWORKS[self.network]()


_CELEBBASIS_PUBLISHED = (
    "net_sphere20_data_vggface2_acc_9955.pth (sphere20 of https://github.com/MuggleWang/CosFace_pytorch "
    "at 112x112) is distributed with CelebBasis's evaluation (https://github.com/ygtxr1997/CelebBasis, "
    "README 'Download pretrained weights') and ReliableSwap's third-party weights "
    "(weights/third_party/cosface/)."
)

_CELEBBASIS = SphereVariant(
    name="cosface-sphere20-112",
    description="CosFace-trained sphere20, 112x112, CelebBasis's crop and weights (VGGFace2)",
    network="cosface-sphere20-112x112",
    width=112,
    height=112,
    template=CELEBBASIS_TEMPLATE_112,
    color="rgb",
    mean=127.5,
    std=127.5,
    weights_file="net_sphere20_data_vggface2_acc_9955.pth",
    published=_CELEBBASIS_PUBLISHED,
    crop="celebbasis",
)

VARIANTS: dict[str, SphereVariant] = {
    _CELEBBASIS.name: _CELEBBASIS,
    # The same network and weights on the ArcFace template crop instead of CelebBasis's.
    "cosface-sphere20-112-arcface": replace(
        _CELEBBASIS,
        name="cosface-sphere20-112-arcface",
        description="CosFace-trained sphere20, 112x112, CelebBasis's weights on the ArcFace template crop",
        template=ARCFACE_TEMPLATE_112,
        crop="warp",
    ),
    "sphere20a-112x96": SphereVariant(
        name="sphere20a-112x96",
        description="SphereFace sphere20a (A-Softmax, CASIA-WebFace), 112x96 BGR, clcarwin's weights",
        network="sphere20a-112x96",
        width=96,
        height=112,
        template=SPHEREFACE_TEMPLATE_96x112,
        color="bgr",
        mean=127.5,
        std=128.0,
        weights_file="sphere20a_20171020.pth",
        published=(
            "sphere20a_20171020.pth is inside model/sphere20a_20171020.7z of "
            "https://github.com/clcarwin/sphereface_pytorch (extract it with 7z)."
        ),
        optional_keys={"fc6.weight": (EMBEDDING_DIM, None)},  # A-Softmax classifier, (512, classes)
    ),
    "sfnet20-112": SphereVariant(
        name="sfnet20-112",
        description="opensphere SFNet-20 (sfnet20_deprecated), 112x112 RGB, ArcFace template crop",
        network="sfnet20-112x112",
        width=112,
        height=112,
        template=ARCFACE_TEMPLATE_112,
        color="rgb",
        mean=127.5,
        std=127.5,
        weights_file="backbone_<iter>.pth",
        published=(
            "opensphere (https://github.com/ydwen/opensphere) links its trained SFNet-20 projects from its "
            "README; the backbone file is <project>/models/backbone_<iter>.pth (keys prefixed 'module.')."
        ),
        key_prefix="module.",
    ),
}

#: The variant used when none is named (see the module docstring for why).
DEFAULT_VARIANT = "cosface-sphere20-112"
#: How a face becomes the network input: ``warp`` (one similarity warp onto the variant's template, then
#: ``(x - mean) / std``) or ``celebbasis`` (CelebBasis's evaluation chain, :func:`celebbasis_input`).
CROP_MODES = ("warp", "celebbasis")


def get_variant(variant: str | SphereVariant | None = None) -> SphereVariant:
    """The SphereVariant of a name (None: the default)."""
    if isinstance(variant, SphereVariant):
        return variant
    name = DEFAULT_VARIANT if variant is None else str(variant)
    if name not in VARIANTS:
        raise ValueError(f"unknown SphereFace variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def build_sphereface(variant: str | None = None) -> nn.Module:
    """The variant's network with fresh weights, in eval mode; ``model.variant`` holds the variant name."""
    spec = get_variant(variant)
    model = spec.build()
    model.variant = spec.name
    return model.eval()


def load_sphereface(path, variant: str | None = None, device="cpu") -> nn.Module:
    """Load the variant's official weight file (a plain state dict, see the module docstring) strictly.

    Returns the model in eval mode on ``device``, ``model.variant`` set. Raises ModelUnavailableError for
    a missing file and WeightsLayoutError for another layout (missing/extra keys, a ``module.`` prefix,
    a whole pickled module, the 112x96 ``fc`` in a 112x112 variant, ...).
    """
    spec = get_variant(variant)
    file = require_file(
        path, what=f"SphereFace ({spec.name}) weights {spec.weights_file}", published=spec.published
    )
    state = read_torch_file(file)  # a plain state dict; a pickled module is refused unread
    if spec.key_prefix:
        plain = [k for k in state if not str(k).startswith(spec.key_prefix)]
        if plain:
            raise WeightsLayoutError(
                f"{str(file)!r} (SphereFace variant {spec.name!r}): every key must carry the prefix "
                f"{spec.key_prefix!r} of the file the trainer saves; {len(plain)} do not, e.g. "
                f"{', '.join(map(str, plain[:3]))}")
        state = {str(k)[len(spec.key_prefix):]: v for k, v in state.items()}
    model = build_sphereface(spec.name)
    load_checked(
        model, state, source=f"{str(file)!r} (SphereFace variant {spec.name!r})", optional=spec.optional_keys
    )
    return model.to(device).eval()


def crop_sphereface(image, detection_or_landmarks, variant: str | None = None) -> np.ndarray:
    """The variant's template crop in one warp (crop mode ``warp``): (height, width, 3) uint8 RGB."""
    spec = get_variant(variant)
    return warp_to_template(
        image, landmarks_of(detection_or_landmarks), spec.template, (spec.width, spec.height)
    )


def preprocess(crops, variant: str | None = None) -> torch.Tensor:
    """RGB uint8 crops -> (N, 3, height, width) float32 ``(x - mean) / std``, variant's channel order."""
    spec = get_variant(variant)
    batch = stack_crops(crops, spec.height, spec.width)
    if spec.color == "bgr":
        batch = batch[..., ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return (pixels - spec.mean) / spec.std


# --- CelebBasis's evaluation chain (crop mode ``celebbasis``) -------------------------------------------
_CELEBBASIS_SIZE = 512  # its FFHQ-like crop, pixels


def check_crop_mode(variant: SphereVariant, crop: str | None) -> str:
    """The crop mode to use (``crop``, or the variant's own when None); ValueError when it does not apply."""
    crop = variant.crop if crop is None else str(crop)
    if crop not in CROP_MODES:
        raise ValueError(f"unknown SphereFace crop mode {crop!r}; known: {', '.join(CROP_MODES)}")
    if crop == "celebbasis" and variant.network != _CELEBBASIS.network:
        raise ValueError(f"crop mode 'celebbasis' feeds CelebBasis's 112x112 network; variant {variant.name!r} "
                         f"is {variant.network}")
    return crop


def celebbasis_input(image, detection_or_landmarks) -> torch.Tensor:
    """The (3, 112, 112) float32 network input CelebBasis's ``IdentityEvaluator`` makes of one face.

    Its steps: the image, held as a [-1, 1] tensor, back to uint8 with ``((x + 1) * 127.5)`` truncated;
    a similarity warp of the five landmarks onto its 512x512 "ffhq" template (OpenCV bilinear, black
    border); ToTensor and Normalize(0.5, 0.5) to [-1, 1]; ``affine_grid``/``grid_sample`` with its fixed
    matrix (bilinear, zero padding: a frame of mid-gray 0.0 where the matrix reaches outside the 512 crop,
    4-6 px wide at 112), then a bilinear resize to 112 (``align_corners=True`` for both).
    """
    import cv2
    import torch.nn.functional as F

    pixels = torch.from_numpy(rgb_array(image).copy()).float()  # a copy: PIL's buffer is read-only
    as_tensor = (pixels / 255.0 - 0.5) / 0.5
    truncated = ((as_tensor + 1.0) * 127.5).numpy().astype(np.uint8)  # astype truncates, as theirs
    matrix = similarity_transform(landmarks_of(detection_or_landmarks), _CELEBBASIS_FFHQ_512)
    crop = cv2.warpAffine(truncated, matrix, (_CELEBBASIS_SIZE, _CELEBBASIS_SIZE), flags=cv2.INTER_LINEAR,
                          borderValue=0.0)
    x = (torch.from_numpy(crop).permute(2, 0, 1).float()[None] / 255.0 - 0.5) / 0.5
    theta = torch.tensor(_CELEBBASIS_THETA, dtype=torch.float32)[None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return F.interpolate(x, size=112, mode="bilinear", align_corners=True)[0]


def sphereface_inputs(images, detections, variant: str | None = None, crop: str | None = None) -> torch.Tensor:
    """(N, 3, height, width) float32 network inputs of the faces at ``detections`` in ``images``."""
    spec = get_variant(variant)
    if check_crop_mode(spec, crop) == "celebbasis":
        if not len(images):
            return torch.zeros((0, 3, spec.height, spec.width))
        return torch.stack([celebbasis_input(im, d) for im, d in zip(images, detections)])
    return preprocess([crop_sphereface(im, d, spec.name) for im, d in zip(images, detections)], spec.name)


def _variant_of(model: nn.Module, variant: str | None) -> SphereVariant:
    spec = get_variant(variant if variant is not None else getattr(model, "variant", None))
    own = getattr(model, "variant", None)
    if own is not None and own != spec.name and get_variant(own).network != spec.network:
        raise ValueError(f"model was built for SphereFace variant {own!r}, not {spec.name!r}")
    return spec


@torch.inference_mode()
def embed_batch(model: nn.Module, crops, variant: str | None = None) -> np.ndarray:
    """(N, 512) float32 unit embeddings of crops from :func:`crop_sphereface` (same variant)."""
    spec = _variant_of(model, variant)
    features = model(preprocess(crops, spec.name).to(model_device(model)))
    return l2_normalise(features.float().cpu().numpy())


@torch.inference_mode()
def embed_inputs(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """(N, 512) float32 unit embeddings of network inputs from :func:`sphereface_inputs`."""
    return l2_normalise(model(inputs.to(model_device(model))).float().cpu().numpy())


def embed_faces(model: nn.Module, images, detections, variant: str | None = None,
                crop: str | None = None) -> np.ndarray:
    """(N, 512) float32 unit embeddings; variant defaults to the model's own, crop to the variant's."""
    spec = _variant_of(model, variant)
    return embed_inputs(model, sphereface_inputs(images, detections, spec.name, crop))


def embed_sphereface(
    model: nn.Module, image, detection_or_landmarks, variant: str | None = None, crop: str | None = None
) -> np.ndarray:
    """The (512,) float32 unit embedding of one face; variant defaults to the model's own, crop mode to
    the variant's (``CROP_MODES``)."""
    return embed_faces(model, [image], [detection_or_landmarks], variant, crop)[0]

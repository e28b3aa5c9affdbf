"""CelebBasis's frozen face-feature network: insightface arcface_torch's IResNet-100, re-written.

Architecture (``backbones/iresnet.py``, ``iresnet100``): a 3x3 stride-1 conv stem (3 -> 64, no bias),
BatchNorm2d, PReLU at 112x112; four stages of ``IBasicBlock`` (3, 13, 30, 3 blocks; widths 64, 128, 256,
512), the first block of every stage with stride 2 (112 -> 7). A block is bn1 -> conv1 (3x3) -> bn2 ->
prelu -> conv2 (3x3, the block's stride) -> bn3, plus the input, passed through ``downsample`` (1x1
strided conv without bias + BatchNorm2d) when the shape changes. Head: bn2 (BatchNorm2d 512) -> flatten
-> dropout (p=0) -> fc (Linear 512*7*7 -> 512) -> ``features`` (BatchNorm1d 512). Every BatchNorm has
eps 1e-5 and PyTorch's default momentum. 65,156,160 parameters, 925 state-dict entries.

Input: RGB 112x112, ``(x / 255 - 0.5) / 0.5``. Output: (N, 512), unnormalised (CelebBasis L2-normalises it).

Weight file: ``glint360k_cosface_r100_fp16_0.1/backbone.pth`` from the arcface_torch model zoo, a bare
``torch.save(model.state_dict())`` (keys ``conv1.weight``, ``layer1.0.bn1.weight``,
``layer1.0.downsample.0.weight``, ..., ``fc.weight``, ``features.weight``; no ``module.`` prefix). It is
read tensors-only and loaded strictly: any other layout is refused, naming the file and the keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from f2d_bench.weights import WeightsLayoutError, load_checked, read_torch_file, require_file

#: Blocks per stage of ``iresnet100``.
LAYERS = (3, 13, 30, 3)
WIDTHS = (64, 128, 256, 512)
INPUT_SIZE = 112  # pixels, square
FEATURE_DIM = 512
FILE_NAME = "glint360k_cosface_r100_fp16_0.1/backbone.pth"
PUBLISHED = (
    f"CelebBasis uses insightface's arcface_torch IResNet-100 trained on Glint360K with CosFace ({FILE_NAME}), "
    "published in the model zoo linked from the README of https://github.com/deepinsight/insightface/tree/master/"
    "recognition/arcface_torch (\"Model Zoo\"; the weights are for non-commercial research use only). "
    "Set methods[i].params.backbone to the local path of backbone.pth (or backbone: random for an offline check "
    "of the machinery, whose images are not meaningful)."
)
_BN_EPS = 1e-5


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    """One pre-activation residual block; attribute names are the official file's key names."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, eps=_BN_EPS)
        self.conv1 = _conv3x3(c_in, c_out)
        self.bn2 = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.prelu = nn.PReLU(c_out)
        self.conv2 = _conv3x3(c_out, c_out, stride)
        self.bn3 = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out, eps=_BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """arcface_torch's IResNet for 112x112 input: x (N, 3, 112, 112) in -1..1 (RGB) -> (N, 512) features."""

    def __init__(self, layers: tuple[int, ...] = LAYERS) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(WIDTHS[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(WIDTHS[0])
        c_in = WIDTHS[0]
        for index, (width, count) in enumerate(zip(WIDTHS, layers), start=1):
            blocks = [IBasicBlock(c_in, width, 2)] + [IBasicBlock(width, width) for _ in range(count - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            c_in = width
        self.bn2 = nn.BatchNorm2d(WIDTHS[-1], eps=_BN_EPS)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(WIDTHS[-1] * 7 * 7, FEATURE_DIM)
        self.features = nn.BatchNorm1d(FEATURE_DIM, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def build_iresnet100() -> IResNet:
    """The architecture with PyTorch's default initialisation, in eval mode."""
    return IResNet(LAYERS).eval()


def backbone_parameter_count() -> int:
    """Learnable scalars of IResNet-100 (65,156,160), counted on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in IResNet(LAYERS).parameters())


def load_backbone(path) -> IResNet:
    """IResNet-100 with the weights of ``path`` (the official ``backbone.pth``), in eval mode on the CPU.

    Raises ModelUnavailableError when the file is missing (saying where it is published) and
    WeightsLayoutError, naming the file, when it is not a bare state dict of exactly this architecture.
    """
    file = require_file(path, what="CelebBasis face-recognition backbone (arcface_torch IResNet-100)",
                        published=PUBLISHED)
    state = read_torch_file(file)
    if not isinstance(state, Mapping):
        raise WeightsLayoutError(f"{str(file)!r}: expected a state dict (what torch.save(model.state_dict()) "
                                 f"writes), got {type(state).__name__}")
    with torch.device("meta"):  # no random initialisation: a strict load overwrites every entry
        model = IResNet(LAYERS)
    model = model.to_empty(device="cpu")
    return load_checked(model, state, source=f"{str(file)!r} (arcface_torch iresnet100)")


def to_input(crops) -> torch.Tensor:
    """(N, 112, 112, 3) uint8 RGB crops -> (N, 3, 112, 112) float32, ``(x / 255 - 0.5) / 0.5``."""
    from f2d_bench.scorers.identity.adaface import preprocess

    return preprocess(crops, "rgb")  # the same normalisation and channel order as arcface_torch's

"""ELITE's two mapping networks, in the module layout of the official checkpoints.

Both mappers read five feature maps of the CLIP image encoder (its last hidden state and the hidden
states after layers 4, 8, 12 and 16, each ``(B, 1 + patches, vision width)``) through five pairs of MLPs:
``mapping_{i}`` for the class token and ``mapping_patch_{i}`` for the patch tokens. Each MLP is
Linear(vision width, 1024), LayerNorm, LeakyReLU(0.01), Linear(1024, 1024), LayerNorm, LeakyReLU,
Linear(1024, text width) (``nn.Sequential`` indices 0, 1, 3, 4, 6 hold the weights).

- ``GlobalMapper`` (``global_mapper.pt``): per layer, class MLP + mean over patches of the patch MLP,
  one word per layer -> ``(B, 5, text width)``; ELITE injects the first word.
- ``LocalMapper`` (``local_mapper.pt``): per layer, class MLP broadcast onto every patch's patch MLP,
  averaged over the five layers -> ``(B, patches, text width)``.

Besides the MLPs each file holds bias-free key/value projections for every cross-attention (``attn2``)
of the UNet, named ``<UNet module name with "." -> "_">_to_k`` / ``_to_v``: the global mapper's replace
the UNet's own K/V for the text context (fine-tuned in ELITE's first stage), the local mapper's project
the local (patch) words. Loading is strict: every key and shape of the official layout, nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from f2d_bench.weights import WeightsLayoutError, load_checked, read_torch_file

#: Hidden states of the CLIP image encoder the mappers read besides the last one (official: 4, 8, 12, 16).
HIDDEN_LAYERS = (4, 8, 12, 16)
#: Feature maps per image: the last hidden state, then ``HIDDEN_LAYERS``.
N_FEATURE_MAPS = 1 + len(HIDDEN_LAYERS)
#: Width of every MLP's two hidden layers (fixed in the official code).
MLP_WIDTH = 1024
#: Where the released checkpoints are published (message of a missing file).
PUBLISHED = ("ELITE's checkpoints are published on Hugging Face at ELITE-library/ELITE "
             "(https://huggingface.co/ELITE-library/ELITE, files global_mapper.pt and local_mapper.pt, 192 MB "
             "each; also the Google Drive folder linked from github.com/csyxwei/ELITE).")


class AttentionShape(tuple):
    """(UNet module name of an ``attn2``, context width, inner width): the K/V projections a mapper holds."""

    __slots__ = ()

    def __new__(cls, name: str, context_dim: int, inner_dim: int):
        return super().__new__(cls, (str(name), int(context_dim), int(inner_dim)))

    @property
    def name(self) -> str:
        return self[0]

    @property
    def context_dim(self) -> int:
        return self[1]

    @property
    def inner_dim(self) -> int:
        return self[2]

    @property
    def key(self) -> str:
        """The module-name stem in the checkpoint ("down_blocks_0_..._attn2")."""
        return self[0].replace(".", "_")


def cross_attention_shapes(unet: nn.Module) -> list[AttentionShape]:
    """Every cross-attention (``attn2``) of a diffusers UNet, in ``named_modules`` order, with its K/V sizes.

    The official code walks the same modules (diffusers 0.11 names them as 0.42 does) and skips ``attn1``.
    """
    from diffusers.models.attention_processor import Attention

    shapes = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2"):
            shapes.append(AttentionShape(name, module.to_k.in_features, module.to_k.out_features))
    if not shapes:
        raise TypeError(f"{type(unet).__name__} has no cross-attention (attn2) layers for ELITE's projections")
    return shapes


def _mlp(input_dim: int, output_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, output_dim))


class _Mapper(nn.Module):
    """The MLP pairs and the per-``attn2`` K/V projections common to both mappers.

    input_dim: CLIP image encoder width (1024 for ViT-L/14). output_dim: text width (768 for SD 1.x).
    attention: the UNet's ``attn2`` layers (``cross_attention_shapes``). hidden: MLP width (official 1024).
    """

    def __init__(self, input_dim: int, output_dim: int, attention: Sequence[AttentionShape] = (),
                 hidden: int = MLP_WIDTH):
        super().__init__()
        self.input_dim, self.output_dim = int(input_dim), int(output_dim)
        for i in range(N_FEATURE_MAPS):
            setattr(self, f"mapping_{i}", _mlp(input_dim, output_dim, hidden))
            setattr(self, f"mapping_patch_{i}", _mlp(input_dim, output_dim, hidden))
        self.attention = tuple(AttentionShape(*a) for a in attention)
        # Registered after the MLPs and K before V, as the training scripts add them (the saved order).
        for a in self.attention:
            self.add_module(f"{a.key}_to_k", nn.Linear(a.context_dim, a.inner_dim, bias=False))
            self.add_module(f"{a.key}_to_v", nn.Linear(a.context_dim, a.inner_dim, bias=False))

    def projections(self, attn_name: str) -> tuple[nn.Linear, nn.Linear]:
        """The (to_k, to_v) projections this mapper holds for the UNet's ``attn_name``."""
        stem = attn_name.replace(".", "_")
        return getattr(self, f"{stem}_to_k"), getattr(self, f"{stem}_to_v")

    def _check(self, embs: Sequence[torch.Tensor]) -> None:
        if len(embs) != N_FEATURE_MAPS:
            raise ValueError(f"ELITE mappers take {N_FEATURE_MAPS} feature maps, got {len(embs)}")
        for e in embs:
            if e.ndim != 3 or e.shape[1] < 2 or e.shape[2] != self.input_dim:
                raise ValueError(f"expected features (batch, 1 + patches, {self.input_dim}), got {tuple(e.shape)}")


class GlobalMapper(_Mapper):
    """Five CLIP feature maps -> five words ``(B, 5, output_dim)`` (ELITE's global mapping)."""

    def forward(self, embs: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check(embs)
        words = [getattr(self, f"mapping_{i}")(e[:, :1])
                 + getattr(self, f"mapping_patch_{i}")(e[:, 1:]).mean(dim=1, keepdim=True)
                 for i, e in enumerate(embs)]
        return torch.cat(words, dim=1)


class LocalMapper(_Mapper):
    """Five CLIP feature maps -> one word per patch ``(B, patches, output_dim)`` (ELITE's local mapping)."""

    def forward(self, embs: Sequence[torch.Tensor]) -> torch.Tensor:
        self._check(embs)
        per_layer = [getattr(self, f"mapping_{i}")(e[:, :1]) + getattr(self, f"mapping_patch_{i}")(e[:, 1:])
                     for i, e in enumerate(embs)]
        return torch.stack(per_layer).mean(dim=0)


def parameter_count(input_dim: int, output_dim: int, attention: Sequence[AttentionShape]) -> int:
    """Parameters of one mapper (both have the same), counted from the architecture on the meta device.

    At SD 1.4 / ViT-L/14 size: 10 MLPs x 2,890,496 + the 16 ``attn2`` K/V pairs (19,169,280) = 48,074,240
    (192.3 MB in float32, the size of each released file).
    """
    with torch.device("meta"):
        return sum(p.numel() for p in GlobalMapper(input_dim, output_dim, attention).parameters())


def load_mapper(cls: type[_Mapper], path: Path, input_dim: int, output_dim: int,
                attention: Sequence[AttentionShape], what: str) -> _Mapper:
    """Build ``cls`` for these widths and ``attn2`` layers and load ``path`` into it strictly.

    Raises WeightsLayoutError naming missing / unexpected keys and wrong shapes (e.g. a file made for
    another text width, or for another UNet).
    """
    state = read_torch_file(path)
    if not isinstance(state, Mapping):
        raise WeightsLayoutError(f"{what} {str(path)!r}: expected a state dict (key -> tensor), got "
                                 f"{type(state).__name__}; the official file is torch.save(mapper.state_dict())")
    model = cls(input_dim, output_dim, attention)
    return load_checked(model, state, source=f"{what} {str(path)!r}")

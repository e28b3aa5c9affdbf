"""The MSID (multi-scale identity) encoder of Face2Diffusion, with the layout of the official ``msid.pt``.

A timm VisionTransformer (112x112 input, 8x8 patches -> 196 patches + CLS, width 384, depth 12, 12 heads,
MLP ratio 4, qkv bias, LayerNorm eps 1e-6, no classification head). The CLS token after blocks 2, 5, 8
and 11 (0-based) goes through its own ``BatchNorm1d(384)`` then ``LayerNorm(384)`` (``norms.layer_{i}``);
the four results are concatenated into the 1536-d identity feature. The ViT's final ``norm`` is part of
the checkpoint (the encoder was trained with it) but is not applied to the features, as in the official
inference.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

IMAGE_SIZE = 112
PATCH_SIZE = 8
WIDTH = 384
DEPTH = 12
HEADS = 12
#: 0-based indices of the blocks whose CLS token is read.
FEATURE_BLOCKS = (2, 5, 8, 11)
#: Width of the identity feature: one ``WIDTH`` slice per feature block.
FEATURE_DIM = WIDTH * len(FEATURE_BLOCKS)


class MSIDEncoder(VisionTransformer):
    """Face crop on the ArcFace template -> 1536-d multi-scale identity feature.

    Input: (B, 3, 112, 112) float RGB scaled to [-1, 1] (``(x/255 - 0.5) / 0.5``).
    Output: (B, 1536), the normalised CLS tokens of blocks 2, 5, 8, 11, concatenated in that order.
    """

    def __init__(self) -> None:
        super().__init__(
            img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
            mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_classes=0,  # no head: the official file has no head.* keys
        )
        # Default eps (1e-5) here: the official model builds these norms without the ViT's norm_layer.
        self.norms = nn.ModuleDict(
            {f"layer_{i}": nn.Sequential(nn.BatchNorm1d(WIDTH), nn.LayerNorm(WIDTH)) for i in FEATURE_BLOCKS}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 112, 112) -> (B, 1536)
        tokens = self.patch_embed(x)  # (B, 196, 384)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        # Original ViT order: CLS first, then one position embedding for all 197 tokens. Written out
        # rather than timm's private _pos_embed, whose behaviour depends on constructor options.
        tokens = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        features = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in FEATURE_BLOCKS:
                features.append(self.norms[f"layer_{i}"](tokens[:, 0]))
        return torch.cat(features, dim=1)

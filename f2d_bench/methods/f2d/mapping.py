"""The Face2Diffusion mapping network f_map (official class ``IMG2TEXTwithEXP``), the only trained part.

Input: the 1536-d MSID identity feature concatenated with a 64-d expression feature (1600 dims); with no
expression reference the learned ``null_exp`` takes its place. Two independent MLPs, ``i2t_first`` and
``i2t_last``, each map it to one word embedding of the text encoder's width (768 for SD 1.4): S1*, S2*.
Each MLP is ``layers.0`` = Linear(1600, 1536) -> Dropout(0.1) -> LeakyReLU(0.2),
``layers.1`` = Linear(1536, 1536) -> Dropout(0.1) -> LeakyReLU(0.2), then ``fc_out`` = Linear(1536, width).
"""

from __future__ import annotations

import torch
from torch import nn

from f2d_bench.methods.f2d.msid import FEATURE_DIM

#: Width of the expression feature (the official expression encoder is not released).
EXPRESSION_DIM = 64
#: Hidden width of both MLPs (official: equal to the identity feature width).
HIDDEN_DIM = 1536
N_LAYERS = 2
DROPOUT = 0.1
LEAKY_SLOPE = 0.2


class TokenMLP(nn.Module):
    """One of the two MLPs: (B, 1600) -> (B, width)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        blocks, dim = [], in_dim
        for _ in range(N_LAYERS):
            # Sequential(Linear, Dropout, LeakyReLU): the Linear is index 0, hence the keys layers.N.0.*
            blocks.append(nn.Sequential(nn.Linear(dim, hidden_dim), nn.Dropout(DROPOUT), nn.LeakyReLU(LEAKY_SLOPE)))
            dim = hidden_dim
        self.layers = nn.Sequential(*blocks)
        self.fc_out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.layers(x))


class MappingNetwork(nn.Module):
    """Identity feature (+ expression) -> the two pseudo-word embeddings S1*, S2*.

    ``text_width``: hidden size of the text encoder the tokens are written into (768 for SD 1.4's
    CLIP ViT-L/14 text tower).
    """

    def __init__(self, text_width: int) -> None:
        super().__init__()
        in_dim = FEATURE_DIM + EXPRESSION_DIM
        self.i2t_first = TokenMLP(in_dim, HIDDEN_DIM, text_width)
        self.i2t_last = TokenMLP(in_dim, HIDDEN_DIM, text_width)
        # Learned during training (expression dropped with p=0.2); zeros only as the initial value.
        self.null_exp = nn.Parameter(torch.zeros(EXPRESSION_DIM))
        self.text_width = int(text_width)

    def forward(self, identity: torch.Tensor, expression: torch.Tensor | None = None) -> torch.Tensor:
        """identity: (B, 1536); expression: (B, 64), (64,) or None for ``null_exp``. Returns (B, 2, width)."""
        if expression is None:
            expression = self.null_exp
        expression = expression.to(identity).expand(identity.shape[0], EXPRESSION_DIM)
        x = torch.cat([identity, expression], dim=-1)
        return torch.stack([self.i2t_first(x), self.i2t_last(x)], dim=1)

"""An optional expression reference: a 64-d expression feature fed to the mapping network.

The official code releases no expression encoder, so the vector comes from a file (``.npy``, or ``.pt``
holding one tensor). Without it the mapping network's learned ``null_exp`` is used, as in the official
inference.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from f2d_bench.errors import ConfigError
from f2d_bench.methods.f2d.mapping import EXPRESSION_DIM
from f2d_bench.weights import read_torch_file


def load_expression(path: str | Path) -> torch.Tensor:
    """The expression vector in ``path`` as a (64,) float32 tensor; ConfigError when unusable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"params.expression: no file at {path} (a .npy or .pt file holding a {EXPRESSION_DIM}-d vector)"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        elif suffix in (".pt", ".pth"):
            value = read_torch_file(path, error=ConfigError)
        else:
            raise ConfigError(f"params.expression: {path} must be a .npy or .pt file")
    except (OSError, ValueError, pickle.UnpicklingError, RuntimeError) as exc:
        raise ConfigError(f"params.expression: cannot read {path}: {exc}") from exc
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"params.expression: {path} holds a {type(value).__name__}, not a tensor")
    if value.numel() != EXPRESSION_DIM or value.squeeze().ndim > 1:
        raise ConfigError(
            f"params.expression: {path} holds shape {tuple(value.shape)}; expected {EXPRESSION_DIM} values"
        )
    value = value.reshape(EXPRESSION_DIM).float()
    if not torch.isfinite(value).all():
        raise ConfigError(f"params.expression: {path} contains NaN or infinity")
    return value

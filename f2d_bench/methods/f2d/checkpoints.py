"""The official F2D checkpoint files: where they are published, and strict loading with clear errors.

Both files are plain ``torch.save(module.state_dict())`` dictionaries: ``msid.pt`` for `MSIDEncoder`
(timm ViT keys plus ``norms.layer_{2,5,8,11}.{0,1}.*``), ``mapping.pt`` for `MappingNetwork`
(``null_exp``, ``i2t_{first,last}.layers.{0,1}.0.*``, ``i2t_{first,last}.fc_out.*``). Loading is strict:
a missing, unexpected or wrongly shaped key is an error that names it, never a silent partial load.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from f2d_bench.errors import ConfigError

OFFICIAL_REPO = "https://github.com/mapooon/Face2Diffusion"
#: Google Drive links given in the official README ("Download checkpoints").
PUBLISHED = {  # param -> (file name, what it holds, link)
    "msid": ("msid.pt", "MSID encoder",
             "https://drive.google.com/file/d/1DjUf-ib612SDDt86TRlsDkHqXTeYx030/view?usp=sharing"),
    "mapping": ("mapping.pt", "mapping network",
                "https://drive.google.com/file/d/1Lf_mwMgme_HVYJCkViGr4TfGOfKw9PhE/view?usp=sharing"),
}
# Key differences listed in an error message before "... and N more".
_MAX_LISTED = 8


class CheckpointError(ConfigError):
    """A checkpoint file given in the config cannot be read or does not fit the official structure."""


def missing_checkpoints_message(problems: Mapping[str, str]) -> str:
    """Say which files are missing, where the authors publish them and which config keys take them.

    problems: param name ("msid" / "mapping") -> what is wrong ("not set", "no file at PATH").
    """
    lines = ["F2D needs the official checkpoint files msid.pt and mapping.pt:"]
    for param, problem in problems.items():
        lines.append(f"  - params.{param} ({PUBLISHED[param][0]}): {problem}")
    lines.append(
        f"The authors publish both on Google Drive, linked from the README of {OFFICIAL_REPO} "
        "(section \"Download checkpoints\"):"
    )
    for param, (file_name, what, url) in PUBLISHED.items():
        lines.append(f"  - {file_name} ({what}): {url}")
    lines.append(
        "Download them and set their paths in the run config as methods[i].params.msid and "
        "methods[i].params.mapping (i: this method's position in `methods`). For an offline check of "
        "the machinery only, set methods[i].params.weights: random (images are then not meaningful)."
    )
    return "\n".join(lines)


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save(state_dict)`` file, read with ``weights_only=True`` onto the CPU.

    weights_only never runs code from the file. A file that needs full unpickling is refused rather
    than opened unsafely; the message says how to convert it once, for a file one trusts.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise CheckpointError(
            f"{what} checkpoint {path} is not a plain tensor state dict readable with "
            f"torch.load(weights_only=True) ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). If you "
            "trust the file, convert it once: torch.save(torch.load(p, weights_only=False), new_path)"
        ) from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} checkpoint {path}: {exc}") from exc
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(
            f"{what} checkpoint {path} holds a {type(data).__name__}, not a state dict of tensors "
            "(expected what torch.save(module.state_dict()) writes)"
        )
    return dict(data)


def expected_layout(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every entry ``module.state_dict()`` has (parameters and buffers)."""
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    """Load ``state_dict`` into ``module``; any key or shape difference raises CheckpointError naming it."""
    expected = expected_layout(module)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{key} {tuple(state_dict[key].shape)} (expected {expected[key]})"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[key].shape) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {_listed(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"{what} checkpoint {source} does not match the official F2D structure "
            f"({len(expected)} keys expected): " + "; ".join(problems)
        )
    module.load_state_dict(dict(state_dict), strict=True)

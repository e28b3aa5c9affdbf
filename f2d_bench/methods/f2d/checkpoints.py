"""The official F2D checkpoint files: where they are published, and strict loading with clear errors.

Both files are plain ``torch.save(module.state_dict())`` dictionaries: ``msid.pt`` for `MSIDEncoder`
(timm ViT keys plus ``norms.layer_{2,5,8,11}.{0,1}.*``), ``mapping.pt`` for `MappingNetwork`
(``null_exp``, ``i2t_{first,last}.layers.{0,1}.0.*``, ``i2t_{first,last}.fc_out.*``). Loading is strict:
a missing, unexpected or wrongly shaped key is an error that names it, never a silent partial load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from f2d_bench.errors import ConfigError
from f2d_bench.weights import load_checked, read_torch_file

OFFICIAL_REPO = "https://github.com/mapooon/Face2Diffusion"
#: Google Drive links given in the official README ("Download checkpoints").
PUBLISHED = {  # param -> (file name, what it holds, link)
    "msid": ("msid.pt", "MSID encoder",
             "https://drive.google.com/file/d/1DjUf-ib612SDDt86TRlsDkHqXTeYx030/view?usp=sharing"),
    "mapping": ("mapping.pt", "mapping network",
                "https://drive.google.com/file/d/1Lf_mwMgme_HVYJCkViGr4TfGOfKw9PhE/view?usp=sharing"),
}


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
    """The tensors of a ``torch.save(state_dict)`` file, read tensors-only (``weights_only=True``) onto the
    CPU: no code from the file is ever run. Raises CheckpointError for any other content."""
    data = read_torch_file(Path(path), error=CheckpointError)
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(
            f"{what} checkpoint {path} holds a {type(data).__name__}, not a state dict of tensors "
            "(expected what torch.save(module.state_dict()) writes)"
        )
    return dict(data)


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    """Load ``state_dict`` into ``module``; any missing, unexpected or wrongly shaped key raises
    CheckpointError naming the file (``source``) and the keys."""
    load_checked(module, state_dict, source=f"{what} checkpoint {source}", error=CheckpointError)

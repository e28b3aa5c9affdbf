"""Devices, weight dtypes and the Hugging Face offline switch: the one resolver of each that loaders use.

torch and huggingface_hub are imported inside the functions, so importing this module costs nothing
(command-line help and config checks use it without loading torch).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from f2d_bench.errors import ConfigError

if TYPE_CHECKING:
    import torch

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_device(name: str | torch.device) -> torch.device:
    """Device for a name: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N", "mps", "meta".

    A `torch.device` is accepted too and checked the same way. Raises ConfigError for a malformed name
    or a CUDA device that this machine does not have, saying what to use instead.
    """
    import torch

    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(key)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"device {name!r} is not a valid torch device (try 'auto', 'cpu', 'cuda', 'cuda:0')"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was requested but CUDA is not available here; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """Weight dtype for a name: "auto", "float32"/"fp32", "float16"/"fp16"/"half", "bfloat16"/"bf16".

    A `torch.dtype` is returned as is. "auto" is float16 on CUDA (as the official F2D inference loads
    SD) and float32 elsewhere. float16 and bfloat16 are also accepted on the CPU: with torch >= 2.x every
    op SD 1.4 uses runs there in half precision (checked on the tiny pipeline), but it is no faster than
    float32 on CPUs and gives slightly different pixels, so use it only to test half precision off the GPU.
    """
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower()
    if key == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if key not in _DTYPE_NAMES:
        raise ConfigError(f"dtype {name!r} is not one of: auto, {', '.join(sorted(_DTYPE_NAMES))}")
    return getattr(torch, _DTYPE_NAMES[key])


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (huggingface_hub reads it only once, at import)."""
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(huggingface_hub.constants.HF_HUB_OFFLINE)

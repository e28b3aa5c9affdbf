"""What a run records about where it ran: package versions and hardware."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from importlib import metadata

PACKAGES = (
    "f2d-bench", "torch", "torchvision", "diffusers", "transformers", "accelerate", "numpy", "pillow",
    "opencv-python-headless", "facenet-pytorch", "open_clip_torch", "safetensors", "pandas",
)


def utc_now() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict:
    """CPU, memory and accelerators of this machine (GPU fields are empty without CUDA)."""
    info: dict = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cuda_available": False,
        "gpus": [],
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gib"] = None
    import torch

    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["cuda_available"] = True
        info["cuda_version"] = torch.version.cuda
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return info


def environment(*, compile: bool = False) -> dict:
    """Where and how a command ran. ``compile``: ``generate --compile`` (the modules it compiled are named)."""
    from f2d_bench.pipelines.compile import COMPILED_MODULES

    return {"time": utc_now(), "packages": package_versions(), "hardware": hardware(),
            "compile": list(COMPILED_MODULES) if compile else None}

"""Opt-in ``torch.compile`` of a pipeline's UNet and VAE decoder (``generate --compile``).

Static shapes (``dynamic=False``): the engine pads every pipeline call to the run's batch size, so the
kernels compiled for the first batch serve every later one, in this process and, through inductor's
persistent caches under ``<cache root>/torch-compile``, in the next process on the same machine.
Compiled kernels round floats differently from eager ones: images agree with eager within float noise,
not bit for bit (the generate benchmark and tests/test_fast_path.py measure it).
"""

from __future__ import annotations

import os

from f2d_bench import paths

#: What ``generate --compile`` compiles, recorded with the run's environment.
COMPILED_MODULES = ("unet", "vae.decoder")


def compile_cache_dir() -> str:
    """Inductor's cache folder: ``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``<cache root>/torch-compile``."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(paths.cache_root() / "torch-compile"))


def compile_pipeline(pipe) -> None:
    """Compile ``pipe``'s UNet and VAE decoder in place (the modules keep their types, weights and configs,
    so pipelines sharing them share the compiled code). Calling it twice compiles nothing more."""
    import shutil

    import torch._inductor.config as inductor_config

    if pipe.device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None \
            and shutil.which("c++") is None:
        raise RuntimeError("--compile on the CPU needs a C++ compiler (g++ or c++ on PATH); "
                           "run without --compile")
    compile_cache_dir()
    inductor_config.fx_graph_cache = True  # compiled graphs persist across processes
    for module in (pipe.unet, pipe.vae.decoder):
        if not getattr(module, "_f2d_compiled", False):
            module.compile(dynamic=False)
            module._f2d_compiled = True

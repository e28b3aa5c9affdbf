"""Full-size Stable Diffusion 1.4 with random weights, for GPU throughput benchmarks.

A denoising step costs the same whatever the weight values, so timing this pipeline measures what
timing the real `CompVis/stable-diffusion-v1-4` would, without its 4 GB download. Images from it are noise.
The architecture comes from SD 1.4's published configs (`f2d_bench.pipelines.sd14`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from f2d_bench.devices import resolve_device, resolve_dtype
from f2d_bench.pipelines.sd14 import sd14_component_configs, sd14_pipeline
from f2d_bench.pipelines.tiny import tiny_sd14_dir


def build_sd14_components(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict:
    """UNet, text encoder and VAE at SD 1.4's size with random weights, as {"unet", "text_encoder", "vae"}.

    Modules are created directly on `device` (no CPU copy first on GPUs); "meta" builds shapes only,
    which counts parameters in about a second.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = sd14_component_configs()
    previous_default = torch.get_default_dtype()
    # Creating parameters in the target dtype directly halves peak memory for float16 and avoids
    # diffusers' warning about casting a built model with .to(dtype).
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            modules = {
                "unet": UNet2DConditionModel(**configs["unet"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
                "vae": AutoencoderKL(**configs["vae"]),
            }
    finally:
        torch.set_default_dtype(previous_default)
    for module in modules.values():
        module.eval().requires_grad_(False)
    return modules


def build_random_sd14(
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "auto",
    tokenizer_dir: Path | None = None,
):
    """A `StableDiffusionPipeline` with SD 1.4's architecture, random weights and EulerAncestral sampling.

    `dtype` / `device` accept torch objects or the names `load_sd_pipeline` accepts ("auto", "float16", ...).
    `tokenizer_dir` holds CLIP tokenizer files (`write_clip_tokenizer`); None uses the tiny model's copy
    from the cache. Full size needs about 4.3 GB in float32 (2.1 GB in float16); building on a CPU takes
    tens of seconds for the random initialisation.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if tokenizer_dir is None:
        tokenizer_dir = tiny_sd14_dir() / "tokenizer"

    pipe = sd14_pipeline(**build_sd14_components(torch_dtype, torch_device), tokenizer_dir=tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe

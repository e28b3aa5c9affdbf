"""A tiny Stable Diffusion pipeline in SD 1.4's on-disk layout, built locally (no download).

It runs through exactly the code that loads the real SD 1.4 (`StableDiffusionPipeline.from_pretrained`),
so tests and CPU smoke runs exercise the product's loading and generation paths. Same architecture family
as SD 1.4 (CLIP text encoder with the real 49,408-token vocabulary and tokenizer, cross-attention UNet,
KL VAE with 4 blocks so `vae_scale_factor` is 8, EulerAncestral scheduler with SD 1.4's betas), with
widths of 32-64 instead of 320-1280. Random weights: its images are noise.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from f2d_bench import paths
from f2d_bench.pipelines.sd14 import SD14_UNET_CONFIG, SD14_VAE_CONFIG, sd14_pipeline
from f2d_bench.pipelines.tokenizer import write_clip_tokenizer

# Bump the suffix whenever the recipe below changes, so caches never serve an older build.
TINY_SD14_NAME = "tiny-sd14-v1"
BUILD_INFO_FILE = "f2d_bench_build.json"

# SD 1.4's configs with widths of 32-64 instead of 320-1280 and fewer layers, the rest as SD 1.4's.
# diffusers saves every constructor argument, defaults included, so the saved UNet and VAE configs are
# the same as when these dicts listed only the non-default keys (the cached build stays valid).
TINY_UNET_CONFIG = {
    **SD14_UNET_CONFIG,
    "sample_size": 8,  # 8x8 latents -> 64x64 images by default
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "norm_num_groups": 8,
    "cross_attention_dim": 32,  # = text encoder hidden size
    "attention_head_dim": 4,
}

TINY_TEXT_ENCODER_CONFIG = {
    # Not SD 1.4's dict with overrides: transformers also saves the keys passed at their default values,
    # which would change the cached build's config.json.
    "vocab_size": 49408,  # the real CLIP vocabulary, so the real tokenizer fits
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

TINY_VAE_CONFIG = {  # four blocks, as in SD 1.4 -> vae_scale_factor 2**3 = 8
    **SD14_VAE_CONFIG,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}


def build_tiny_sd14(directory: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and `save_pretrained` it (safetensors) into `directory`; return `directory`.

    Weights depend only on `seed` (each component is initialised from its own seeded RNG stream; the
    caller's global RNG state is left untouched). `directory` may exist; its files are overwritten.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = directory / "tokenizer"
    write_clip_tokenizer(tokenizer_dir)

    with torch.random.fork_rng(devices=[]):
        # Re-seeding per component keeps each one's weights independent of the others' sizes.
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER_CONFIG))
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)

    pipe = sd14_pipeline(unet, text_encoder, vae, tokenizer_dir)
    with _progress_bars_disabled():  # a sub-second save needs no progress bars
        pipe.save_pretrained(directory, safe_serialization=True)
    # transformers 5 saves its own tokenizer.json layout; SD 1.4's repo has vocab.json + merges.txt only,
    # and loading must go through that same path.
    shutil.rmtree(tokenizer_dir)
    write_clip_tokenizer(tokenizer_dir)
    info = {"name": TINY_SD14_NAME, "seed": seed, "note": "random weights; images are noise"}
    (directory / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return directory


@contextlib.contextmanager
def _progress_bars_disabled():
    """Silence diffusers' and transformers' progress bars, restoring their previous state after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [diffusers_logging, transformers_logging]
    previously_enabled = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in zip(libraries, previously_enabled):
            if enabled:
                lib.enable_progress_bar()


def _is_complete(directory: Path) -> bool:
    return (directory / BUILD_INFO_FILE).is_file() and (directory / "model_index.json").is_file()


def tiny_sd14_dir(cache_root: Path | None = None) -> Path:
    """Directory of the cached tiny model (`<cache_root>/models/tiny-sd14-v1`), built on first use.

    `cache_root` defaults to `f2d_bench.paths.cache_root()`. The model is built in a temporary sibling
    directory and renamed into place in one step, so concurrent builders and killed builds never leave
    a half-written model at the final path. Building takes about a second on two CPU cores, plus a few
    seconds of library imports in a fresh process.
    """
    root = Path(cache_root) if cache_root is not None else paths.cache_root()
    return paths.cached_build(root / "models" / TINY_SD14_NAME, build_tiny_sd14, _is_complete)

"""Full-size Stable Diffusion 1.4 with random weights, for GPU throughput benchmarks.

A denoising step costs the same whatever the weight values, so timing this pipeline measures what
timing the real `CompVis/stable-diffusion-v1-4` would, without its 4 GB download. Images from it are noise.

The configs below are SD 1.4's published `unet/`, `text_encoder/`, `vae/` and `scheduler/` config.json
values, written as plain dicts. Parameter counts (a check in the tests): UNet 859,520,964,
text encoder 123,060,480, VAE 83,653,863.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

SD14_UNET_CONFIG = {
    "sample_size": 64,  # latents of 64x64 -> 512x512 images
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' historical name: SD 1.x has 8 heads per attention layer
}

SD14_TEXT_ENCODER_CONFIG = {
    # CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14).
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    # SD 1.4's config keeps these legacy ids; with eos_token_id == 2 transformers pools at argmax(input_ids),
    # which is the <|endoftext|> position. SD uses the last hidden state, not the pooled output.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SD14_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],  # four blocks -> three downsamplings -> factor 8
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD14_SCHEDULER_CONFIG = {
    # SD 1.4 ships a PNDM config; the protocol swaps in EulerAncestral built from it (same betas).
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

SD14_PARAMETER_COUNTS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}


def sd14_component_configs() -> dict:
    """SD 1.4's component configs: keys "unet", "text_encoder", "vae", "scheduler" (deep copies)."""
    return copy.deepcopy(
        {
            "unet": SD14_UNET_CONFIG,
            "text_encoder": SD14_TEXT_ENCODER_CONFIG,
            "vae": SD14_VAE_CONFIG,
            "scheduler": SD14_SCHEDULER_CONFIG,
        }
    )


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
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from f2d_bench.pipelines.loading import resolve_device, resolve_dtype

    torch_device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device) if isinstance(dtype, str) else dtype
    if tokenizer_dir is None:
        from f2d_bench.pipelines.tiny import tiny_sd14_dir

        tokenizer_dir = tiny_sd14_dir() / "tokenizer"

    modules = build_sd14_components(torch_dtype, torch_device)
    pipe = StableDiffusionPipeline(
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77),
        unet=modules["unet"],
        scheduler=EulerAncestralDiscreteScheduler.from_config(SD14_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

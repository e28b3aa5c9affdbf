"""Stable Diffusion 1.4's published component configs and its pipeline assembly (`sd14_pipeline`),
shared by the random full-size build (`random_sd14`) and the tiny stand-in (`tiny`), which keeps SD 1.4's
architecture family and scheduler. Imports nothing from either.

The dicts are SD 1.4's `unet/`, `text_encoder/`, `vae/` and `scheduler/` config.json values. Parameter
counts (a check in the tests): UNet 859,520,964, text encoder 123,060,480, VAE 83,653,863.
"""

from __future__ import annotations

import copy
from pathlib import Path

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


def sd14_pipeline(unet, text_encoder, vae, tokenizer_dir: Path):
    """A `StableDiffusionPipeline` of these modules with SD 1.4's sampling: EulerAncestral on SD 1.4's
    betas, the CLIP tokenizer of `tokenizer_dir` (77 tokens), no safety checker."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77),
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(SD14_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

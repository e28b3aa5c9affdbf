"""Text fidelity: CLIP score, directional CLIP and SigLIP (pure functions) and their open_clip models."""

from f2d_bench.scorers.text.clip_models import (
    CLIP_MODEL_NAME,
    CLIP_PRETRAINED,
    SIGLIP_MODEL_NAME,
    SIGLIP_PRETRAINED,
    ClipBundle,
    image_embeds,
    load_clip,
    register_preprocess,
    text_embeds,
)
from f2d_bench.scorers.text.similarity import clip_score, directional_clip, siglip_scores

__all__ = [
    "CLIP_MODEL_NAME",
    "CLIP_PRETRAINED",
    "SIGLIP_MODEL_NAME",
    "SIGLIP_PRETRAINED",
    "ClipBundle",
    "clip_score",
    "directional_clip",
    "image_embeds",
    "load_clip",
    "register_preprocess",
    "siglip_scores",
    "text_embeds",
]

"""Text-fidelity metrics as pure functions of embedding tensors (no model, no I/O).

Embeddings are rows of a 2-D float tensor of shape (n, d). Each function L2-normalises its inputs itself,
so it accepts raw or already normalised embeddings and gives the same result. Inputs whose row counts
differ broadcast when one side has a single row (one prompt against n images, one reference image against
n generated ones). Results are float32 tensors on the inputs' device.

The values are raw cosines, on the scale of the paper's Table 1 (CLIP 0.17-0.26, SigLIP 0.07-0.39): not
multiplied by 2.5 or 100 as some CLIP-score implementations do.
"""

from __future__ import annotations

import math

import torch

# A difference vector of two unit embeddings shorter than this has no usable direction; see directional_clip.
DEGENERATE_NORM = 1e-6


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """`x` as float32 rows of length 1, shape (n, d); a 1-D input is one row. Raises on zero rows."""
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d) or (d,), got {tuple(x.shape)}")
    x = x.float()
    norms = x.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        # A zero embedding has no direction; a cosine with it is meaningless, and a model never outputs one.
        raise ValueError(f"{name} contains an all-zero embedding, which cannot be normalised")
    return x / norms


def _broadcast_rows(*named: tuple[str, torch.Tensor]) -> list[torch.Tensor]:
    """Expand single-row tensors to the common row count; raise when counts or widths disagree."""
    rows = {t.shape[0] for _, t in named}
    widths = {t.shape[1] for _, t in named}
    if len(widths) > 1:
        sizes = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in named)
        raise ValueError(f"embedding widths differ ({sizes})")
    n = max(rows)
    if rows - {1, n}:
        sizes = ", ".join(f"{n_}: {tuple(t.shape)}" for n_, t in named)
        raise ValueError(f"row counts differ and none is 1, so they cannot be paired ({sizes})")
    return [t.expand(n, -1) for _, t in named]


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image with its text: shape (n,), values in [-1, 1].

    `image_embeds` (n, d) and `text_embeds` (n, d) are paired row by row; either may have one row.
    This is both the CLIP score and the SigLIP score of the protocol (raw cosine, not x2.5 or x100).
    """
    img, txt = _broadcast_rows(("image_embeds", _unit_rows(image_embeds, "image_embeds")),
                               ("text_embeds", _unit_rows(text_embeds, "text_embeds")))
    return (img * txt).sum(dim=-1).clamp(-1.0, 1.0)


def directional_clip(
    gen_image_embeds: torch.Tensor,
    ref_image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    ref_text_embeds: torch.Tensor,
) -> torch.Tensor:
    """Directional CLIP (dCLIP): shape (n,), values in [-1, 1].

    dCLIP = cos(E_I(gen) - E_I(ref_image), E_T(prompt) - E_T(ref_text)), each embedding L2-normalised
    BEFORE the differences are taken (StyleGAN-NADA; InstructPix2Pix's clip_similarity). In the protocol
    the reference image is generated from "a photo of S*" and the reference text is "A photo of a person".
    All four inputs are (n, d) or (1, d).

    Degenerate case: when either difference is shorter than `DEGENERATE_NORM` (the generated image embeds
    exactly like its reference, or the prompt equals the reference text) the direction is undefined and
    the result is 0.0, "no edit along the text's direction", rather than NaN, which would poison every
    mean and per-image hMean computed from it. Noise-level differences just above the threshold still give
    an arbitrary sign: it is a measure of direction, not of magnitude.
    """
    gen, ref, txt, ref_txt = _broadcast_rows(
        ("gen_image_embeds", _unit_rows(gen_image_embeds, "gen_image_embeds")),
        ("ref_image_embeds", _unit_rows(ref_image_embeds, "ref_image_embeds")),
        ("text_embeds", _unit_rows(text_embeds, "text_embeds")),
        ("ref_text_embeds", _unit_rows(ref_text_embeds, "ref_text_embeds")),
    )
    d_img = gen - ref
    d_txt = txt - ref_txt
    n_img = d_img.norm(dim=-1)
    n_txt = d_txt.norm(dim=-1)
    degenerate = (n_img < DEGENERATE_NORM) | (n_txt < DEGENERATE_NORM)
    # Dividing by a clamped norm keeps degenerate rows finite; they are overwritten with 0.0 below.
    cos = (d_img * d_txt).sum(dim=-1) / (n_img * n_txt).clamp_min(DEGENERATE_NORM**2)
    return torch.where(degenerate, torch.zeros_like(cos), cos.clamp(-1.0, 1.0))


def siglip_scores(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's cosine (n,) in [-1, 1] and its pairwise match probability (n,) in (0, 1).

    probability = sigmoid(cosine * exp(logit_scale) + logit_bias). `logit_scale` is the LOG of the
    multiplier, as SigLIP checkpoints store it (big_vision's `t`, open_clip's and transformers'
    `logit_scale` parameter); `logit_bias` is used as stored. The cosine is the comparable score of the
    protocol; the probability can be recorded beside it.
    """
    cosine = clip_score(image_embeds, text_embeds)
    scale = math.exp(float(logit_scale))
    probability = torch.sigmoid(cosine * scale + float(logit_bias))
    return cosine, probability

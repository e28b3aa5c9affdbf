"""FastComposer's modules and its released checkpoint layout, on transformers 5.x and diffusers 0.42.

The official ``FastComposerModel`` (fastcomposer/model.py) holds five parts; its ``pytorch_model.bin``
(Hugging Face ``mit-han-lab/fastcomposer``) is that model's whole state dict:

- ``text_encoder.*``: a CLIP text transformer saved without the ``text_model.`` level (the official
  wrapper hangs ``embeddings``, ``encoder`` and ``final_layer_norm`` off itself), which is exactly the
  key layout of transformers 5.x's ``CLIPTextModel``; plus an int64 ``embeddings.position_ids`` buffer
  (persistent in the transformers 4.x that wrote the file, not in 5.x).
- ``image_encoder.vision_model.*`` and ``image_encoder.visual_projection.weight``: CLIP ViT-L/14's vision
  tower and projection (``CLIPVisionModelWithProjection``'s layout), plus ``position_ids`` likewise.
- ``vae.*``: SD 1.5's VAE with the old attention names (``query``/``key``/``value``/``proj_attn``, now
  ``to_q``/``to_k``/``to_v``/``to_out.0``). It was frozen in training and the official inference decodes
  with the base pipeline's VAE, so it is checked here (keys and shapes) and not kept.
- ``unet.*``: the fine-tuned UNet (diffusers' ``UNet2DConditionModel`` names, unchanged since).
- ``postfuse_module.*``: the MLP that fuses the image embedding into the class word's text embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from f2d_bench.errors import ModelUnavailableError
from f2d_bench.weights import key_listing, read_torch_file

#: Where the released weights are published (one file holding the whole model).
PUBLISHED = ("FastComposer's weights are published as pytorch_model.bin (4.5 GB) in the Hugging Face repository "
             "mit-han-lab/fastcomposer (https://huggingface.co/mit-han-lab/fastcomposer); set the method's "
             "`weights` param to that file.")

#: openai/clip-vit-large-patch14's vision tower (the official ``--image_encoder_name_or_path``);
#: ``projection_dim`` always follows the text encoder's width (768 for SD 1.x).
VIT_L_14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
#: The CLIP normalisation of the official ``FastComposerCLIPImageEncoder``.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The last vision layers trained with the UNet (``--image_encoder_trainable_layers 2``).
TRAINED_VISION_LAYERS = 2

PARTS = ("text_encoder", "image_encoder", "vae", "unet", "postfuse_module")
# diffusers' renames of the VAE attention block (old name -> current name).
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_POSITION_IDS = ("text_encoder.embeddings.position_ids", "image_encoder.vision_model.embeddings.position_ids")


class CheckpointLayoutError(ModelUnavailableError):
    """A FastComposer weight file whose keys or shapes are not the released model's."""


class MLP(nn.Module):
    """The official MLP block: LayerNorm(in), Linear(in, hidden), GELU, Linear(hidden, out), optional residual."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool = True):
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return y + x if self.use_residual else y


class PostfuseModule(nn.Module):
    """``FastComposerPostfuseModule``: (class-word text embedding t, image embedding o), both (N, d) ->
    fused word embedding (N, d) = LayerNorm(mlp2(mlp1([t, o]) + t))."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse(self, text_embeds: torch.Tensor, object_embeds: torch.Tensor) -> torch.Tensor:
        x = self.mlp1(torch.cat([text_embeds, object_embeds], dim=-1)) + text_embeds
        return self.layer_norm(self.mlp2(x))

    def forward(self, text_embeds: torch.Tensor, object_embeds: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """text_embeds (B, L, d) text-encoder output; object_embeds (B, d) one image embedding per row;
        token_mask (B, L) bool with exactly one True per row (the class word). Returns a new (B, L, d)
        tensor whose masked positions hold the fused embeddings; every other position is unchanged."""
        counts = token_mask.sum(dim=1)
        if not bool((counts == 1).all()):
            raise ValueError(f"token_mask must mark exactly one position per row, got counts {counts.tolist()}")
        out = text_embeds.clone()
        out[token_mask] = self.fuse(text_embeds[token_mask], object_embeds.to(text_embeds.dtype))
        return out


@dataclass(frozen=True)
class Configs:
    """The configs that decide every shape: text encoder and vision tower (transformers config objects),
    UNet and VAE (diffusers config dicts)."""

    text: Any
    vision: Any
    unet: Mapping[str, Any]
    vae: Mapping[str, Any]


def vision_config(text_width: int, overrides: Mapping[str, Any] | None = None):
    """CLIPVisionConfig of the image encoder: ViT-L/14 (``overrides`` None), its projection to ``text_width``."""
    from transformers import CLIPVisionConfig

    values = dict(VIT_L_14 if overrides is None else {**VIT_L_14, **overrides})
    values["projection_dim"] = int(text_width)
    return CLIPVisionConfig(**values)


class FastComposerModel(nn.Module):
    """What FastComposer renders with: its text encoder, image encoder, UNet and post-fuse MLP.

    (The checkpoint's fifth part, the VAE, is only checked: see the module docstring.)
    """

    def __init__(self, configs: Configs):
        super().__init__()
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPVisionModelWithProjection

        width = int(configs.text.hidden_size)
        if int(configs.vision.projection_dim) != width:
            raise ValueError(f"the image encoder projects to {configs.vision.projection_dim}, the text encoder is "
                             f"{width} wide: the post-fuse MLP needs both equal")
        self.configs = configs
        self.text_encoder = CLIPTextModel(configs.text)
        self.image_encoder = CLIPVisionModelWithProjection(configs.vision)
        self.unet = UNet2DConditionModel.from_config(dict(configs.unet))
        self.postfuse_module = PostfuseModule(width)

    @property
    def image_size(self) -> int:
        return int(self.configs.vision.image_size)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) in [0, 1] -> image embeddings (N, d): resized to the tower's input size
        when needed (bilinear, antialiased), CLIP-normalised, pooled CLS token, visual projection."""
        size = self.image_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, (size, size), mode="bilinear", antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        return self.image_encoder(pixel_values=(pixels - mean) / std).image_embeds


def configs_of(pipe, vision_overrides: Mapping[str, Any] | None = None) -> Configs:
    """The configs of a FastComposer model for a base pipeline (its text encoder, UNet and VAE shapes)."""
    text = pipe.text_encoder.config
    return Configs(text=text, vision=vision_config(text.hidden_size, vision_overrides),
                   unet=dict(pipe.unet.config), vae=dict(pipe.vae.config))


# --- parameter counts ------------------------------------------------------------------------------------

def parameter_counts(configs: Configs) -> dict[str, int]:
    """Parameters per part, counted on the meta device (no memory, no initialisation).

    ``trained``: what the official training updates (Table 2's #Params): the UNet, the post-fuse MLP and
    the last :data:`TRAINED_VISION_LAYERS` layers of the vision tower; the text encoder, the rest of the
    vision tower and the VAE were frozen (scripts/run_training.sh: no ``--train_text_encoder``).
    """
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = FastComposerModel(configs)
        vae = AutoencoderKL.from_config(dict(configs.vae))

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    layers = model.image_encoder.vision_model.encoder.layers
    counts = {"text_encoder": count(model.text_encoder), "image_encoder": count(model.image_encoder),
              "unet": count(model.unet), "postfuse_module": count(model.postfuse_module), "vae": count(vae)}
    counts["trained_vision_layers"] = sum(count(layer) for layer in layers[-TRAINED_VISION_LAYERS:])
    counts["trained"] = counts["unet"] + counts["postfuse_module"] + counts["trained_vision_layers"]
    return counts


# --- the official checkpoint layout ------------------------------------------------------------------------

def official_vae_key(key: str) -> str:
    """A diffusers 0.42 VAE key -> the name the released file uses (old attention-block names)."""
    parts = key.split(".")
    if "attentions" in parts:
        head = ".".join(parts[:-1])
        for old, new in _VAE_ATTENTION.items():
            if head.endswith("." + new):
                return head[: -len(new)] + old + "." + parts[-1]
    return key


def official_layout(model: FastComposerModel) -> dict[str, tuple[tuple[int, ...], str]]:
    """Official key -> (shape, project key or "" for the position-id buffers, "vae:<key>" for the VAE)."""
    from diffusers import AutoencoderKL

    layout: dict[str, tuple[tuple[int, ...], str]] = {}
    for key, value in model.state_dict().items():
        layout[key] = (tuple(value.shape), key)
    layout[_POSITION_IDS[0]] = ((1, int(model.configs.text.max_position_embeddings)), "")
    patches = (int(model.configs.vision.image_size) // int(model.configs.vision.patch_size)) ** 2
    layout[_POSITION_IDS[1]] = ((1, patches + 1), "")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(dict(model.configs.vae))
    for key, value in vae.state_dict().items():
        layout["vae." + official_vae_key(key)] = (tuple(value.shape), "vae:" + key)
    return layout


def check_official(state: Mapping[str, Any], model: FastComposerModel, source: str) -> dict[str, torch.Tensor]:
    """The model's tensors (project keys) from a state dict in the released layout, after checking that
    no key is missing or extra and every shape fits; CheckpointLayoutError names the offending keys as
    the file names them. The position ids must be 0..n-1; the VAE's tensors are checked and dropped."""
    if not isinstance(state, Mapping):
        raise CheckpointLayoutError(f"{source}: expected a state dict (key -> tensor), got {type(state).__name__}")
    layout = official_layout(model)
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout]
    wrong = []
    for key, value in state.items():
        if key not in layout:
            continue
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{key} (not a tensor)")
        elif tuple(value.shape) != layout[key][0]:
            wrong.append(f"{key} {list(value.shape)} (expected {list(layout[key][0])})")
        elif key in _POSITION_IDS and not torch.equal(value.long().flatten(), torch.arange(value.numel())):
            wrong.append(f"{key} (not 0..{value.numel() - 1})")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {key_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {key_listing(unexpected)}")
        if wrong:
            parts.append(f"wrong tensors {key_listing(wrong)}")
        raise CheckpointLayoutError(
            f"{source} is not the released FastComposer model for this base ({len(layout)} tensors expected: "
            f"{', '.join(p + '.*' for p in PARTS)}): " + "; ".join(parts))
    return {target: state[key] for key, (_, target) in layout.items() if target and not target.startswith("vae:")}


def load_official(model: FastComposerModel, path: Path) -> FastComposerModel:
    """Read ``pytorch_model.bin`` (tensors only) and load it strictly into ``model``; returns it in eval mode."""
    state = read_torch_file(Path(path), error=CheckpointLayoutError)
    tensors = check_official(state, model, f"FastComposer weights {str(path)!r}")
    model.load_state_dict(tensors, strict=True)
    return model.eval()

"""Load CLIP and SigLIP through open_clip, and embed images and texts with them.

One loading path for every source: a pretrained TAG (`openai`, `webli`) is first resolved to a local file
(the Hugging Face cache, downloading when allowed), a local checkpoint PATH is used as is, and both are
then loaded by `open_clip.create_model_and_transforms(model_name, pretrained=<file>)` with strict key
checking. The tiny models of `f2d_bench.scorers.text.tiny` go through the same path.

Defaults (the paper does not name its checkpoints; see PROTOCOL.md section 2):
- CLIP: `ViT-L-14-quickgelu` + `openai`, FastComposer's choice. CelebBasis used ViT-B/32
  (`ViT-B-32-quickgelu` + `openai`). OpenAI weights need QuickGELU, hence the `-quickgelu` names.
- SigLIP: `ViT-SO400M-14-SigLIP-384` + `webli` (`ViT-B-16-SigLIP` + `webli` is the small alternative).

Where open_clip 3.3 gets the weights: every tag it knows names a Hugging Face repo (`openai` ViT-L/14:
`timm/vit_large_patch14_clip_224.openai`; `webli` SO400M: `timm/ViT-SO400M-14-SigLIP-384`), file
`open_clip_model.safetensors` or `open_clip_pytorch_model.bin`. SigLIP's tokenizer is a Hugging Face
tokenizer too (`hf_tokenizer_name` in the model config; `timm/ViT-B-16-SigLIP` for SO400M); CLIP's BPE
tokenizer ships inside the open_clip wheel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from f2d_bench.devices import hub_offline, resolve_device
from f2d_bench.errors import ConfigError, ModelUnavailableError
from f2d_bench.scorers.text import tiny

CLIP_MODEL_NAME = "ViT-L-14-quickgelu"
CLIP_PRETRAINED = "openai"
SIGLIP_MODEL_NAME = "ViT-SO400M-14-SigLIP-384"
SIGLIP_PRETRAINED = "webli"

_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
# open_clip's file names inside a tag's Hugging Face repo when the tag names only the repo, safest first.
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_TOKENIZER_FILES = "tokenizer.json tokenizer_config.json special_tokens_map.json"  # timm's SigLIP repos

# Preprocessing for models that have no pretrained tag to take it from (registered custom configs),
# the tiny models' to start with: read from the builder, which imports nothing from here.
_REGISTERED_PREPROCESS: dict[str, dict[str, Any]] = dict(tiny.PREPROCESS)


@dataclass(frozen=True)
class ClipBundle:
    """A loaded open_clip model with what is needed to embed with it.

    `model` is in eval mode with gradients off; `preprocess` maps a PIL image to a (3, H, W) tensor;
    `tokenizer` maps a list of strings to a (n, context_length) LongTensor, always padded to the context
    length. `pretrained` is the tag or path as given; `checkpoint` the local file actually loaded.
    """

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_name: str
    pretrained: str
    checkpoint: str = ""
    device: torch.device = torch.device("cpu")

    @property
    def embed_dim(self) -> int:
        """Width d of the joint embedding space."""
        import open_clip

        return int(open_clip.get_model_config(self.model_name)["embed_dim"])

    @property
    def context_length(self) -> int:
        """Number of token positions every text is padded or truncated to (77 for CLIP, 64 for SigLIP)."""
        return int(self.model.context_length)

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """Image preprocessing (size, mean, std, interpolation, resize_mode): part of what a score means."""
        return dict(self.model.visual.preprocess_cfg)

    @property
    def logit_scale(self) -> float:
        """The stored logit scale: the LOG of the multiplier applied to cosines (CLIP and SigLIP alike)."""
        return float(self.model.logit_scale.detach().reshape(-1)[0])

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's logit bias; None for CLIP models, which have none."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().reshape(-1)[0])

    @property
    def is_siglip(self) -> bool:
        """True for sigmoid-loss models (they have a logit bias)."""
        return self.logit_bias is not None


def register_preprocess(model_name: str, **preprocess: Any) -> None:
    """Declare the image preprocessing of a custom registered config (mean, std, interpolation, resize_mode).

    Used for local checkpoints of models that have no pretrained tag to take it from (the tiny models'
    is declared in `tiny.PREPROCESS`).
    """
    unknown = sorted(set(preprocess) - set(_PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f"unknown preprocessing keys {unknown}; valid: {', '.join(_PREPROCESS_KEYS)}")
    _REGISTERED_PREPROCESS[model_name] = dict(preprocess)


def load_clip(
    model_name: str,
    pretrained: str,
    device: str | torch.device = "cpu",
    *,
    preprocess_tag: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ClipBundle:
    """Load an open_clip model (CLIP or SigLIP) with its preprocessing and tokenizer.

    `model_name` is an open_clip config name (`open_clip.list_models()`, or one registered with
    `open_clip.add_model_config`). `pretrained` is an open_clip tag for that model (`openai`, `webli`, ...)
    or the path of a local checkpoint file (.safetensors, .bin, .pt, .pth; loaded strictly: a missing or
    unexpected key, another shape, a positional embedding of another length (which open_clip would
    interpolate) or a SigLIP file without logit_bias is an error; whether a local file's weights need
    QuickGELU cannot be told from them, so the model name must say it). `device`: "cpu", "cuda", "cuda:N" or "auto".

    Image preprocessing comes from the tag. For a local file it comes from `preprocess_tag` when given,
    else from `register_preprocess`, else from the model's tags when they all agree (so a local SigLIP
    file gets SigLIP's squash resize and mean/std 0.5), else open_clip's defaults (OpenAI CLIP's).
    `cache_dir` is the Hugging Face cache to read and download into (default: the standard one,
    `$HF_HUB_CACHE` or `~/.cache/huggingface/hub`).

    Raises ConfigError for an unknown model name or tag, a tag whose weights need QuickGELU on a model
    without it, or a checkpoint that does not fit the model; ModelUnavailableError when the weights or the
    tokenizer are neither local nor downloadable, with what to do about it.
    """
    import open_clip

    device = resolve_device(device)
    tiny.ensure_registered(model_name)
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ConfigError(
            f"unknown open_clip model {model_name!r}; see open_clip.list_models() for the built-in names "
            f"(defaults: CLIP {CLIP_MODEL_NAME!r}, SigLIP {SIGLIP_MODEL_NAME!r})"
        )
    if not pretrained:
        raise ConfigError(
            f"no weights given for {model_name!r}: pass a pretrained tag "
            f"({_known_tags(model_name)}) or a local checkpoint path"
        )
    pretrained = str(pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        _check_quick_gelu(model_name, pretrained, model_cfg, tag_cfg)
        try:
            checkpoint = _fetch_tag_weights(model_name, pretrained, tag_cfg, cache_dir)
        except ModelUnavailableError as exc:
            raise ModelUnavailableError(f"{exc}{_tokenizer_note(model_cfg)}") from exc.__cause__
        preprocess_cfg = _tag_preprocess(tag_cfg)
    else:
        checkpoint = _local_checkpoint(model_name, pretrained)
        preprocess_cfg = _local_preprocess(model_name, preprocess_tag)
    tokenizer = _load_tokenizer(model_name, model_cfg, cache_dir)  # before the weights: it fails faster

    # A local file is loaded after the model is built (below): built without it, the towers must not
    # fetch their default weights (an HF text tower would download them), and open_clip's warning that
    # the model was initialised randomly is not true of the model this returns.
    empty = {} if tag_cfg else {"pretrained_text": False, "pretrained_image": False}
    try:
        with _without_random_init_warning(enabled=not tag_cfg):
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=checkpoint if tag_cfg else None,
                device=device,
                image_mean=preprocess_cfg.get("mean"),
                image_std=preprocess_cfg.get("std"),
                image_interpolation=preprocess_cfg.get("interpolation"),
                image_resize_mode=preprocess_cfg.get("resize_mode"),
                **empty,
            )
        if not tag_cfg:  # what create_model does with a path, after checking what it would repair
            _check_local_fit(model, checkpoint, model_name)
            open_clip.load_checkpoint(model, checkpoint, strict=True)
    except ConfigError:
        raise
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        # Key or shape mismatches (strict load), or open_clip tripping over another model's keys.
        mismatch = any(s in text for s in ("Missing key", "Unexpected key", "size mismatch"))
        if mismatch or isinstance(exc, (AttributeError, KeyError, TypeError)):
            raise ConfigError(
                f"checkpoint {checkpoint} does not fit open_clip model {model_name!r} (wrong model name, or "
                f"an incomplete file?): {_first_lines(text)}"
            ) from exc
        raise ModelUnavailableError(
            f"checkpoint {checkpoint} for {model_name!r} could not be read ({_first_lines(text)}); "
            "download it again"
        ) from exc
    model.eval().requires_grad_(False)
    return ClipBundle(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        model_name=model_name,
        pretrained=pretrained,
        checkpoint=str(checkpoint),
        device=device,
    )


@torch.inference_mode()
def image_embeds(bundle: ClipBundle, images: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
    """L2-normalised image embeddings: float32 tensor (n, d) on the CPU, one row per PIL image."""
    rows = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([bundle.preprocess(im) for im in images[start : start + batch_size]])
        feats = bundle.model.encode_image(pixels.to(bundle.device))
        rows.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(rows) if rows else torch.empty(0, bundle.embed_dim)


@torch.inference_mode()
def text_embeds(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised text embeddings: float32 tensor (n, d) on the CPU, one row per string.

    Every text is padded to the model's context length (open_clip's tokenizers do; checked here because
    SigLIP pools the LAST position, so its embedding of a short text is only right when padded).
    """
    rows = []
    for start in range(0, len(texts), batch_size):
        tokens = bundle.tokenizer(list(texts[start : start + batch_size]))
        if tokens.shape[-1] != bundle.context_length:
            raise RuntimeError(
                f"tokenizer of {bundle.model_name!r} returned {tokens.shape[-1]} positions, the model "
                f"expects {bundle.context_length}"
            )
        feats = bundle.model.encode_text(tokens.to(bundle.device))
        rows.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(rows) if rows else torch.empty(0, bundle.embed_dim)


# --- resolving weights -------------------------------------------------------------------------------


def _known_tags(model_name: str) -> str:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    return "known tags: " + (", ".join(tags) if tags else "none")


def _check_quick_gelu(model_name: str, tag: str, model_cfg: dict, tag_cfg: dict) -> None:
    # open_clip only warns here, and the model then computes subtly wrong embeddings.
    if tag_cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
        raise ConfigError(
            f"the {tag!r} weights of {model_name!r} were trained with QuickGELU but this config uses GELU: "
            f"use {model_name + '-quickgelu'!r}"
        )


def _fetch_tag_weights(model_name: str, tag: str, tag_cfg: dict, cache_dir) -> str:
    """Local path of a tag's weights: from the Hugging Face cache, downloaded unless offline."""
    if tag_cfg.get("file"):
        return str(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        # Only tags without a Hub copy remain (none among the defaults); open_clip fetches them by URL.
        from open_clip.pretrained import download_pretrained

        try:
            return download_pretrained(tag_cfg, cache_dir=cache_dir)
        except Exception as exc:
            raise ModelUnavailableError(
                f"{model_name!r} weights {tag!r} could not be downloaded from {tag_cfg.get('url')}: {exc}\n"
                "Download the file elsewhere and pass its local path as `pretrained`."
            ) from exc

    from huggingface_hub import hf_hub_download

    # open_clip's convention: "org/repo/file.bin" names one file, "org/repo/" the repo's default names.
    repo_id, filename = posixpath.split(hub)
    candidates = [filename] if filename else list(_HF_WEIGHT_FILES)
    if filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[: -len(Path(filename).suffix)] + ".safetensors")
    offline = hub_offline()
    errors = []
    for name in candidates:
        try:
            return hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=offline)
        except Exception as exc:  # not cached, not on the Hub, or the Hub unreachable: try the next name
            errors.append(f"{name}: {type(exc).__name__}")
    reason = "HF_HUB_OFFLINE is set and they are not in the cache" if offline else "; ".join(errors)
    raise ModelUnavailableError(_unavailable_message(model_name, tag, repo_id, candidates, reason, cache_dir))


def _unavailable_message(
    model_name: str, tag: str, repo_id: str, files: list[str], reason: str, cache_dir
) -> str:
    cache = str(cache_dir) if cache_dir else "the Hugging Face cache (~/.cache/huggingface/hub)"
    lines = [
        f"open_clip model {model_name!r} with pretrained weights {tag!r} is not available: open_clip gets "
        f"them from the Hugging Face repo {repo_id!r} ({' or '.join(files)}), and {reason}.",
        "To make them available:",
        f"  - on a machine with access to huggingface.co run "
        f"`hf download {repo_id} --include 'open_clip_*'` and copy {cache} to this machine, then set "
        "HF_HUB_OFFLINE=1 to load from it without contacting the Hub; or",
        f"  - download {files[0]} from that repo anywhere and pass the file's local path as `pretrained` "
        f"(model name {model_name!r} unchanged).",
    ]
    return "\n".join(lines)


def _tokenizer_note(model_cfg: dict) -> str:
    """For models whose tokenizer is a Hub download too (SigLIP): say so beside the weights."""
    hf_name = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name", "")
    if not hf_name or Path(hf_name).is_dir():
        return ""
    return (
        f"\nIts tokenizer is the Hugging Face tokenizer {hf_name!r}, needed with local weights too: "
        f"`hf download {hf_name} {_HF_TOKENIZER_FILES}`."
    )


def _local_checkpoint(model_name: str, pretrained: str) -> str:
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        raise ConfigError(
            f"pretrained {pretrained!r} for {model_name!r} is a directory; pass the checkpoint file inside "
            f"it (e.g. {_HF_WEIGHT_FILES[0]})"
        )
    if os.sep in pretrained or "/" in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        raise ModelUnavailableError(
            f"checkpoint file {pretrained!r} for open_clip model {model_name!r} does not exist. Pass the "
            f"path of an existing open_clip checkpoint, or a pretrained tag ({_known_tags(model_name)})."
        )
    raise ConfigError(
        f"pretrained {pretrained!r} is neither a tag of open_clip model {model_name!r} "
        f"({_known_tags(model_name)}) nor an existing checkpoint file"
    )


@contextlib.contextmanager
def _without_random_init_warning(enabled: bool):
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning (root logger)."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")

    root = logging.getLogger()
    if enabled:
        root.addFilter(keep)
    try:
        yield
    finally:
        if enabled:
            root.removeFilter(keep)


#: Tensors that open_clip's loader fits to the model instead of refusing a mismatch: positional
#: embeddings are interpolated to the model's resolution or context length (a ViT-L/14-336 file would
#: load into ViT-L-14). The file's shapes must equal the model's.
_FITTED_BY_OPEN_CLIP = ("positional_embedding", "visual.positional_embedding", "visual.trunk.pos_embed",
                        "text.positional_embedding")


def _check_local_fit(model, checkpoint: str, model_name: str) -> None:
    """ConfigError when a local checkpoint fits ``model`` only through open_clip's silent repairs: another
    positional-embedding shape, or no ``logit_bias`` for a SigLIP model (open_clip sets it to 0)."""
    shapes = _checkpoint_shapes(checkpoint)
    if shapes is None:  # not readable as tensors (e.g. a TorchScript archive): open_clip reads it itself
        return
    own = model.state_dict()
    wrong = [f"{k} is {shapes[k]} in the file, {tuple(own[k].shape)} in the model" for k in _FITTED_BY_OPEN_CLIP
             if k in shapes and k in own and shapes[k] != tuple(own[k].shape)]
    if "logit_bias" in own and "logit_bias" not in shapes:
        wrong.append("the file has no logit_bias, which every SigLIP checkpoint holds")
    if wrong:
        raise ConfigError(
            f"checkpoint {checkpoint} does not fit open_clip model {model_name!r}: {'; '.join(wrong)}. open_clip "
            "would have resized or filled it in; give the model name the checkpoint was trained as")


def _checkpoint_shapes(checkpoint: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape in a local open_clip checkpoint, as open_clip reads it (``state_dict``
    nesting and a ``module.`` prefix removed); None when it cannot be read as tensors. A .safetensors
    file is read for its header only."""
    if str(checkpoint).endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(checkpoint, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception:  # a damaged header: open_clip's own read says what is wrong with the file
            return None
    from f2d_bench.weights import WeightsLayoutError, read_torch_file

    try:
        state = read_torch_file(Path(checkpoint))
    except WeightsLayoutError:
        return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return {}
    return {(k[7:] if k.startswith("module.") else k): tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _tag_preprocess(tag_cfg: dict) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in tag_cfg.items() if k in _PREPROCESS_KEYS}


def _local_preprocess(model_name: str, preprocess_tag: str | None) -> dict[str, Any]:
    """Preprocessing for a local checkpoint: explicit tag, registered, or shared by all the model's tags."""
    import open_clip

    if preprocess_tag:
        cfg = open_clip.get_pretrained_cfg(model_name, preprocess_tag)
        if not cfg:
            raise ConfigError(
                f"preprocess_tag {preprocess_tag!r} is not a tag of {model_name!r} "
                f"({_known_tags(model_name)})"
            )
        return _tag_preprocess(cfg)
    if model_name in _REGISTERED_PREPROCESS:
        return dict(_REGISTERED_PREPROCESS[model_name])
    variants: dict[tuple, list[str]] = {}
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        pp = _tag_preprocess(open_clip.get_pretrained_cfg(model_name, tag))
        variants.setdefault(tuple(sorted(pp.items())), []).append(tag)
    if len(variants) > 1:
        groups = "; ".join(", ".join(tags) for tags in variants.values())
        raise ConfigError(
            f"the tags of {model_name!r} use different image preprocessing ({groups}); pass "
            "preprocess_tag= naming the tag your local checkpoint comes from"
        )
    return dict(next(iter(variants))) if variants else {}


def _load_tokenizer(model_name: str, model_cfg: dict, cache_dir):
    import open_clip

    hf_name = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name", "")
    if not hf_name:
        return open_clip.get_tokenizer(model_name)  # CLIP's BPE vocabulary ships with open_clip
    try:
        return open_clip.get_tokenizer(model_name, cache_dir=cache_dir, local_files_only=hub_offline())
    except (OSError, ValueError) as exc:
        cache = str(cache_dir) if cache_dir else "the Hugging Face cache"
        raise ModelUnavailableError(
            f"the tokenizer of open_clip model {model_name!r} is not available: it is the Hugging Face "
            f"tokenizer {hf_name!r} ({type(exc).__name__}: {_first_lines(str(exc), 1)}).\n"
            f"On a machine with access to huggingface.co run `hf download {hf_name} {_HF_TOKENIZER_FILES}` "
            f"and copy {cache} to this machine, then set HF_HUB_OFFLINE=1."
        ) from exc


def _first_lines(text: str, n: int = 3, limit: int = 600) -> str:
    """The first `n` lines of an error, on one line and at most `limit` characters (key lists are long)."""
    short = " | ".join(line.strip() for line in text.strip().splitlines()[:n])
    return short if len(short) <= limit else short[: limit - 3] + "..."

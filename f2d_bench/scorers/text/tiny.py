"""Tiny open_clip CLIP and SigLIP models, built locally, for tests and the offline smoke preset.

Each is an open_clip config registered under its own name (`open_clip.add_model_config`) plus a
safetensors checkpoint, so it loads through exactly the code that loads the real models:
`load_clip(name, pretrained=<checkpoint path>)`. Random weights: their scores carry no meaning.

- `f2d-tiny-clip-v1`: open_clip's `CLIP` class with QuickGELU (like `ViT-L-14-quickgelu`), the real
  49,408-token vocabulary and open_clip's own BPE tokenizer (context 77); ViT 32x32 px, patch 8.
- `f2d-tiny-siglip-v1`: open_clip's `CustomTextCLIP` with SigLIP's text tower settings (no causal mask,
  last-token pooling, projection bias, context 64), a logit bias, and a Hugging Face `SiglipTokenizer`
  whose sentencepiece model is trained here on a few sentences. Its vision tower is open_clip's own ViT
  (the real SigLIP uses a timm ViT with attention pooling, whose smallest size is far from tiny).
  Preprocessing as SigLIP's: squash resize, mean/std 0.5.

One-dimensional parameters (norm weights, biases, the class embedding; not the logit scale and bias) get
seeded noise on top of open_clip's initialisation: norms start as exactly 1 and 0, and a checkpoint
conversion that swapped or dropped them would otherwise go unnoticed.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch

from f2d_bench import paths
from f2d_bench.files import atomic_write_text

# Bump the suffix whenever a recipe below changes, so caches never serve an older build.
TINY_CLIP_NAME = "f2d-tiny-clip-v1"
TINY_SIGLIP_NAME = "f2d-tiny-siglip-v1"
TINY_SEED = 0
CHECKPOINT_FILE = "open_clip_model.safetensors"
TOKENIZER_DIR = "tokenizer"
BUILD_INFO_FILE = "f2d_bench_build.json"

_TINY_VISION_CFG = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}

TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": dict(_TINY_VISION_CFG),
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}

TINY_SIGLIP_CONFIG = {
    "embed_dim": 16,
    "init_logit_scale": math.log(10.0),  # SigLIP's initial values: logits = 10 * cos - 10
    "init_logit_bias": -10.0,
    "custom_text": True,
    "vision_cfg": dict(_TINY_VISION_CFG),
    "text_cfg": {
        "context_length": 64,
        "vocab_size": 64,  # >= the trained sentencepiece vocabulary
        "hf_tokenizer_name": "",  # set at registration: the absolute path of the built tokenizer
        "tokenizer_kwargs": {"clean": "canonicalize"},
        "width": 32,
        "heads": 4,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
    },
}

SIGLIP_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                     "resize_mode": "squash"}
#: Preprocessing of the tiny models that is not open_clip's default (OpenAI CLIP's); `clip_models` reads
#: it, as they have no pretrained tag to take it from.
PREPROCESS = {TINY_SIGLIP_NAME: SIGLIP_PREPROCESS}

_CONFIGS = {TINY_CLIP_NAME: TINY_CLIP_CONFIG, TINY_SIGLIP_NAME: TINY_SIGLIP_CONFIG}
_KINDS = {"clip": TINY_CLIP_NAME, "siglip": TINY_SIGLIP_NAME}

# Sentences for the tiny sentencepiece model: fixed, so the tokenizer is the same on every build.
_SPM_SENTENCES = [
    "a photo of a person",
    "a photo of a person as a doctor in a hospital",
    "a person riding a bicycle in the city",
    "a person laughing on the beach at sunset",
    "a close-up portrait of a smiling person",
    "a person cooking in a kitchen, wearing a chef hat",
    "an astronaut floating in space",
    "a person reading a book in a library",
    "a man playing the guitar on stage",
    "a woman painting a picture in a studio",
]


def _model_name(kind: str) -> str:
    if kind not in _KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; valid: {', '.join(_KINDS)}")
    return _KINDS[kind]


def _constructor_config(name: str) -> tuple[type, dict]:
    import open_clip

    cfg = json.loads(json.dumps(_CONFIGS[name]))  # deep copy
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    return cls, cfg


def build_tiny_model(kind: str, directory: Path, seed: int = TINY_SEED) -> Path:
    """Build the tiny `kind` ("clip" or "siglip") model into `directory`; return the checkpoint path.

    Weights depend only on `seed` (the caller's global RNG state is left untouched). Writes the
    safetensors checkpoint, for SigLIP the tokenizer folder, and a build-info file. Does not register.
    """
    from safetensors.torch import save_file

    name = _model_name(kind)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cls, cfg = _constructor_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**cfg)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for pname, param in sorted(model.named_parameters()):
                if param.ndim <= 1 and not pname.startswith("logit_"):
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    checkpoint = directory / CHECKPOINT_FILE
    save_file(state, str(checkpoint), metadata={"format": "pt"})
    if kind == "siglip":
        write_tiny_siglip_tokenizer(directory / TOKENIZER_DIR)
    info = {"name": name, "seed": seed, "note": "random weights; scores carry no meaning"}
    (directory / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return checkpoint


def write_tiny_siglip_tokenizer(directory: Path) -> Path:
    """Train a tiny sentencepiece model on fixed sentences and save it as a Hugging Face SiglipTokenizer.

    Token ids as in SigLIP's T5 vocabulary: pad 0, eos 1, unk 2, no bos; SiglipTokenizer pads with eos.
    """
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SPM_SENTENCES * 10),
        model_writer=proto,
        model_type="unigram",
        vocab_size=TINY_SIGLIP_CONFIG["text_cfg"]["vocab_size"],
        hard_vocab_limit=False,  # a few sentences support fewer pieces; the vocabulary size is an upper bound
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,  # one thread: the same model on every machine
        minloglevel=2,
    )
    model_file = directory / "spiece.model"
    model_file.write_bytes(proto.getvalue())
    SiglipTokenizer(vocab_file=str(model_file), model_max_length=64).save_pretrained(str(directory))
    return directory


def _is_complete(directory: Path) -> bool:
    return (directory / BUILD_INFO_FILE).is_file() and (directory / CHECKPOINT_FILE).is_file()


def _built_dir(kind: str, cache_dir: Path | None) -> Path:
    """`<cache>/models/<name>`, built on first use in a temporary sibling and renamed into place."""
    root = Path(cache_dir) if cache_dir is not None else paths.cache_root()
    return paths.cached_build(root / "models" / _model_name(kind), lambda tmp: build_tiny_model(kind, tmp),
                              _is_complete)


def register_tiny_config(kind: str, directory: Path) -> str:
    """Register the tiny `kind` config with open_clip; return its model name.

    The config file is (re)written into `directory`, a built model folder, at registration rather than at
    build time, because the SigLIP config names its tokenizer folder by absolute path. A name registered
    again points at the latest `directory`.
    """
    import open_clip

    name = _model_name(kind)
    directory = Path(directory).resolve()
    cfg = json.loads(json.dumps(_CONFIGS[name]))
    if kind == "siglip":
        cfg["text_cfg"]["hf_tokenizer_name"] = str(directory / TOKENIZER_DIR)
    config_file = directory / f"{name}.json"
    atomic_write_text(config_file, json.dumps(cfg, indent=2))  # a concurrent reader never sees half of it
    open_clip.add_model_config(config_file)
    return name


def tiny_clip_checkpoint(cache_dir: Path | None = None, kind: str = "clip") -> tuple[str, Path]:
    """(model name, checkpoint path) of the cached tiny model, built and registered on first use.

    `kind` is "clip" or "siglip". `cache_dir` is the cache root (default `f2d_bench.paths.cache_root()`);
    the model lives in `<cache_dir>/models/<name>/`. Building takes about a second; concurrent builders
    and killed builds never leave a half-written model at the final path. Pass both values to
    `load_clip(name, path)`.
    """
    directory = _built_dir(kind, cache_dir)
    return register_tiny_config(kind, directory), directory / CHECKPOINT_FILE


def tiny_siglip_checkpoint(cache_dir: Path | None = None) -> tuple[str, Path]:
    """Shorthand for `tiny_clip_checkpoint(cache_dir, kind="siglip")`."""
    return tiny_clip_checkpoint(cache_dir, kind="siglip")


def ensure_registered(model_name: str) -> None:
    """Register a tiny model's config (building it in the default cache if needed) when open_clip lacks it.

    A no-op for every other name, and for a tiny name that is registered already.
    """
    import open_clip

    kind = {v: k for k, v in _KINDS.items()}.get(model_name)
    if kind is not None and open_clip.get_model_config(model_name) is None:
        tiny_clip_checkpoint(None, kind=kind)

"""Text-fidelity scorers: CLIP score, directional CLIP and SigLIP (raw cosines, Table 1's scale).

The prompt given to the text encoder is the prompt with S* written as the class phrase ("a person"):
the paper does not say what stands in for S*, and removing the identifier is what CelebBasis does.
Text embeddings are computed once per prompt; reference-image embeddings once per reference image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from f2d_bench.config import PRECISIONS
from f2d_bench.errors import ConfigError
from f2d_bench.scorers.base import RANDOM_WEIGHTS_NOTE, MetricSpec, ScoreItem, Scorer

TINY_MODEL = "tiny"


class _OpenClipScorer(Scorer):
    """Loads one open_clip model (official weights, a local checkpoint, or random weights).

    Settings: ``model`` (open_clip config name), ``pretrained`` (tag or local checkpoint path),
    ``weights`` (``official``, or ``random``: the model's architecture with seeded random weights;
    ``model: tiny`` selects the project's tiny model, for offline smoke runs whose tokenizer cannot
    be fetched).
    """

    precisions = PRECISIONS

    def __init__(self, settings, context):
        super().__init__(settings, context)
        if self.settings["weights"] not in ("official", "random"):
            raise ConfigError(f"scorer {self.name}: weights must be 'official' or 'random'")
        self._bundle = None
        self._text: dict[str, Any] = {}

    def note(self) -> str | None:
        if self.settings["weights"] == "random" or self.settings["model"] == TINY_MODEL:
            return RANDOM_WEIGHTS_NOTE
        return None

    def load(self) -> None:
        self.bundle()

    def bundle(self):
        if self._bundle is None:
            from f2d_bench.scorers.text.clip_models import load_clip

            model, pretrained = self.settings["model"], self.settings["pretrained"]
            if model == TINY_MODEL:
                from f2d_bench.scorers.text.tiny import tiny_clip_checkpoint

                model, path = tiny_clip_checkpoint(kind=self.name)  # "clip" or "siglip"
                pretrained = str(path)
            elif self.settings["weights"] == "random":
                pretrained = self._random_checkpoint(model)
            self._bundle = load_clip(model, pretrained, device=self.context.device)
        return self._bundle

    def _random_checkpoint(self, model_name: str) -> str:
        """A seeded random-weight checkpoint of ``model_name``'s architecture, cached, loaded like any file."""
        import open_clip
        import torch
        from safetensors.torch import save

        from f2d_bench.files import atomic_write_bytes
        from f2d_bench.paths import cache_root

        path = cache_root() / "models" / f"random-{model_name}-seed0.safetensors"
        if not path.is_file():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = open_clip.create_model(model_name, pretrained=None)
            atomic_write_bytes(path, save({k: v.contiguous() for k, v in model.state_dict().items()}))
        return str(path)

    def describe(self) -> dict:
        info = super().describe()
        if self.settings["model"] == TINY_MODEL:  # its own seeded random checkpoint, whatever else is set
            info["settings"] = {**info["settings"], "pretrained": None, "weights": "random"}
        if self._bundle is not None:
            info["preprocess"] = {k: str(v) for k, v in self._bundle.preprocess_cfg.items()}
            info["checkpoint"] = self._bundle.checkpoint
        return info

    def text_embeddings(self, texts: Sequence[str]):
        """The text embeddings of ``texts``, each computed in a batch that does not depend on which
        images came first: every text of the prompt set in one sorted batch, at the first call (a batch's
        size changes the model's float rounding, and a resumed score must give the same values)."""
        from f2d_bench.scorers.text.clip_models import text_embeds

        if not self._text:
            ps = self.context.prompt_set
            known = sorted({p.render(ps.class_phrase) for p in ps.all_prompts()})
            self._text.update(zip(known, text_embeds(self.bundle(), known)))
        for text in sorted(set(texts) - set(self._text)):  # outside the prompt set: alone
            self._text[text] = text_embeds(self.bundle(), [text])[0]
        import torch

        return torch.stack([self._text[t] for t in texts])

    def prompt_text(self, item: ScoreItem) -> str:
        return item.prompt.render(self.context.prompt_set.class_phrase)


class ClipScorer(_OpenClipScorer):
    """CLIP score (cosine of image and prompt) and directional CLIP against the reference image."""

    name = "clip"
    version = "1"
    metrics = (
        MetricSpec("clip", True, -1.0, 1.0, "cosine of CLIP image and prompt embeddings (S* -> 'a person')",
                   in_mean=True),
        MetricSpec("dclip", True, -1.0, 1.0,
                   "directional CLIP: cos(E_I(image) - E_I(reference image), E_T(prompt) - "
                   "E_T('a photo of a person')); empty for the reference images themselves", in_mean=True),
    )
    defaults = {"model": "ViT-L-14-quickgelu", "pretrained": "openai", "weights": "official"}

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self._ref_images: dict[Path, Any] = {}

    def reference_text(self) -> str:
        """dCLIP's reference text: the reference prompt with the class phrase ("a photo of a person")."""
        ps = self.context.prompt_set
        return ps.reference.render(ps.class_phrase)

    def _reference_embeddings(self, paths: Sequence[Path]):
        import torch

        from f2d_bench.scorers.text.clip_models import image_embeds

        # Each reference image alone (about one extra image per 40): in a batch of those the current
        # batch needed first, its embedding would depend on where a resumed score started.
        for p in sorted({p for p in paths if p not in self._ref_images}):
            self._ref_images[p] = image_embeds(self.bundle(), [self.context.read_image(p)])[0]
        return torch.stack([self._ref_images[p] for p in paths])

    def score(self, items: Sequence[ScoreItem]) -> list[dict[str, float]]:
        from f2d_bench.scorers.text.clip_models import image_embeds
        from f2d_bench.scorers.text.similarity import clip_score, directional_clip

        img = image_embeds(self.bundle(), [it.image for it in items])
        txt = self.text_embeddings([self.prompt_text(it) for it in items])
        clip = clip_score(img, txt).numpy()
        out = [{"clip": float(c), "dclip": np.nan} for c in clip]
        with_ref = [i for i, it in enumerate(items) if it.reference_path is not None]
        if with_ref:
            ref_img = self._reference_embeddings([items[i].reference_path for i in with_ref])
            ref_txt = self.text_embeddings([self.reference_text()])
            d = directional_clip(img[with_ref], ref_img, txt[with_ref], ref_txt).numpy()
            for row, i in enumerate(with_ref):
                out[i]["dclip"] = float(d[row])
        return out


class SiglipScorer(_OpenClipScorer):
    """SigLIP cosine of image and prompt, and its sigmoid match probability as an extra column."""

    name = "siglip"
    version = "1"
    metrics = (
        MetricSpec("siglip", True, -1.0, 1.0, "cosine of SigLIP image and prompt embeddings (S* -> 'a person')",
                   in_mean=True),
        MetricSpec("siglip_prob", True, 0.0, 1.0,
                   "SigLIP match probability sigmoid(cos * exp(logit_scale) + logit_bias)"),
    )
    defaults = {"model": "ViT-SO400M-14-SigLIP-384", "pretrained": "webli", "weights": "official"}

    def bundle(self):
        bundle = super().bundle()
        if not bundle.is_siglip:  # a CLIP model has no logit_bias: its "siglip_prob" would mean nothing
            raise ConfigError(f"scorer siglip: model {self.settings['model']!r} is not a SigLIP model (it has no "
                              "logit_bias); name one, e.g. ViT-SO400M-14-SigLIP-384 (the protocol's)")
        return bundle

    def score(self, items: Sequence[ScoreItem]) -> list[dict[str, float]]:
        from f2d_bench.scorers.text.clip_models import image_embeds
        from f2d_bench.scorers.text.similarity import siglip_scores

        bundle = self.bundle()
        img = image_embeds(bundle, [it.image for it in items])
        txt = self.text_embeddings([self.prompt_text(it) for it in items])
        cos, prob = siglip_scores(img, txt, bundle.logit_scale, bundle.logit_bias)
        return [{"siglip": float(c), "siglip_prob": float(p)} for c, p in zip(cos.numpy(), prob.numpy())]

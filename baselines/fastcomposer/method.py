"""``fastcomposer``: FastComposer (Xiao et al., IJCV 2024), tuning-free, one image embedding per face.

Per face (``prepare``, Table 2's time): the face-set image, padded to a square with black and resized to
224 (bilinear, antialiased, rounded to 8 bits as torchvision does on uint8), goes through the CLIP
ViT-L/14 image encoder (pooled CLS token, visual projection to the text width): one embedding per face.

Per batch (``generate``): each request's prompt is rendered with the subject "a <class word> img"; the
token ``img`` (added to a private copy of the tokenizer) is removed and marks the token before it, the
class word, whose text-encoder output the post-fuse MLP fuses with the face's embedding. Delayed subject
conditioning: the steps ``i <= (1 - alpha) * num_inference_steps`` use the text-only prompt (the prompt
with "img" removed), the later ones the fused prompt; the unconditional branch is the empty prompt.
Faces share a pipeline call. See README.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from baselines.fastcomposer.model import (
    PUBLISHED, FastComposerModel, configs_of, load_official, parameter_counts,
)
from f2d_bench.errors import ConfigError, F2DBenchError, ModelUnavailableError
from f2d_bench.faces.imageio import read_image
from f2d_bench.files import weights_sha256
from f2d_bench.methods.base import GenerationRequest, Method, MethodContext
from f2d_bench.weights import require_file

RANDOM = "random"
#: Seed of ``weights: random`` (image encoder and post-fuse MLP); part of the method's identity.
RANDOM_SEED = 0
#: The token the official evaluation writes after the class word (demo/pipeline.py, evaluation/run.py).
IMAGE_TOKEN = "img"
CLASS = "<class>"
#: Names the face-input procedure in the identity, so that a change to it gives new method ids.
FACE_INPUT = "pad-square-black/resize-bilinear-aa-uint8/clip-norm/vit-pooled-proj"


@dataclass(frozen=True, eq=False)
class FastComposerFace:
    """What ``prepare(face)`` returns: the face's image embedding (d,) float32 on the CPU, and its class word."""

    embedding: torch.Tensor
    class_word: str


def object_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """The official test transform: RGB uint8 -> pad to a square (black, (long - short) // 2 on both
    sides), resize to ``resolution`` (bilinear, antialiased, rounded back to uint8), then / 255.
    Returns (3, resolution, resolution) float32 in [0, 1]."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    _, h, w = x.shape
    if h > w:
        pad = (h - w) // 2
        x = F.pad(x, (pad, pad, 0, 0), value=0)
    elif w > h:
        pad = (w - h) // 2
        x = F.pad(x, (0, 0, pad, pad), value=0)
    y = F.interpolate(x[None].float(), (resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return (y[0].round().clamp(0, 255) / 255.0).float()


class FastComposerMethod(Method):
    name = "fastcomposer"
    summary = "FastComposer: CLIP image embedding fused into the class word ('a man img'), delayed conditioning"
    # PNDM: the scheduler of runwayml/stable-diffusion-v1-5, which the official evaluation pipeline keeps;
    # evaluation/single_object/run.py: 50 steps, guidance 5.0, alpha_ 0.5.
    native_sampling = {"scheduler": "PNDMScheduler", "num_inference_steps": 50, "guidance_scale": 5.0}
    released_base = "runwayml/stable-diffusion-v1-5"
    replaces = ("unet", "text_encoder")
    defaults: Mapping[str, Any] = {
        # Path of the released pytorch_model.bin, or "random" (offline checks: images not meaningful).
        "weights": None,
        # Share of the steps that see the face (alpha_ of the official pipeline; its evaluation: 0.5).
        "alpha": 0.5,
        "subject": f"a {CLASS} {IMAGE_TOKEN}",
        "object_resolution": 224,
        # null: CLIP ViT-L/14 (official); a mapping of CLIPVisionConfig overrides (tests at tiny width).
        "vision_config": None,
        # face id -> class word ("man"), "*" for every face without its own; these win over the face
        # set's manifest.json, which gives the words of the faces not named here.
        "class_words": {},
    }

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        p = self.params
        self.require_number("alpha", 0.0, 1.0, "share of steps with the face")
        subject = p["subject"]
        if (not isinstance(subject, str) or subject.count(CLASS) != 1 or subject.split().count(IMAGE_TOKEN) != 1
                or f"{CLASS} {IMAGE_TOKEN}" not in subject):
            raise ConfigError(f"param subject {subject!r} must contain '{CLASS} {IMAGE_TOKEN}' once (the image "
                              f"token right after the class word it fuses into)")
        self.require_positive_ints("object_resolution")
        words = p["class_words"]
        if not isinstance(words, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) and v.strip() and " " not in v.strip()
                for k, v in words.items()):
            raise ConfigError(f"param class_words must map face ids (or \"*\") to one word each, e.g. "
                              f"{{\"000\": \"man\", \"*\": \"woman\"}}; got {words!r}")
        vision = p["vision_config"]
        if vision is not None and not isinstance(vision, Mapping):
            raise ConfigError(f"param vision_config must be null (CLIP ViT-L/14) or a mapping, got {vision!r}")
        weights = p["weights"]
        self.weights_file: Path | None = None
        if weights != RANDOM:
            if weights is not None and not isinstance(weights, str):
                raise ConfigError(f"param weights must be the path of pytorch_model.bin or {RANDOM!r}, got {weights!r}")
            try:
                self.weights_file = require_file(weights, what="FastComposer weights (pytorch_model.bin)",
                                                 published=PUBLISHED + " Place it anywhere, e.g. "
                                                 "models/fastcomposer/pytorch_model.bin.")
            except ModelUnavailableError as exc:
                raise ConfigError(f"params.weights: {exc}") from None
        self._sha256 = weights_sha256(self.weights_file) if self.weights_file is not None else None
        self._model: FastComposerModel | None = None
        self._renderer = None
        self._tokenizer = None
        self._class_words: dict[str, str | None] | None = None

    # -- identity and facts -------------------------------------------------------------------------
    def identity(self) -> dict:
        ident = super().identity()
        params = dict(ident["params"])
        params["weights"] = {"sha256": self._sha256} if self._sha256 else {"random_seed": RANDOM_SEED}
        if not params["class_words"]:
            del params["class_words"]  # runs from before the param keep their method id
        ident["params"] = params
        ident["face_input"] = FACE_INPUT
        # The class words decide the prompts: the run's grid records each face's, so a changed one is
        # refused as another experiment rather than mixed with the images made before.
        return ident

    def face_class_words(self) -> dict[str, str | None]:
        """face id -> class word (None where missing) of the run's faces: ``class_words``, else the face
        set's; {} without a face set."""
        if self._class_words is None:
            faces = self.context.config.faces
            if faces is None:
                self._class_words = {}
            else:
                from f2d_bench.faces.source import resolve_face_set

                self._class_words = {f.face_id: self.class_word(f) for f in resolve_face_set(faces)}
        return self._class_words

    def class_word(self, face) -> str | None:
        """``face``'s class word: its own in ``class_words``, else ``"*"`` there, else the face set's."""
        words = self.params["class_words"]
        word = words.get(face.face_id, words.get("*", face.class_word))
        return word.strip() if isinstance(word, str) else None

    def info(self) -> dict:
        counts = parameter_counts(configs_of(self.context.pipeline(), self.params["vision_config"]))
        return {
            "trained_params": counts["trained"],
            "weights": "official" if self.weights_file is not None else "random weights: not meaningful",
            "params_by_part": counts,
            "weights_file": str(self.weights_file) if self.weights_file is not None else None,
        }

    def preflight(self, face_ids: Sequence[str], prompt_ids: Sequence[str], seeds: Sequence[int]) -> list[str]:
        words = self.face_class_words()
        lacking = [fid for fid in face_ids if fid in words and words[fid] is None]
        if lacking:
            raise ConfigError(self._no_class_word(lacking))
        self.load()
        if self.weights_file is None:
            return ["fastcomposer runs with weights: random (base UNet and text encoder, random image encoder "
                    "and post-fuse MLP): its images are not meaningful"]
        return []

    @staticmethod
    def _no_class_word(face_ids: Sequence[str]) -> str:
        names = ", ".join(map(repr, face_ids))
        return (f"fastcomposer needs a class word per face ('a man img'); face(s) {names} have none. Set it "
                f"with `f2d-bench faces prepare SRC DST --class-word NAME=man` (or --class-word man for all), as "
                "\"class_word\" of the face's entry in the face set's manifest.json, or in the method's params: "
                "class_words: {NAME: man} (\"*\": man for all)")

    # -- loading ------------------------------------------------------------------------------------
    def load(self) -> FastComposerModel:
        """Build FastComposer's model once (strictly loading the released file, or seeded random weights)."""
        if self._model is None:
            pipe = self.context.pipeline()
            configs = configs_of(pipe, self.params["vision_config"])
            with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG state is untouched
                torch.manual_seed(RANDOM_SEED)
                model = FastComposerModel(configs)
            if self.weights_file is not None:
                load_official(model, self.weights_file)
            else:
                # The base's own UNet and text encoder stand in (shared, never modified): drop the copies.
                model.unet, model.text_encoder = None, None
            self._model = model.eval().to(device=pipe.device, dtype=pipe.unet.dtype)
            # The renderer: the base pipeline's VAE, tokenizer and scheduler (shared, read only) with
            # FastComposer's UNet and text encoder.
            components = dict(pipe.components)
            if self.weights_file is not None:
                components.update(unet=self._model.unet, text_encoder=self._model.text_encoder)
            renderer = type(pipe)(**components)
            renderer.set_progress_bar_config(disable=True)
            self._renderer = renderer
            # A private tokenizer with the image token: the shared one is never changed.
            tokenizer = copy.deepcopy(pipe.tokenizer)
            tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
            self._tokenizer = tokenizer
        return self._model

    # -- per face -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Face images -> (N, d) float32 CPU image embeddings, in one batch."""
        model = self.load()
        param = next(model.image_encoder.parameters())
        pixels = torch.stack([object_pixels(im, self.params["object_resolution"]) for im in images])
        return model.encode_images(pixels.to(param.device, param.dtype)).float().cpu()

    def prepare(self, face) -> FastComposerFace:
        word = self.class_word(face)
        if word is None:
            raise ConfigError(self._no_class_word([face.face_id]))
        return FastComposerFace(self.encode_images([read_image(face.path)])[0], word)

    # -- prompts ------------------------------------------------------------------------------------
    def prompt_text(self, request: GenerationRequest) -> str:
        """The prompt with the image token ("a man img wearing a red hat")."""
        prepared = request.prepared
        if not isinstance(prepared, FastComposerFace):
            raise RuntimeError(f"fastcomposer: request {request.key.as_string()} has no prepared face")
        return request.prompt.render(self.params["subject"].replace(CLASS, prepared.class_word))

    def tokenize(self, text: str) -> tuple[list[int], int]:
        """(token ids without the image token, padded/cut to the tokenizer's length; index of the token
        before the image token), as the official ``_tokenize_and_mask_noun_phrases_ends``."""
        self.load()
        tokenizer = self._tokenizer
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        ids = tokenizer.encode(text)
        clean, marks = [], []
        for token in ids:
            if token == image_id:
                marks.append(len(clean) - 1)
            else:
                clean.append(token)
        length = tokenizer.model_max_length
        if len(marks) != 1 or not 0 <= marks[0] < length:
            raise F2DBenchError(f"fastcomposer: prompt {text!r} must hold the token {IMAGE_TOKEN!r} once, within "
                                f"the first {length} tokens (found {len(marks)}); check the prompt template")
        clean = clean[:length] + [tokenizer.pad_token_id] * max(0, length - len(clean))
        return clean, marks[0]

    @torch.inference_mode()
    def fused_embeds(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """(B, L, d): the text encoder's output of each prompt (image token removed) with the class word's
        position replaced by its fusion with the face's image embedding."""
        model = self.load()
        pipe = self._renderer
        rows = [self.tokenize(self.prompt_text(r)) for r in requests]
        ids = torch.tensor([ids for ids, _ in rows], device=pipe.device)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=pipe.device)
        mask[torch.arange(len(rows)), torch.tensor([i for _, i in rows])] = True
        text = pipe.text_encoder(ids)[0]
        objects = torch.stack([r.prepared.embedding for r in requests]).to(text.device, text.dtype)
        return model.postfuse_module(text, objects, mask)

    @torch.inference_mode()
    def text_only_embeds(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """(B, L, d): each prompt with the image token removed (the official ``prompt.replace("img", "")``)."""
        pipe = self._renderer
        texts = [self.prompt_text(r).replace(IMAGE_TOKEN, "") for r in requests]
        return pipe.encode_prompt(texts, pipe.device, 1, do_classifier_free_guidance=False)[0]

    def merge_step(self) -> int:
        """The last step index that uses the text-only prompt: steps i <= (1 - alpha) * N do."""
        return math.floor((1.0 - float(self.params["alpha"])) * self.context.sampling.num_inference_steps)

    # -- rendering ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Image.Image]:
        self.load()
        pipe = self._renderer
        sampling = self.context.sampling
        fused = self.fused_embeds(requests)
        text_only = self.text_only_embeds(requests)
        negative = pipe.encode_prompt([""] * len(requests), pipe.device, 1, do_classifier_free_guidance=False)[0]
        last_text_step = self.merge_step()

        def switch(pipeline, i, t, kwargs):
            # Called after step i; the returned embeddings drive step i + 1 (CFG: [negative, positive]).
            if i == last_text_step:
                kwargs["prompt_embeds"] = (torch.cat([negative, fused]) if pipeline.do_classifier_free_guidance
                                           else fused)
            return kwargs

        out = pipe(
            prompt_embeds=text_only,
            negative_prompt_embeds=negative,
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            height=sampling.height,
            width=sampling.width,
            generator=[r.generator for r in requests],
            output_type="pil",
            callback_on_step_end=switch,
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
        )
        return list(out.images)

"""``elite``: ELITE (Wei et al., ICCV 2023), a face encoded into a word and local words, no tuning.

Per face (``prepare``, Table 2's time): the face photo and its masked copy (``mask``: the subject mask,
see below) are resized to the CLIP image encoder's 224 x 224 (bicubic) and CLIP-normalised; one encoder
call gives five feature maps of each (last hidden state, hidden states 4, 8, 12, 16). The global mapper
turns the photo's maps into five words, of which ELITE injects the first; the local mapper turns the
masked photo's maps into one word per patch (16 x 16), which the subject mask, resized to the patch
grid (nearest), zeroes outside the subject.

Per batch (``generate``): each prompt is rendered with ``subject`` ("a S": "a photo of {}" becomes
ELITE's "a photo of a S"), the global word is written over the word embedding of "S" (before position
embeddings, as the official text-encoder patch does), and every cross-attention of the UNet runs
:class:`~baselines.elite.attention.ELITEAttnProcessor` for that call only: the global mapper's K/V for
the text context and, on the conditional branch, the local term weighted by ``llambda``. Faces share a
pipeline call. See README.md for the files, the settings and the deviations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from baselines.elite.attention import ELITEAttnProcessor, LocalContext, installed
from baselines.elite.mappers import (
    HIDDEN_LAYERS, PUBLISHED, GlobalMapper, LocalMapper, cross_attention_shapes, load_mapper, parameter_count,
)
from f2d_bench.errors import ConfigError, F2DBenchError, ModelUnavailableError
from f2d_bench.faces.choice import INPUT_FACE_RULE
from f2d_bench.files import folder_sha256s, weights_sha256
from f2d_bench.methods.base import GenerationRequest, MethodContext
from f2d_bench.methods.stable_diffusion import StableDiffusionMethod
from f2d_bench.methods.token_slots import single_token_ids, slot_positions, token_embedding_module, written_slots
from f2d_bench.weights import require_file

RANDOM = "random"
#: Seed of ``random`` mappers (offline smoke runs); part of the method's identity.
RANDOM_SEED = 0
#: ELITE's placeholder word (official ``--placeholder_token S``).
PLACEHOLDER = "S"
#: Subject masks: the MTCNN box of the input face (the face :data:`INPUT_FACE_RULE` picks, as the
#: scorers do), or the whole image.
MASKS = ("face-box", "full")
#: CLIP's image normalisation (the official ``get_tensor_clip``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The official dataset stores the mask at 128 x 128 (nearest) before the UNet resizes it to the patch grid.
MASK_STORE_SIZE = 128
OFFICIAL_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
_WHAT = f"ELITE placeholder {PLACEHOLDER!r}"


@dataclass(frozen=True, eq=False)
class ELITEFace:
    """What ``prepare(face)`` returns (float32, CPU).

    word: (text width,) the global word injected at "S". local: (patches, text width) the local words,
    zero outside the mask. mask: (grid, grid) the subject mask on the patch grid, 0/1. box: the face box
    (x1, y1, x2, y2) in image pixels, or None for ``mask: full``.
    """

    word: torch.Tensor
    local: torch.Tensor
    mask: torch.Tensor
    box: tuple[float, float, float, float] | None


@dataclass(frozen=True, eq=False)
class _Models:
    image_encoder: torch.nn.Module
    global_mapper: GlobalMapper
    local_mapper: LocalMapper
    processors: dict[str, ELITEAttnProcessor]
    placeholder_id: int
    image_size: int
    grid: int
    device: torch.device
    dtype: torch.dtype


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> (3, size, size) float32: bicubic resize, [0, 1], CLIP mean/std (the official input)."""
    x = np.asarray(image.convert("RGB").resize((size, size), resample=Image.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy((x - mean) / std).permute(2, 0, 1).contiguous()


def mask_to_grid(mask: np.ndarray, grid: int) -> torch.Tensor:
    """(H, W) 0/1 mask -> (grid, grid) float32: nearest to 128 x 128, then nearest to the patch grid."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, (MASK_STORE_SIZE, MASK_STORE_SIZE), mode="nearest")
    return F.interpolate(m, (grid, grid), mode="nearest")[0, 0]


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """(height, width) float32, 1 inside the pixel box (x1, y1, x2, y2) clipped to the image, 0 outside."""
    x1, y1, x2, y2 = box
    c1, r1 = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
    c2, r2 = min(int(np.ceil(x2)), width), min(int(np.ceil(y2)), height)
    mask = np.zeros((height, width), np.float32)
    mask[r1:r2, c1:c2] = 1.0
    return mask


def feature_maps(encoder: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The five maps the mappers read: the last hidden state, then hidden states 4, 8, 12, 16."""
    out = encoder(pixel_values=pixels, output_hidden_states=True)
    return [out.last_hidden_state] + [out.hidden_states[i] for i in HIDDEN_LAYERS]


class ELITEMethod(StableDiffusionMethod):
    name = "elite"
    summary = "ELITE (Wei et al. 2023): CLIP image features to an injected word + local words in cross-attention"
    released_base = "CompVis/stable-diffusion-v1-4"
    # inference_local.py / train_local.validation: LMSDiscreteScheduler, 100 steps, guidance 5.
    native_sampling = {"scheduler": "LMSDiscreteScheduler", "num_inference_steps": 100, "guidance_scale": 5.0}
    # During its calls the global mapper's K/V stand in for every cross-attention's to_k/to_v.
    replaces = ("cross-attention K/V",)
    defaults: Mapping[str, Any] = {
        # The released files (or "random" for offline checks); see README.md for where they are published.
        "global_mapper": None,
        "local_mapper": None,
        "image_encoder": OFFICIAL_IMAGE_ENCODER,
        "llambda": 0.8,
        "mask": "face-box",
        "subject": f"a {PLACEHOLDER}",
    }

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        p = self.params
        self.require_number("llambda", 0.0, 10.0, "official 0.8")
        if p["mask"] not in MASKS:
            raise ConfigError(f"param mask must be one of {', '.join(MASKS)}, got {p['mask']!r}")
        subject = p["subject"]
        if not isinstance(subject, str) or subject.split().count(PLACEHOLDER) != 1 or "{}" in subject:
            raise ConfigError(f"param subject {subject!r} must hold the word {PLACEHOLDER!r} exactly once "
                              f"(official prompts: 'a photo of a {PLACEHOLDER}')")
        encoder = p["image_encoder"]
        if not isinstance(encoder, str) or not encoder.strip():
            raise ConfigError(f"param image_encoder must be a Hugging Face id or a local directory, got {encoder!r}")
        self.files = {key: self._file_param(key) for key in ("global_mapper", "local_mapper")}
        # Content hashes, not paths, identify the files: the same files elsewhere give the same method id.
        self._sha256 = {key: weights_sha256(path) for key, path in self.files.items() if path is not None}
        self._encoder_id = self._encoder_identity(encoder)
        self._local = LocalContext(llambda=float(p["llambda"]))
        self._models: _Models | None = None
        self.detector = None
        if p["mask"] == "face-box":
            from f2d_bench.faces.detect import FaceDetector

            self.detector = FaceDetector()  # on the CPU: the same box on every machine

    def _file_param(self, key: str) -> Path | None:
        value = self.params[key]
        if value == RANDOM:
            return None
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"param {key} must be a file path or {RANDOM!r}, got {value!r}")
        name = f"{key}.pt"
        published = (f"{PUBLISHED} Put {name} where the run can read it (e.g. checkpoints/elite/{name}) and set "
                     f"params.{key} to its path.")
        try:
            return require_file(value, what=f"ELITE {key.replace('_', ' ')} ({name})", published=published)
        except ModelUnavailableError as exc:
            raise ConfigError(f"params.{key}: {exc}") from None

    @staticmethod
    def _encoder_identity(source: str) -> Any:
        """A hub id as it is; a local directory by the hashes of its config and weight files."""
        path = Path(source).expanduser()
        if source == RANDOM:
            return {"random_seed": RANDOM_SEED}
        if not path.is_dir():
            return source
        return {"files": folder_sha256s(path)}

    # -- identity and facts -----------------------------------------------------------------------------
    def identity(self) -> dict:
        ident = super().identity()
        params = dict(ident["params"])
        for key in self.files:
            params[key] = {"sha256": self._sha256[key]} if key in self._sha256 else {"random_seed": RANDOM_SEED}
        params["image_encoder"] = self._encoder_id
        ident["params"] = params
        ident["face_input"] = f"{self.params['mask']}/{INPUT_FACE_RULE}-face/clip-bicubic/layers-last+4+8+12+16"
        return ident

    @property
    def random_parts(self) -> list[str]:
        return [key for key, path in self.files.items() if path is None] + (
            ["image_encoder"] if self.params["image_encoder"] == RANDOM else [])

    def info(self) -> dict:
        models = self.load()
        pipe = self.context.pipeline()
        shapes = cross_attention_shapes(pipe.unet)
        per_mapper = parameter_count(models.global_mapper.input_dim, models.global_mapper.output_dim, shapes)
        return {
            # Both mappers are trained (the global one with its K/V copies in stage 1, the local in stage 2).
            "trained_params": 2 * per_mapper,
            "weights": "random weights: not meaningful" if self.random_parts else "official",
            "mapper_params": {"global": per_mapper, "local": per_mapper},
            "frozen_params": {"image_encoder": sum(p.numel() for p in models.image_encoder.parameters())},
            "cross_attention_kv": "the global mapper's (replaces every attn2's to_k/to_v during ELITE's calls)",
            "files": {key: str(path) for key, path in self.files.items() if path is not None},
            "image_encoder": self.params["image_encoder"],
            "mask": self.params["mask"],
        }

    def preflight(self, face_ids: Sequence[str], prompt_ids: Sequence[str], seeds: Sequence[int]) -> list[str]:
        """Load everything here, so that each face's recorded prepare time is its encoding only."""
        models = self.load()
        if self.detector is not None:
            self.detector.detect(Image.new("RGB", (64, 64), (127, 127, 127)))  # builds MTCNN
        with torch.inference_mode():
            feature_maps(models.image_encoder, torch.zeros(1, 3, models.image_size, models.image_size,
                                                           device=models.device, dtype=models.dtype))
        if self.random_parts:
            given = " and ".join(f"{key}: random" for key in self.random_parts)
            return [f"elite runs with {given}: its images are not meaningful"]
        return []

    # -- loading ----------------------------------------------------------------------------------------
    def _image_encoder(self) -> torch.nn.Module:
        from transformers import CLIPVisionModel

        source = self.params["image_encoder"]
        if source == RANDOM:  # offline checks: CLIP ViT-L/14's depth at a tiny width, seeded
            from transformers import CLIPVisionConfig

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                return CLIPVisionModel(CLIPVisionConfig(
                    hidden_size=32, intermediate_size=64, num_hidden_layers=max(HIDDEN_LAYERS), num_attention_heads=4,
                    image_size=224, patch_size=14)).eval()
        try:
            encoder = CLIPVisionModel.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ModelUnavailableError(
                f"ELITE's image encoder {source!r} could not be loaded ({str(exc).splitlines()[0]}). The official "
                f"one is {OFFICIAL_IMAGE_ENCODER} on Hugging Face (its vision tower); download it and set "
                "params.image_encoder to its local directory, or keep the id with the model in the Hugging "
                "Face cache.") from None
        config = encoder.config
        if config.num_hidden_layers < max(HIDDEN_LAYERS):
            raise ModelUnavailableError(
                f"ELITE's image encoder {source!r} has {config.num_hidden_layers} layers; ELITE reads hidden "
                f"states {', '.join(map(str, HIDDEN_LAYERS))} (CLIP ViT-L/14 has 24)")
        return encoder

    def _mappers(self, vision_width: int, text_width: int, shapes) -> tuple[GlobalMapper, LocalMapper]:
        built = {}
        for key, cls in (("global_mapper", GlobalMapper), ("local_mapper", LocalMapper)):
            path = self.files[key]
            if path is None:
                # A private RNG stream: the same weights every time, and the caller's RNG state is untouched.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(RANDOM_SEED + (key == "local_mapper"))
                    built[key] = cls(vision_width, text_width, shapes).eval()
            else:
                built[key] = load_mapper(cls, path, vision_width, text_width, shapes,
                                         what=f"ELITE {key.replace('_', ' ')}")
        return built["global_mapper"], built["local_mapper"]

    def load(self) -> _Models:
        """Load the image encoder and (strictly) both mappers once; later calls return them."""
        if self._models is None:
            pipe = self.context.pipeline()
            device, dtype = pipe.device, pipe.unet.dtype
            encoder = self._image_encoder()
            text_width = int(token_embedding_module(pipe.text_encoder).weight.shape[1])
            shapes = cross_attention_shapes(pipe.unet)
            global_mapper, local_mapper = self._mappers(int(encoder.config.hidden_size), text_width, shapes)
            for module in (encoder, global_mapper, local_mapper):
                module.requires_grad_(False)
                module.to(device=device, dtype=dtype).eval()
            processors = {
                f"{a.name}.processor": ELITEAttnProcessor(*global_mapper.projections(a.name),
                                                          *local_mapper.projections(a.name), self._local)
                for a in shapes}
            (placeholder_id,) = single_token_ids(pipe.tokenizer, [PLACEHOLDER])
            size = int(encoder.config.image_size)
            self._models = _Models(encoder, global_mapper, local_mapper, processors, placeholder_id, size,
                                   size // int(encoder.config.patch_size), device, dtype)
        return self._models

    # -- per face ---------------------------------------------------------------------------------------
    @property
    def face_need(self) -> str | None:
        return None if self.detector is None else "mask: face-box needs a visible face (or use mask: full)"

    def subject_mask(self, image: Image.Image, face) -> tuple[np.ndarray, tuple | None]:
        """(H, W) 0/1 mask of the subject and the face box it came from (None for ``mask: full``)."""
        if self.detector is None:
            return np.ones((image.height, image.width), np.float32), None
        chosen = self.input_face(face, image)  # the scorers' face too
        return box_mask(chosen.box, image.height, image.width), tuple(chosen.box)

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image], masks: Sequence[np.ndarray]) -> tuple[torch.Tensor, ...]:
        """Faces -> (words (N, width), local words (N, patches, width), grid masks (N, grid, grid)), float32
        CPU. All images go through the encoder and the mappers in one batch."""
        m = self.load()
        objects = [Image.fromarray((np.asarray(im.convert("RGB")) * mk[..., None]).astype(np.uint8))
                   for im, mk in zip(images, masks)]
        pixels = torch.stack([clip_pixels(im, m.image_size) for im in list(images) + objects])
        maps = feature_maps(m.image_encoder, pixels.to(m.device, m.dtype))
        n = len(images)
        words = m.global_mapper([x[:n] for x in maps])[:, 0]  # the first of the five words
        local = m.local_mapper([x[n:] for x in maps])
        grids = torch.stack([mask_to_grid(mk, m.grid) for mk in masks])
        local = local * grids.reshape(n, -1, 1).to(local)
        return words.float().cpu(), local.float().cpu(), grids  # .cpu() also waits for the GPU

    def prepare(self, face) -> ELITEFace:
        from f2d_bench.faces.imageio import read_image

        image = read_image(face.path)
        mask, box = self.subject_mask(image, face)
        words, local, grids = self.encode([image], [mask])
        return ELITEFace(word=words[0], local=local[0], mask=grids[0], box=box)

    # -- rendering --------------------------------------------------------------------------------------
    def prompt_text(self, request: GenerationRequest) -> str:
        return request.prompt.render(self.params["subject"])

    def placeholder_index(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """(B,) position of "S" in each prompt's tokens (BOS = 0), checked to be the subject's own "S"."""
        m = self.load()
        tokenizer = self.context.pipeline().tokenizer
        texts = [self.prompt_text(r) for r in requests]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        subject = self.params["subject"]
        before = subject.split()[:subject.split().index(PLACEHOLDER)]
        for row, r in enumerate(requests):
            prefix = " ".join([r.prompt.template.split("{}")[0].strip()] + before).strip()
            want = 1 + len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 1
            found = ids[row].tolist()
            if want >= len(found) or found[want] != m.placeholder_id or found.index(m.placeholder_id) != want:
                raise F2DBenchError(
                    f"elite: prompt {r.prompt.id!r} ({texts[row]!r}) does not hold the placeholder {PLACEHOLDER!r} "
                    f"as its first {PLACEHOLDER!r} token within the text encoder's {tokenizer.model_max_length} "
                    "tokens; shorten the prompt or remove the earlier word 's'")
        return slot_positions(ids, (m.placeholder_id,), _WHAT)

    @torch.inference_mode()
    def prompt_embeds(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """Text embeddings (batch, 77, width) with each request's global word at its "S"."""
        m = self.load()
        for r in requests:
            if not isinstance(r.prepared, ELITEFace):
                raise RuntimeError(f"elite: request {r.key.as_string()} has no prepared ELITE face")
        pipe = self.context.pipeline()
        words = torch.stack([r.prepared.word for r in requests])[:, None].to(pipe.device)
        with written_slots(token_embedding_module(pipe.text_encoder), (m.placeholder_id,), words, _WHAT):
            return super().prompt_embeds(requests)

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Image.Image]:
        m = self.load()
        pipe = self.context.pipeline()
        index = self.placeholder_index(requests)
        self._local.words = torch.stack([r.prepared.local for r in requests]).to(m.device, m.dtype)
        self._local.index = index.to(m.device)
        try:
            with installed(pipe.unet, m.processors):
                return super().generate(requests)
        finally:
            self._local.clear()

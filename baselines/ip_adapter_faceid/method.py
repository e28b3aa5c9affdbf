"""``ip-adapter-faceid``: IP-Adapter-FaceID (Ye et al., tencent-ailab/IP-Adapter), plain, Plus and PlusV2.

Per face (``prepare``): five facial keypoints (insightface's SCRFD from the buffalo_l pack at
``det_size``, or the project's MTCNN), the face :data:`INPUT_FACE_RULE` picks, insightface's ArcFace
recognizer (``w600k_r50.onnx``) on its ``norm_crop`` -> the unit 512-d ``normed_embedding``. Plus and
PlusV2 also encode ``norm_crop(image, kps, 224)`` with a CLIP ViT-H-14 image encoder (penultimate hidden
states, as the official code).

Rendering: diffusers' own ``load_ip_adapter`` installs the official ``.bin`` (its ``image_proj`` and
``ip_adapter`` parts; the LoRA inside the ``ip_adapter`` part goes through PEFT as adapter ``faceid_0``)
into a PRIVATE copy of the base pipeline's UNet: the adapter replaces attention processors, adds
``encoder_hid_proj`` and wraps Linear layers with LoRA, none of which may leak into the shared pipeline
that other methods of the run render with. Every other module (text encoder, VAE, scheduler) is shared
and left untouched. The face embeddings go in as ``ip_adapter_image_embeds`` with zeros as the negative
(diffusers' FaceID recipe); prompts carry the plain class phrase. See README.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.faces.choice import INPUT_FACE_RULE
from f2d_bench.faces.detect import Detection, FaceDetector
from f2d_bench.faces.imageio import read_image
from f2d_bench.files import folder_sha256s, weights_sha256
from f2d_bench.methods.base import GenerationRequest, Method, MethodContext
from f2d_bench.weights import WeightsLayoutError, key_listing, read_torch_file

from baselines.ip_adapter_faceid.random_weights import (RANDOM_LORA_RANK, RANDOM_SEED, cached_random_adapter,
                                                        cached_random_pack)

VARIANTS = ("faceid", "plus", "plusv2")
#: The official file of each variant on Hugging Face (h94/IP-Adapter-FaceID).
ADAPTER_FILES = {"faceid": "ip-adapter-faceid_sd15.bin", "plus": "ip-adapter-faceid-plus_sd15.bin",
                 "plusv2": "ip-adapter-faceid-plusv2_sd15.bin"}
HUB_REPO = "h94/IP-Adapter-FaceID"
#: insightface's model pack and the files of it this method reads.
PACK = "buffalo_l"
RECOGNIZER_FILE = "w600k_r50.onnx"
DETECTOR_FILE = "det_10g.onnx"
#: The CLIP image encoder of the official Plus demo (a CLIPVisionModelWithProjection folder).
CLIP_HUB = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DETECTORS = ("scrfd", "mtcnn")
CHANNEL_ORDERS = ("bgr", "rgb")
ID_DIM = 512  # ArcFace embedding width
NUM_TOKENS = 4  # face tokens the projection makes
DIM_HEAD = 64  # the FacePerceiverResampler's head width (diffusers infers heads = to_q rows / 64)
DEPTH = 4  # resampler blocks
FF_MULT = 4  # resampler feed-forward expansion
RELEASED = {"cross_attention_dim": 768, "lora_rank": 128, "clip_dim": 1280}
#: The official demo's negative prompt (README, every FaceID example).
NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality, blurry"
CLIP_CROP = 224  # norm_crop size for the CLIP image encoder (official demo)
ADAPTER_NAME = "faceid_0"  # the PEFT adapter name diffusers gives the first FaceID LoRA


def _published_adapter(variant: str) -> str:
    return (f"The official file {ADAPTER_FILES[variant]} is published on Hugging Face at {HUB_REPO} (research "
            "use only); download it and set params.adapter to its local path.")


def _published_pack(root: Path) -> str:
    return (f"insightface's {PACK} model pack (non-commercial licence) is published in insightface's GitHub "
            f"releases as {PACK}.zip; unzip it so that {root / 'models' / PACK / RECOGNIZER_FILE} (and, for "
            f"detector: scrfd, {DETECTOR_FILE}) exist, and set params.model_root to that root")


# -- the official checkpoint layout ---------------------------------------------------------------------


def _hidden_size(name: str, block_out_channels: Sequence[int]) -> int:
    """The channel width of the attention processor ``name`` (as diffusers' loader computes it)."""
    if name.startswith("mid_block"):
        return int(block_out_channels[-1])
    if name.startswith("up_blocks"):
        return int(list(reversed(block_out_channels))[int(name[len("up_blocks.")])])
    return int(block_out_channels[int(name[len("down_blocks.")])])


def adapter_layout(processor_names: Sequence[str], block_out_channels: Sequence[int], cross_attention_dim: int,
                   variant: str, *, lora_rank: int = RELEASED["lora_rank"], clip_dim: int = RELEASED["clip_dim"],
                   lora: bool = True) -> dict[str, dict[str, tuple[int, ...]]]:
    """The official ``.bin`` layout for a UNet: ``{"image_proj": {key: shape}, "ip_adapter": {key: shape}}``.

    ``ip_adapter`` is the state dict of the official ``ModuleList(unet.attn_processors.values())``: per
    processor index ``k`` its LoRA (``k.to_{q,k,v,out}_lora.{down,up}.weight``, rank ``lora_rank``) and, for
    cross-attention processors, ``k.to_k_ip.weight`` / ``k.to_v_ip.weight``. ``image_proj`` is
    ``MLPProjModel`` (plain: ``proj.0``, ``proj.2``, ``norm``) or ``ProjPlusModel`` (Plus: the same plus
    ``perceiver_resampler.*``, a FacePerceiverResampler over ``clip_dim``-wide CLIP hidden states).
    """
    if variant not in VARIANTS:
        raise ConfigError(f"params.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    cad = int(cross_attention_dim)
    ip: dict[str, tuple[int, ...]] = {}
    for k, name in enumerate(processor_names):
        hidden = _hidden_size(name, block_out_channels)
        cross = not name.endswith("attn1.processor")
        context = cad if cross else hidden
        if lora:
            for part, width_in in (("to_q", hidden), ("to_k", context), ("to_v", context), ("to_out", hidden)):
                ip[f"{k}.{part}_lora.down.weight"] = (lora_rank, width_in)
                ip[f"{k}.{part}_lora.up.weight"] = (hidden, lora_rank)
        if cross:
            ip[f"{k}.to_k_ip.weight"] = (hidden, cad)
            ip[f"{k}.to_v_ip.weight"] = (hidden, cad)
    proj = {"proj.0.weight": (2 * ID_DIM, ID_DIM), "proj.0.bias": (2 * ID_DIM,),
            "proj.2.weight": (cad * NUM_TOKENS, 2 * ID_DIM), "proj.2.bias": (cad * NUM_TOKENS,),
            "norm.weight": (cad,), "norm.bias": (cad,)}
    if variant != "faceid":
        inner = DIM_HEAD * max(1, cad // DIM_HEAD)  # official heads = cad // 64 (12 for SD 1.5)
        r = "perceiver_resampler."
        proj.update({f"{r}proj_in.weight": (cad, clip_dim), f"{r}proj_in.bias": (cad,),
                     f"{r}proj_out.weight": (cad, cad), f"{r}proj_out.bias": (cad,),
                     f"{r}norm_out.weight": (cad,), f"{r}norm_out.bias": (cad,)})
        for i in range(DEPTH):
            block = f"{r}layers.{i}."
            for norm in ("norm1", "norm2"):
                proj[f"{block}0.{norm}.weight"] = (cad,)
                proj[f"{block}0.{norm}.bias"] = (cad,)
            proj.update({f"{block}0.to_q.weight": (inner, cad), f"{block}0.to_kv.weight": (2 * inner, cad),
                         f"{block}0.to_out.weight": (cad, inner),
                         f"{block}1.0.weight": (cad,), f"{block}1.0.bias": (cad,),
                         f"{block}1.1.weight": (cad * FF_MULT, cad), f"{block}1.3.weight": (cad, cad * FF_MULT)})
    return {"image_proj": proj, "ip_adapter": ip}


def layout_parameter_count(layout: Mapping[str, Mapping[str, tuple[int, ...]]]) -> int:
    return sum(int(np.prod(shape)) for part in layout.values() for shape in part.values())


def _variant_hint(image_proj_keys, variant: str | None) -> str:
    """A sentence when the file is evidently another variant's than ``variant``."""
    plus = "perceiver_resampler.proj_in.weight" in image_proj_keys
    if "norm.weight" not in image_proj_keys or variant is None or plus == (variant != "faceid"):
        return ""
    return (" The file looks like a Plus/PlusV2 adapter (it has a perceiver_resampler): set variant plus or plusv2"
            if plus else " The file looks like a plain FaceID adapter: set variant faceid")


def check_adapter_state(state: Any, layout: Mapping[str, Mapping[str, tuple[int, ...]]], *, source: str,
                        lora: bool = True, variant: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The file's two parts after a strict check against ``layout`` (built with ``lora=True``); with
    ``lora=False`` the LoRA tensors, which the official files always carry, are checked and dropped.

    WeightsLayoutError names the missing and unexpected keys and wrong shapes (diffusers itself would load a
    truncated file without a word where its keys are optional, or fail deep inside with a bare KeyError)."""
    if not isinstance(state, Mapping) or not {"image_proj", "ip_adapter"} <= set(state):
        top = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
        raise WeightsLayoutError(f"{source}: an IP-Adapter file holds the dicts 'image_proj' and 'ip_adapter'; "
                                 f"found {top}")
    problems = []
    for part in ("image_proj", "ip_adapter"):
        got, want = state[part], layout[part]
        if not isinstance(got, Mapping):
            raise WeightsLayoutError(f"{source}: '{part}' must be a dict of tensors, got {type(got).__name__}")
        missing = [k for k in want if k not in got]
        unexpected = [k for k in got if k not in want]
        wrong = [f"{k} {list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} (expected "
                 f"{list(want[k])})" for k, v in got.items()
                 if k in want and (not isinstance(v, torch.Tensor) or tuple(v.shape) != want[k])]
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                problems.append(f"{part}: {what} {key_listing(items)}")
    if problems:
        raise WeightsLayoutError(f"{source} does not match this UNet's IP-Adapter-FaceID layout: "
                                 + "; ".join(problems) + "." + _variant_hint(state["image_proj"], variant))
    ip = {k: v for k, v in state["ip_adapter"].items() if lora or "_lora." not in k}
    return {"image_proj": dict(state["image_proj"]), "ip_adapter": ip}


# -- the face encoder ----------------------------------------------------------------------------------


def _bgr(image: Image.Image) -> np.ndarray:
    """``image`` as the contiguous BGR uint8 array insightface (cv2's convention) works on."""
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


@dataclass(frozen=True, eq=False)
class FaceIDFace:
    """What ``prepare(face)`` returns.

    id_embed: (512,) float32 CPU, the recognizer's unit-length embedding (``normed_embedding``).
    clip_embeds: (tokens, width) float32 CPU CLIP penultimate hidden states of the 224 crop (Plus), else None.
    landmarks: (5, 2) float64 keypoints (x, y pixels) the crops used.
    """

    id_embed: torch.Tensor
    clip_embeds: torch.Tensor | None
    landmarks: np.ndarray


class IPAdapterFaceIDMethod(Method):
    name = "ip-adapter-faceid"
    summary = "IP-Adapter-FaceID (plain / Plus / PlusV2): ArcFace embedding -> 4 image tokens + UNet LoRA"
    released_base = "runwayml/stable-diffusion-v1-5"
    # The official demo: DDIMScheduler, 30 steps, IPAdapter.generate's guidance_scale 7.5.
    native_sampling = {"scheduler": "DDIMScheduler", "num_inference_steps": 30, "guidance_scale": 7.5}
    replaces = ()  # it adds to the UNet (adapter attention, LoRA) on a private copy; no component is swapped
    defaults: Mapping[str, Any] = {
        "variant": "faceid",
        "adapter": None,  # the variant's official .bin, or random (offline checks)
        "model_root": None,  # insightface root: <root>/models/buffalo_l/, or random (recognizer only)
        "image_encoder": None,  # Plus/PlusV2: local CLIPVisionModelWithProjection folder (CLIP_HUB)
        "detector": "scrfd",
        "det_size": 640,
        "det_thresh": 0.5,
        "scale": 1.0,
        "s_scale": 1.0,
        "lora": True,
        "lora_scale": 1.0,
        # None: "" under sampling: protocol (every method's negative), the demo's under sampling: native.
        "negative_prompt": None,
        "crop_channels": "bgr",
    }

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        p = self.params
        self.variant = p["variant"]
        if self.variant not in VARIANTS:
            raise ConfigError(f"params.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for key, allowed in (("detector", DETECTORS), ("crop_channels", CHANNEL_ORDERS)):
            if p[key] not in allowed:
                raise ConfigError(f"params.{key} must be one of {', '.join(allowed)}, got {p[key]!r}")
        for key in ("scale", "s_scale", "lora_scale", "det_thresh"):
            if not isinstance(p[key], (int, float)) or isinstance(p[key], bool) or not np.isfinite(p[key]):
                raise ConfigError(f"params.{key} must be a number, got {p[key]!r}")
        if not 0.0 < p["det_thresh"] < 1.0:
            raise ConfigError(f"params.det_thresh must be in (0, 1), got {p['det_thresh']!r}")
        self.require_positive_ints("det_size")
        if p["det_size"] % 32:
            raise ConfigError(f"params.det_size must be a multiple of 32 (SCRFD's largest stride), got {p['det_size']}")
        if not isinstance(p["lora"], bool):
            raise ConfigError(f"params.lora must be true or false, got {p['lora']!r}")
        if p["negative_prompt"] is not None and not isinstance(p["negative_prompt"], str):
            raise ConfigError(f"params.negative_prompt must be text, got {p['negative_prompt']!r}")
        # The paper's protocol gives every method the empty negative; the demo's quality negative comes
        # with the rest of the method's own sampling.
        self.negative_prompt = p["negative_prompt"] if p["negative_prompt"] is not None else (
            NEGATIVE_PROMPT if context.sampling_mode == "native" else "")
        self.encoder_dir = self._encoder_dir()
        self.adapter_file = self._adapter_file()
        self.recognizer_file, self.detector_file = self._pack_files()
        # Content hashes, not paths, identify the files: the same files elsewhere give the same method id
        # (the random stand-ins by their seed: every machine builds the same ones).
        self._sha256 = {
            "adapter": f"random-{RANDOM_SEED}" if p["adapter"] == "random" else weights_sha256(self.adapter_file),
            "recognizer": f"random-{RANDOM_SEED}" if p["model_root"] == "random" else weights_sha256(self.recognizer_file)}
        if self.detector_file is not None:
            self._sha256["detector"] = weights_sha256(self.detector_file)
        if self.encoder_dir is not None:
            self._sha256["image_encoder"] = folder_sha256s(self.encoder_dir)
        self.mtcnn = FaceDetector() if p["detector"] == "mtcnn" else None
        self._recognizer = None
        self._scrfd = None
        self._encoder = None
        self._negative_clip: torch.Tensor | None = None
        self._pipe = None
        self._state: dict | None = None

    # -- files -------------------------------------------------------------------------------------------
    def _adapter_file(self) -> Path:
        value = self.params["adapter"]
        if value == "random":  # offline checks: seeded weights in the official layout at the base's widths
            import json

            unet = self.context.pipeline().unet
            clip_dim = RELEASED["clip_dim"]
            if self.encoder_dir is not None:
                clip_dim = int(json.loads((self.encoder_dir / "config.json").read_text(encoding="utf-8"))["hidden_size"])
            layout = adapter_layout(list(unet.attn_processors), unet.config.block_out_channels,
                                    unet.config.cross_attention_dim, self.variant, lora=True,
                                    lora_rank=RANDOM_LORA_RANK, clip_dim=clip_dim)
            return cached_random_adapter(layout, ADAPTER_FILES[self.variant])
        if value is None or not str(value).strip():
            raise ConfigError(f"params.adapter is not set. {_published_adapter(self.variant)}")
        file = Path(str(value)).expanduser()
        if not file.is_file():
            raise ConfigError(f"params.adapter: no file at {file}. {_published_adapter(self.variant)}")
        return file

    def _pack_files(self) -> tuple[Path, Path | None]:
        value = self.params["model_root"]
        if value == "random":  # offline checks: a seeded recognizer with buffalo_l's interface, no detector
            if self.params["detector"] == "scrfd":
                raise ConfigError("params.model_root: random holds a recognizer only (SCRFD cannot be built "
                                  "without its trained weights); set detector: mtcnn")
            value = str(cached_random_pack(PACK, RECOGNIZER_FILE))
        if value is None or not str(value).strip():
            raise ConfigError("params.model_root is not set: " + _published_pack(Path("<root>")))
        root = Path(str(value)).expanduser()
        pack = root / "models" / PACK
        needed = [RECOGNIZER_FILE] + ([DETECTOR_FILE] if self.params["detector"] == "scrfd" else [])
        missing = [name for name in needed if not (pack / name).is_file()]
        if missing:
            raise ConfigError(f"params.model_root: {', '.join(missing)} not found in {pack}. " + _published_pack(root))
        return pack / RECOGNIZER_FILE, (pack / DETECTOR_FILE if self.params["detector"] == "scrfd" else None)

    def _encoder_dir(self) -> Path | None:
        value = self.params["image_encoder"]
        if self.variant == "faceid":
            if value is not None:
                raise ConfigError("params.image_encoder is used by variant plus / plusv2 only; remove it")
            return None
        hint = (f"variant {self.variant} needs the CLIP ViT-H-14 image encoder of the official demo ({CLIP_HUB} on "
                "Hugging Face, a CLIPVisionModelWithProjection folder with config.json and its weights); download "
                "it and set params.image_encoder to that folder")
        if value is None or not str(value).strip():
            raise ConfigError(f"params.image_encoder is not set: {hint}")
        folder = Path(str(value)).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"params.image_encoder: no config.json in {folder}: {hint}")
        return folder

    # -- identity and facts ------------------------------------------------------------------------------
    def identity(self) -> dict:
        ident = super().identity()
        params = dict(ident["params"])
        params["adapter"] = {"sha256": self._sha256["adapter"]}
        params["model_root"] = {k: self._sha256[k] for k in ("recognizer", "detector") if k in self._sha256}
        if self.encoder_dir is not None:
            params["image_encoder"] = {"files": self._sha256["image_encoder"]}
        ident["params"] = params
        ident["subject"] = "class phrase"
        ident["face_input"] = f"{self.params['detector']}-5pt/{INPUT_FACE_RULE}-face/insightface-norm_crop/normed"
        return ident

    def _layout(self, lora: bool = True) -> dict:
        unet = self.context.pipeline().unet
        state = self.state()
        rank = clip_dim = None
        for key, value in state["ip_adapter"].items():
            if key.endswith("_lora.down.weight") and isinstance(value, torch.Tensor) and value.ndim == 2:
                rank = int(value.shape[0])
                break
        proj_in = state["image_proj"].get("perceiver_resampler.proj_in.weight")
        if isinstance(proj_in, torch.Tensor) and proj_in.ndim == 2:
            clip_dim = int(proj_in.shape[1])
        if self.encoder_dir is not None:
            clip_dim = int(self.image_encoder().config.hidden_size)
        return adapter_layout(list(unet.attn_processors), unet.config.block_out_channels,
                              unet.config.cross_attention_dim, self.variant, lora=lora,
                              lora_rank=rank or RELEASED["lora_rank"], clip_dim=clip_dim or RELEASED["clip_dim"])

    def _released_widths(self) -> bool:
        """Whether the adapter has the released model's widths (else it is a test-sized stand-in)."""
        layout = self._layout()
        ip = layout["ip_adapter"]
        rank = next(v[0] for k, v in ip.items() if k.endswith("_lora.down.weight"))
        clip_ok = self.variant == "faceid" or \
            layout["image_proj"]["perceiver_resampler.proj_in.weight"][1] == RELEASED["clip_dim"]
        return (self.context.pipeline().unet.config.cross_attention_dim == RELEASED["cross_attention_dim"]
                and rank == RELEASED["lora_rank"] and clip_ok)

    def info(self) -> dict:
        layout = self._layout(lora=True)
        used = self._layout(lora=self.params["lora"])
        frozen = {}
        if self._encoder is not None or self.encoder_dir is not None:
            frozen["image_encoder"] = sum(p.numel() for p in self.image_encoder().parameters())
        return {
            # What the official training learns: the projection, the adapter K/V and the LoRA.
            "trained_params": layout_parameter_count(layout),
            "params_in_use": layout_parameter_count(used),
            "weights": "official" if self._released_widths() else "random weights: not meaningful",
            "variant": self.variant,
            "frozen_params": frozen,
            "adds": ["unet: IP-Adapter attention processors + encoder_hid_proj"]
                    + (["unet: LoRA (PEFT)"] if self.params["lora"] else []),
            "files": {"adapter": str(self.adapter_file), "recognizer": str(self.recognizer_file),
                      **({"detector": str(self.detector_file)} if self.detector_file else {}),
                      **({"image_encoder": str(self.encoder_dir)} if self.encoder_dir else {})},
        }

    def preflight(self, face_ids: Sequence[str], prompt_ids: Sequence[str], seeds: Sequence[int]) -> list[str]:
        """Load everything here (adapter, LoRA, recognizer, encoders) so that each face's prepare time is
        its encoding only."""
        self.adapter_pipeline()
        self.recognizer()
        if self.params["detector"] == "scrfd":
            self.scrfd()
        else:
            self.mtcnn.detect(Image.new("RGB", (64, 64), (127, 127, 127)))
        if self.encoder_dir is not None:
            self.negative_clip()
        if not self._released_widths():
            return [f"{self.name}: the adapter file does not have the released model's widths: images are not meaningful"]
        return []

    # -- loading -----------------------------------------------------------------------------------------
    def state(self) -> dict:
        """The adapter file's contents (read once, tensors only)."""
        if self._state is None:
            self._state = read_torch_file(self.adapter_file)
            if not isinstance(self._state, Mapping) or not {"image_proj", "ip_adapter"} <= set(self._state):
                check_adapter_state(self._state, {}, source=str(self.adapter_file))  # raises, naming what it found
        return self._state

    def adapter_pipeline(self):
        """A pipeline sharing the base's text encoder, tokenizer, VAE and scheduler, with a private UNet copy
        that carries the adapter (built once)."""
        if self._pipe is None:
            from diffusers import StableDiffusionPipeline

            base = self.context.pipeline()
            checked = check_adapter_state(self.state(), self._layout(lora=True), source=str(self.adapter_file),
                                          lora=self.params["lora"], variant=self.variant)
            pipe = StableDiffusionPipeline(
                vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                unet=copy.deepcopy(base.unet), scheduler=base.scheduler, safety_checker=None,
                feature_extractor=None, image_encoder=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            # A dict, already checked; image_encoder_folder=None: we pass embeddings, diffusers loads no encoder.
            pipe.load_ip_adapter(checked, subfolder="", weight_name=self.adapter_file.name,
                                 image_encoder_folder=None, low_cpu_mem_usage=False)
            pipe.set_ip_adapter_scale(float(self.params["scale"]))
            peft = getattr(pipe.unet, "peft_config", {})
            if self.params["lora"]:
                if ADAPTER_NAME not in peft:
                    raise F2DBenchError(f"{self.adapter_file}: diffusers installed no FaceID LoRA (PEFT adapter "
                                        f"{ADAPTER_NAME}); is peft installed?")
                pipe.set_adapters([ADAPTER_NAME], adapter_weights=[float(self.params["lora_scale"])])
            elif peft:
                raise F2DBenchError(f"{self.adapter_file}: a LoRA was installed although params.lora is false")
            self._pipe = pipe
        return self._pipe

    def recognizer(self):
        if self._recognizer is None:
            from insightface.model_zoo import get_model

            model = get_model(str(self.recognizer_file), providers=["CPUExecutionProvider"])
            if model is None or getattr(model, "taskname", None) != "recognition":
                raise F2DBenchError(f"{self.recognizer_file}: insightface does not take this file for a face "
                                    "recognizer (expected the buffalo_l ArcFace model, input Nx3x112x112)")
            model.prepare(ctx_id=-1)  # CPU: the same embeddings on every machine
            self._recognizer = model
        return self._recognizer

    def scrfd(self):
        if self._scrfd is None:
            from insightface.model_zoo import get_model

            model = get_model(str(self.detector_file), providers=["CPUExecutionProvider"])
            if model is None or getattr(model, "taskname", None) != "detection":
                raise F2DBenchError(f"{self.detector_file}: insightface does not take this file for its SCRFD "
                                    "face detector")
            size = int(self.params["det_size"])
            model.prepare(-1, input_size=(size, size), det_thresh=float(self.params["det_thresh"]))
            self._scrfd = model
        return self._scrfd

    def image_encoder(self):
        if self._encoder is None:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

            pipe = self.context.pipeline()
            encoder = CLIPVisionModelWithProjection.from_pretrained(str(self.encoder_dir), dtype=pipe.unet.dtype)
            self._encoder = encoder.to(pipe.device).eval()
            self._processor = CLIPImageProcessor()  # the official code's default processor (224, CLIP mean/std)
        return self._encoder

    @torch.inference_mode()
    def _clip_hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        encoder = self.image_encoder()
        out = encoder(pixel_values.to(encoder.device, encoder.dtype), output_hidden_states=True)
        return out.hidden_states[-2].float().cpu()  # the penultimate layer, as the official Plus code

    def negative_clip(self) -> torch.Tensor:
        """(tokens, width): CLIP hidden states of an all-zero input, the official Plus negative."""
        if self._negative_clip is None:
            self.image_encoder()
            size = self._processor.crop_size["height"]
            self._negative_clip = self._clip_hidden(torch.zeros(1, 3, size, size))[0]
        return self._negative_clip

    # -- per face ----------------------------------------------------------------------------------------
    face_need = "the adapter needs a visible face"

    def detect_input_id(self) -> tuple:
        if self.mtcnn is not None:
            return self.mtcnn.identity
        # What scrfd() is built from: the file's contents, and the settings that filter its detections.
        return ("scrfd", self._sha256["detector"], int(self.params["det_size"]), float(self.params["det_thresh"]))

    def detect_input(self, image: Image.Image) -> list[Detection]:
        if self.mtcnn is not None:
            return self.mtcnn.detect(image)
        boxes, kpss = self.scrfd().detect(_bgr(image), max_num=0, metric="default")
        if kpss is None:
            raise F2DBenchError(f"{self.detector_file}: the detector gives no keypoints; use the buffalo_l SCRFD")
        return [Detection(tuple(float(v) for v in b[:4]), k, float(b[4])) for b, k in zip(boxes, kpss)]

    def prepare(self, face) -> FaceIDFace:
        from insightface.app.common import Face as InsightFace
        from insightface.utils.face_align import norm_crop

        image = read_image(face.path)
        bgr = _bgr(image)
        chosen = self.input_face(face, image)  # the identity scorers' face: the face encoded is the one scored
        kps = np.asarray(chosen.landmarks, dtype=np.float32)
        found = InsightFace(bbox=np.asarray(chosen.box, dtype=np.float32), kps=kps, det_score=chosen.prob)
        self.recognizer().get(bgr, found)
        id_embed = torch.from_numpy(np.asarray(found.normed_embedding, dtype=np.float32).copy())
        clip = None
        if self.variant != "faceid":
            crop = norm_crop(bgr, landmark=kps, image_size=CLIP_CROP)
            # The official demo hands insightface's BGR crop to the CLIP processor as it is.
            crop = crop if self.params["crop_channels"] == "bgr" else crop[:, :, ::-1]
            self.image_encoder()
            pixels = self._processor(images=np.ascontiguousarray(crop), return_tensors="pt").pixel_values
            clip = self._clip_hidden(pixels)[0]
        return FaceIDFace(id_embed=id_embed, clip_embeds=clip, landmarks=np.asarray(chosen.landmarks))

    # -- rendering ---------------------------------------------------------------------------------------
    def prompt_text(self, request: GenerationRequest) -> str:
        return request.prompt.render(self.context.prompt_set.class_phrase)

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Image.Image]:
        for r in requests:
            if not isinstance(r.prepared, FaceIDFace):
                raise RuntimeError(f"{self.name}: request {r.key.as_string()} has no prepared face embedding")
        pipe = self.adapter_pipeline()
        sampling = self.context.sampling
        dtype, device = pipe.unet.dtype, pipe.device
        n = len(requests)
        # Without guidance (CFG <= 1) diffusers runs the conditional rows only.
        guided = sampling.guidance_scale > 1
        ids = torch.stack([r.prepared.id_embed for r in requests])[:, None]  # (n, 1, 512)
        # Negative first: diffusers splits the CFG embeddings in two halves, unconditional then conditional.
        image_embeds = (torch.cat([torch.zeros_like(ids), ids]) if guided else ids).to(device, dtype)
        if self.variant != "faceid":
            layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
            clip = torch.stack([r.prepared.clip_embeds for r in requests])
            negative = self.negative_clip()[None].expand_as(clip)
            rows = torch.cat([negative, clip]) if guided else clip
            layer.clip_embeds = rows[:, None].to(device, dtype)  # (2n or n, 1, tokens, width)
            layer.shortcut = self.variant == "plusv2"
            layer.shortcut_scale = float(self.params["s_scale"])
        prompt_embeds, _ = pipe.encode_prompt([self.prompt_text(r) for r in requests], device, 1,
                                              do_classifier_free_guidance=False)
        negative_embeds, _ = pipe.encode_prompt([self.negative_prompt] * n, device, 1,
                                                do_classifier_free_guidance=False)
        # diffusers' pipeline repeats ip_adapter_image_embeds for every prompt of the call (one face per
        # call); to batch different faces, this private pipeline gets each request's embeddings as they are,
        # already in the order that function returns (negatives, then positives).
        pipe.prepare_ip_adapter_image_embeds = lambda *args, **kwargs: [image_embeds]
        try:
            out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                       ip_adapter_image_embeds=[image_embeds], num_inference_steps=sampling.num_inference_steps,
                       guidance_scale=sampling.guidance_scale, height=sampling.height, width=sampling.width,
                       generator=[r.generator for r in requests], output_type="pil")
        finally:
            del pipe.prepare_ip_adapter_image_embeds
            if self.variant != "faceid":
                layer.clip_embeds = None  # no face of this batch lingers in the module
        return list(out.images)

"""``dreambooth``: the UNet fine-tuned per face on "a photo of sks person", with prior preservation.

Tuning (per face): a float32 copy of the base UNet (``variant: full``, as the paper ran it) or LoRA
adapters on its attention projections (``variant: lora``, peft) is trained with the denoising loss on the
face photo captioned ``instance_prompt``, plus ``prior_loss_weight`` x the same loss on class images the
base model renders of ``class_prompt`` (made once per run). The text encoder stays frozen. Artifacts in
diffusers' formats: ``unet/`` (``UNet2DConditionModel.from_pretrained``) or
``pytorch_lora_weights.safetensors`` (``load_lora_weights``). Rendering swaps the face's UNet into the
shared pipeline for that face's requests only; a full UNet per face is 3.4 GB in float32 (1.7 GB as
saved in float16), so ``keep_weights: false`` renders each face right after tuning it and deletes them.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.methods.base import GenerationRequest, MethodContext, render_per_face
from f2d_bench.methods.stable_diffusion import StableDiffusionMethod
from f2d_bench.tuning.class_images import ClassPrior
from f2d_bench.tuning.diffusion import (
    DenoisingLoss, encode_posterior, encode_text, face_seed, frozen, optimise, training_pixels,
    training_resolution,
)

VARIANTS = ("full", "lora")
LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_DIR = "unet"
#: The attention projections the diffusers LoRA example adapts (SD 1.x has no add_k/add_v projections).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_parameter_count(unet, rank: int) -> int:
    """Parameters of rank-``rank`` LoRA on every attention's q/k/v/out projection: r x (in + out) each.
    SD 1.4 at rank 4: 797,184."""
    from diffusers.models.attention_processor import Attention

    total = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            for name in LORA_TARGETS:
                linear = module.get_submodule(name)
                total += rank * (linear.in_features + linear.out_features)
    return total


class DreamBoothMethod(ClassPrior, StableDiffusionMethod):
    name = "dreambooth"
    summary = "DreamBooth (Ruiz et al. 2023): UNet fine-tuned per face with prior preservation (full or LoRA)"
    tunes = True
    defaults = {
        "variant": "full",
        # The diffusers example's prior-preservation run: 800 steps, lr 5e-6, 200 class images, batch 1.
        "steps": 800,
        "learning_rate": None,  # null: 5e-6 (full), 1e-4 (LoRA, the LoRA example's documented run)
        "batch_size": 1,
        "prior_loss_weight": 1.0,
        "num_class_images": 200,
        "class_prompt": "a photo of a person",
        "instance_prompt": "a photo of sks person",
        "subject": "sks person",
        "lora_rank": 4,
        "max_grad_norm": 1.0,
        "keep_weights": True,
        "seed": 0,
    }

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        p = self.params
        if p["variant"] not in VARIANTS:
            raise ConfigError(f"param variant {p['variant']!r}: expected one of {', '.join(VARIANTS)}")
        self.require_positive_ints("steps", "batch_size", "lora_rank")
        if not isinstance(p["num_class_images"], int) or p["num_class_images"] < 0:
            raise ConfigError("param num_class_images must be an integer >= 0 (0: no prior preservation)")
        if not isinstance(p["keep_weights"], bool):
            raise ConfigError("param keep_weights must be true or false")
        self._lora_unet = None

    def info(self) -> dict:
        # The weights text is what Table 2 shows beside the count: it says which variant ran.
        return {"trained_params": self.trained_params(), "weights": f"none (tuned per face: {self.variant_text()})",
                "variant": self.variant_text()}

    def variant_text(self) -> str:
        return "full UNet" if self.params["variant"] == "full" else f"LoRA rank {self.params['lora_rank']}"

    def trained_params(self) -> int:
        """Full: every UNet parameter (859,520,964 for SD 1.4); LoRA: ``lora_parameter_count``."""
        unet = self.context.pipeline().unet
        if self.params["variant"] == "full":
            return sum(p.numel() for p in unet.parameters())
        return lora_parameter_count(unet, self.params["lora_rank"])

    def learning_rate(self) -> float:
        lr = self.params["learning_rate"]
        return float(lr) if lr is not None else (5e-6 if self.params["variant"] == "full" else 1e-4)

    def artifact_bytes(self) -> int | None:
        """Full: the UNet in the pipeline's dtype (about 1.7 GB at SD 1.4's size in float16); LoRA:
        a few MB, not checked."""
        if self.params["variant"] != "full":
            return None
        unet = self.context.pipeline().unet
        return sum(p.numel() * p.element_size() for p in unet.parameters())

    def keeps_weights(self) -> bool:
        return self.params["keep_weights"]

    def prompt_text(self, request: GenerationRequest) -> str:
        return request.prompt.render(self.params["subject"])

    # -- tuning ---------------------------------------------------------------------------------------

    def _trainable_unet(self, seed: int):
        """A float32 copy of the base UNet with what this variant trains requiring gradients."""
        unet = copy.deepcopy(self.context.pipeline().unet).float()
        unet.requires_grad_(self.params["variant"] == "full")
        if self.params["variant"] == "lora":
            from peft import LoraConfig

            r = self.params["lora_rank"]
            with torch.random.fork_rng(devices=[]):  # LoRA's gaussian init draws from the global RNG
                torch.manual_seed(seed)
                unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian",
                                            target_modules=list(LORA_TARGETS)))
        return unet

    def tune(self, face, work_dir: Path) -> dict:
        pipe, p = self.context.pipeline(), self.params
        seed = face_seed(p["seed"], face.face_id)
        generator = torch.Generator("cpu").manual_seed(seed)
        unet = self._trainable_unet(seed)
        posterior = encode_posterior(pipe.vae, training_pixels(face.path, training_resolution(pipe)))
        classes = self.class_latents() if p["num_class_images"] and p["prior_loss_weight"] else []
        loss_of = DenoisingLoss(pipe, generator)
        b = p["batch_size"]
        with torch.no_grad():
            instance_text = encode_text(pipe, [p["instance_prompt"]] * b)
            class_text = encode_text(pipe, [p["class_prompt"]] * b)

        def loss() -> torch.Tensor:
            value = loss_of(unet, posterior.sample(b, generator, 0.0), instance_text)
            if classes:
                picks = torch.randint(0, len(classes), (b,), generator=generator).tolist()
                class_latents = torch.cat([classes[i].sample(1, generator, 0.0) for i in picks])
                value = value + p["prior_loss_weight"] * loss_of(unet, class_latents, class_text)
            return value

        with frozen(pipe.vae, pipe.text_encoder), torch.enable_grad():
            unet.train()
            losses = optimise(unet.parameters(), steps=p["steps"], learning_rate=self.learning_rate(),
                              accumulation=1, loss=loss, max_grad_norm=p["max_grad_norm"])
            unet.eval()
        trained = sum(w.numel() for w in unet.parameters() if w.requires_grad)
        self._save(unet, work_dir)
        return {"trained_params": trained, "variant": self.variant_text(), "steps": p["steps"], "losses": losses,
                "learning_rate": self.learning_rate(), "class_images": len(classes)}

    def _save(self, unet, work_dir: Path) -> None:
        pipe = self.context.pipeline()
        if self.params["variant"] == "full":
            unet.to(pipe.unet.dtype).save_pretrained(work_dir / UNET_DIR, safe_serialization=True)
            return
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(work_dir, unet_lora_layers=layers, safe_serialization=True)

    def load_tuned(self, face, artifact_dir: Path) -> Any:
        """Full: the face's UNet, on the pipeline's device and dtype; LoRA: the artifact folder."""
        if self.params["variant"] == "lora":
            if not (artifact_dir / LORA_FILE).is_file():
                raise F2DBenchError(f"{artifact_dir}: no {LORA_FILE}; delete the folder to tune the face again")
            return artifact_dir
        from diffusers import UNet2DConditionModel

        pipe = self.context.pipeline()
        try:
            unet = UNet2DConditionModel.from_pretrained(artifact_dir / UNET_DIR, torch_dtype=pipe.unet.dtype)
        except (OSError, ValueError) as exc:
            raise F2DBenchError(f"{artifact_dir / UNET_DIR}: not a loadable UNet ({exc}); delete the folder "
                                "to tune the face again") from None
        return unet.to(pipe.device).eval()

    # -- rendering ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _face_unet(self, prepared) -> Iterator[None]:
        """The shared pipeline with the face's UNet (full) or a private UNet holding its LoRA."""
        pipe = self.context.pipeline()
        base = pipe.unet
        if self.params["variant"] == "full":
            unet = prepared
        else:
            if self._lora_unet is None:
                self._lora_unet = copy.deepcopy(base)
            unet = self._lora_unet
        pipe.unet = unet
        try:
            if self.params["variant"] == "lora":
                pipe.load_lora_weights(str(prepared), weight_name=LORA_FILE, adapter_name="face")
            yield
        finally:
            if self.params["variant"] == "lora" and "face" in getattr(unet, "peft_config", {}):
                unet.delete_adapters("face")
            pipe.unet = base

    def generate(self, requests: Sequence[GenerationRequest]):
        """Each face's requests in one pipeline call with that face's UNet; results in request order."""
        def render(group):
            with self._face_unet(group[0].prepared):
                return super(DreamBoothMethod, self).generate(group)

        return render_per_face(requests, render)

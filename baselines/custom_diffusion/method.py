"""``custom-diffusion``: per face, the cross-attention keys and values plus a modifier token ``<new1>``.

Tuning (per face): every cross-attention layer (``attn2``) of the UNet gets diffusers'
``CustomDiffusionAttnProcessor2_0`` with its own K/V projections, initialised from the layer's; these
and one new word vector (started from the vocabulary entry ``initializer_token``) are trained with the
denoising loss on the face photo (mirrored with probability 0.5 when ``hflip``), plus
``prior_loss_weight`` x the same loss on class images the base model renders of ``class_prompt`` (made
once per run). The artifact is diffusers'
format: ``pytorch_custom_diffusion_weights.bin`` (``load_attn_procs``) and ``<new1>.safetensors``
(``load_textual_inversion``). Rendering installs a face's K/V for that face's requests only and writes
its vector into the prompt; the base UNet's processors are restored after every batch.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.methods.base import GenerationRequest, MethodContext, render_per_face
from f2d_bench.methods.token_slots import token_embedding_module
from f2d_bench.methods.word_vectors import TOKEN, WordVectorMethod
from f2d_bench.tuning.class_images import ClassPrior
from f2d_bench.tuning.diffusion import (
    DenoisingLoss, encode_posterior, encode_text, face_seed, frozen, needs_loss_scaling, optimise,
    training_pixels, training_resolution,
)
from f2d_bench.weights import WeightsLayoutError, read_torch_file

WEIGHTS_FILE = "pytorch_custom_diffusion_weights.bin"
MODIFIER = "<new1>"
TOKEN_FILE = f"{MODIFIER}.safetensors"
_KV = ("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")


def cross_attention_layers(unet) -> dict[str, torch.nn.Module]:
    """Processor name (``...attn2.processor``) -> the cross-attention module, for every ``attn2``."""
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    return {n: unet.get_submodule(n[: -len(".processor")]) for n in names}


def trained_parameter_count(unet, text_encoder) -> int:
    """Table 2's #Params of CustomDiffusion: every ``attn2``'s K and V weights plus the word-embedding
    table with one added token (the official code optimises the whole table and keeps only the new row's
    change). SD 1.4: 19,169,280 + 49,409 x 768 = 57,115,392, the paper's 5.71e7."""
    kv = sum(a.to_k.weight.numel() + a.to_v.weight.numel() for a in cross_attention_layers(unet).values())
    table = token_embedding_module(text_encoder)
    return kv + (table.num_embeddings + 1) * table.embedding_dim


@dataclass(frozen=True, eq=False)
class CustomDiffusionFace:
    """A tuned face: its K/V weights by processor name (CPU float32) and its word vector (1, width)."""

    kv: dict[str, dict[str, torch.Tensor]]
    vectors: torch.Tensor


class CustomDiffusionMethod(ClassPrior, WordVectorMethod):
    name = "custom-diffusion"
    summary = "CustomDiffusion (Kumari et al. 2023): cross-attention K/V + modifier token <new1> per face"
    tunes = True
    n_vectors = 1
    defaults = {
        # The official face/object run of the diffusers example: 250 steps, lr 1e-5 scaled by the batch
        # (and x2 with prior preservation), batch 2, horizontal flips, 200 class images.
        "steps": 250,
        "learning_rate": 1e-5,
        "scale_lr": True,
        "batch_size": 2,
        "hflip": True,
        "prior_loss_weight": 1.0,
        "num_class_images": 200,
        # The diffusers README's run on human faces: `--class_prompt="person"` (the images' prompt and caption).
        "class_prompt": "person",
        # One vocabulary entry, as diffusers resolves --initializer_token (tokenizer.encode([token]) looks
        # the string up whole) and Adobe's code hard-codes: "ktn" is id 42170 of CLIP's BPE vocabulary.
        "initializer_token": "ktn",
        "max_grad_norm": 1.0,
        "caption": "photo of a {}",
        "subject": f"{TOKEN} person",
        "seed": 0,
    }

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        self.require_positive_ints("steps", "batch_size")
        if not isinstance(self.params["num_class_images"], int) or self.params["num_class_images"] < 0:
            raise ConfigError("param num_class_images must be an integer >= 0 (0: no prior preservation)")
        if str(self.params["caption"]).count("{}") != 1:
            raise ConfigError("param caption must hold one {} (where the subject goes)")

    def info(self) -> dict:
        pipe = self.context.pipeline()
        return {"trained_params": trained_parameter_count(pipe.unet, pipe.text_encoder),
                "weights": "none (tuned per face)"}

    def _prior(self) -> bool:
        return self.params["num_class_images"] > 0 and self.params["prior_loss_weight"] > 0

    def effective_learning_rate(self) -> float:
        p = self.params
        scale = p["batch_size"] * (2 if self._prior() else 1) if p["scale_lr"] else 1
        return float(p["learning_rate"]) * scale

    # -- K/V processors -------------------------------------------------------------------------------
    def _processors(self, kv: Mapping[str, Mapping[str, torch.Tensor]] | None) -> dict[str, Any]:
        """A CustomDiffusion processor for every ``attn2`` (weights from ``kv``, else the layer's own)."""
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

        unet = self.context.pipeline().unet
        out = {}
        for name, attn in cross_attention_layers(unet).items():
            proc = CustomDiffusionAttnProcessor2_0(
                train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
                cross_attention_dim=attn.to_k.in_features)
            with torch.no_grad():
                k = kv[name][_KV[0]] if kv is not None else attn.to_k.weight
                v = kv[name][_KV[1]] if kv is not None else attn.to_v.weight
                proc.to_k_custom_diffusion.weight.copy_(k)
                proc.to_v_custom_diffusion.weight.copy_(v)
            out[name] = proc.to(unet.device, unet.dtype if kv is not None else torch.float32)
        return out

    @contextlib.contextmanager
    def _installed(self, processors: Mapping[str, Any]) -> Iterator[None]:
        """The shared UNet with ``processors`` on its cross-attention layers; restored on exit."""
        unet = self.context.pipeline().unet
        before = dict(unet.attn_processors)
        unet.set_attn_processor({**before, **processors})
        try:
            yield
        finally:
            unet.set_attn_processor(before)

    # -- tuning ---------------------------------------------------------------------------------------

    def tune(self, face, work_dir: Path) -> dict:
        pipe, p = self.context.pipeline(), self.params
        generator = torch.Generator("cpu").manual_seed(face_seed(p["seed"], face.face_id))
        table = token_embedding_module(pipe.text_encoder)
        init_id = initializer_id(pipe.tokenizer, p["initializer_token"])
        vector = torch.nn.Parameter(table.weight[[init_id]].detach().float().clone())
        processors = self._processors(None)
        trainable = [vector] + [w for proc in processors.values() for w in proc.parameters()]
        posterior = encode_posterior(pipe.vae, training_pixels(face.path, training_resolution(pipe)))
        classes = self.class_latents() if self._prior() else []
        loss_of = DenoisingLoss(pipe, generator)
        flip_p = 0.5 if p["hflip"] else 0.0
        b = p["batch_size"]
        caption = p["caption"].format(self.subject_text())

        def loss() -> torch.Tensor:
            latents = posterior.sample(b, generator, flip_p)
            with self.written(vector[None].expand(b, -1, -1)):
                text = encode_text(pipe, [caption] * b)
            value = loss_of(pipe.unet, latents, text)
            if classes:
                picks = torch.randint(0, len(classes), (b,), generator=generator).tolist()
                class_latents = torch.cat([classes[i].sample(1, generator, flip_p) for i in picks])
                class_text = encode_text(pipe, [p["class_prompt"]] * b)
                value = value + p["prior_loss_weight"] * loss_of(pipe.unet, class_latents, class_text)
            return value

        with frozen(pipe.unet, pipe.vae, pipe.text_encoder), self._installed(processors), torch.enable_grad():
            for w in trainable:
                w.requires_grad_(True)
            losses = optimise(trainable, steps=p["steps"], learning_rate=self.effective_learning_rate(),
                              accumulation=1, loss=loss, max_grad_norm=p["max_grad_norm"],
                              loss_scaling=needs_loss_scaling(pipe))
        self._save(work_dir, processors, vector)
        return {"trained_params": trained_parameter_count(pipe.unet, pipe.text_encoder),
                "trained_tensors": sum(w.numel() for w in trainable), "steps": p["steps"], "losses": losses,
                "learning_rate": self.effective_learning_rate(), "class_images": len(classes),
                "loss_scaling": needs_loss_scaling(pipe)}

    def _save(self, work_dir: Path, processors: Mapping[str, Any], vector: torch.Tensor) -> None:
        """diffusers' files: the K/V weights by processor name (the self-attention processors as the
        empty entries diffusers writes and expects) and the token file."""
        from safetensors.torch import save_file

        unet = self.context.pipeline().unet
        state: dict[str, Any] = {}
        for name in unet.attn_processors:
            if name in processors:
                for key in _KV:
                    weight = getattr(processors[name], key.split(".")[0]).weight
                    state[f"{name}.{key}"] = weight.detach().float().cpu().clone()
            else:
                state[name] = {}
        torch.save(state, work_dir / WEIGHTS_FILE)
        save_file({MODIFIER: vector.detach().float().cpu().clone()[0]}, str(work_dir / TOKEN_FILE))

    def load_tuned(self, face, artifact_dir: Path) -> CustomDiffusionFace:
        from safetensors.torch import load_file

        path = artifact_dir / WEIGHTS_FILE
        state = read_torch_file(path, error=WeightsLayoutError)
        unet = self.context.pipeline().unet
        layers = cross_attention_layers(unet)
        # Strict, as every loader here: the K/V of each attn2 and an empty dict for every other processor,
        # nothing else (a `crossattn` run's q/out weights would otherwise be dropped without a word).
        others = [n for n in unet.attn_processors if n not in layers]
        expected = {f"{n}.{k}" for n in layers for k in _KV} | set(others)
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        filled = [n for n in others if n in state and not (isinstance(state[n], dict) and not state[n])]
        if extra or missing or filled:
            what = "; ".join(f"{label} {', '.join(keys[:2])}{' ...' if len(keys) > 2 else ''}"
                             for label, keys in (("unexpected", extra), ("missing", missing),
                                                 ("not an empty self-attention entry:", filled)) if keys)
            raise F2DBenchError(f"{path}: not this UNet's CustomDiffusion K/V weights ({what}); delete the folder "
                                "to tune again")
        kv: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for name, attn in layers.items():
            for key in _KV:
                tensor = state.get(f"{name}.{key}")
                want = (attn.to_k.out_features, attn.to_k.in_features)
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != want:
                    raise F2DBenchError(f"{path}: no {name}.{key} of shape {want}; the file is not this "
                                        "UNet's CustomDiffusion weights (delete the folder to tune again)")
                kv[name][key] = tensor.float()
        token_path = artifact_dir / TOKEN_FILE
        tokens = load_file(str(token_path))
        width = token_embedding_module(self.context.pipeline().text_encoder).embedding_dim
        if set(tokens) != {MODIFIER} or tuple(tokens[MODIFIER].shape) != (width,):
            raise F2DBenchError(f"{token_path}: expected one tensor {MODIFIER!r} of shape ({width},)")
        return CustomDiffusionFace(kv=dict(kv), vectors=tokens[MODIFIER].float()[None])

    # -- rendering ------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]):
        """Each face's requests in one pipeline call with that face's K/V; results in request order."""
        def render(group):
            with self._installed(self._processors(group[0].prepared.kv)):
                return super(CustomDiffusionMethod, self).generate(group)

        return render_per_face(requests, render)


def initializer_id(tokenizer, token: str) -> int:
    """The id of ``token`` as one entry of the tokenizer's vocabulary (not the word ``token`` tokenized:
    as a word, "ktn" is "k" + "tn</w>"; the entry "ktn" is id 42170)."""
    found = tokenizer.get_vocab().get(token)
    if found is None:
        raise ConfigError(f"param initializer_token: {token!r} is not an entry of the tokenizer's vocabulary "
                          "(diffusers' --initializer_token must be one); the official value is 'ktn'")
    return int(found)

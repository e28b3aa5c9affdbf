"""``textual-inversion``: one new word vector per face, learned with the denoising loss on the one photo.

Tuning (per face): the vector starts as the embedding of ``initializer`` ("person"), every other
weight is frozen, and AdamW fits it for ``steps`` updates of ``batch_size`` x ``accumulation`` samples.
Each sample is the face photo at the UNet's training resolution, mirrored with probability ``flip_p``,
captioned by a template with the learned token as the subject. The artifact is diffusers'
``learned_embeds.safetensors`` (``{"<face_id>": (1, width)}``), which ``load_textual_inversion``
reads. Rendering writes each face's vector into the prompt (faces share a batch); see README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from f2d_bench.errors import ConfigError, F2DBenchError
from f2d_bench.methods.base import MethodContext
from f2d_bench.methods.token_slots import single_token_ids, token_embedding_module
from f2d_bench.methods.word_vectors import TOKEN, WordVectorMethod, WordVectors, word_vector_parameters
from f2d_bench.tuning.diffusion import (
    DenoisingLoss, encode_posterior, encode_text, face_seed, frozen, needs_loss_scaling, optimise,
    training_pixels, training_resolution,
)

ARTIFACT = "learned_embeds.safetensors"
#: Captions of the training samples ("{}" is the learned token). Our own short list in the spirit of
#: the official object templates (a deviation recorded in README.md).
TEMPLATES = ("a photo of {}", "a close-up photo of {}", "a portrait photo of {}", "a cropped photo of {}")


def token_name(face_id: str) -> str:
    """The token a face's vector is saved under (what a user types after ``load_textual_inversion``)."""
    return f"<{face_id}>"


class TextualInversionMethod(WordVectorMethod):
    name = "textual-inversion"
    summary = "TextualInversion (Gal et al. 2023): one learned word vector per face"
    tunes = True
    tuning_reads_sampling = False  # no class images: sampling decides only the renders
    n_vectors = 1
    defaults = {
        # The diffusers example's documented run: 3000 steps, lr 5e-4 scaled by batch x accumulation.
        "steps": 3000,
        "learning_rate": 5e-4,
        "scale_lr": True,
        "batch_size": 1,
        "accumulation": 4,
        "initializer": "person",
        "flip_p": 0.5,
        "templates": list(TEMPLATES),
        "subject": TOKEN,
        "seed": 0,
    }

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        self.require_positive_ints("steps", "batch_size", "accumulation")
        templates = self.params["templates"]
        if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise ConfigError("param templates must be a non-empty list of captions, each with one {}")

    def info(self) -> dict:
        return {"trained_params": self.trained_params(), "weights": "none (tuned per face)"}

    def trained_params(self) -> int:
        """One word vector: the text width (768 for SD 1.4)."""
        return word_vector_parameters(self.context.pipeline().text_encoder, self.n_vectors)

    def effective_learning_rate(self) -> float:
        p = self.params
        scale = p["batch_size"] * p["accumulation"] if p["scale_lr"] else 1
        return float(p["learning_rate"]) * scale

    # -- tuning ---------------------------------------------------------------------------------------
    def tune(self, face, work_dir: Path) -> dict:
        from safetensors.torch import save_file

        pipe = self.context.pipeline()
        p = self.params
        generator = torch.Generator("cpu").manual_seed(face_seed(p["seed"], face.face_id))
        (init_id,) = single_token_ids(pipe.tokenizer, [p["initializer"]])
        table = token_embedding_module(pipe.text_encoder)
        vector = torch.nn.Parameter(table.weight[init_id].detach().float().clone()[None])  # (1, width)
        loss_of = DenoisingLoss(pipe, generator)
        posterior = encode_posterior(pipe.vae, training_pixels(face.path, training_resolution(pipe)))
        templates = list(p["templates"])

        def loss() -> torch.Tensor:
            b = p["batch_size"]
            picks = torch.randint(0, len(templates), (b,), generator=generator).tolist()
            latents = posterior.sample(b, generator, p["flip_p"])
            texts = [templates[i].format(self.subject_text()) for i in picks]
            with self.written(vector[None].expand(b, -1, -1)):
                text = encode_text(pipe, texts)
            return loss_of(pipe.unet, latents, text)

        with frozen(pipe.unet, pipe.vae, pipe.text_encoder), torch.enable_grad():
            losses = optimise([vector], steps=p["steps"], learning_rate=self.effective_learning_rate(),
                              accumulation=p["accumulation"], loss=loss, loss_scaling=needs_loss_scaling(pipe))
        save_file({token_name(face.face_id): vector.detach().cpu().contiguous()}, str(work_dir / ARTIFACT))
        return {"trained_params": vector.numel(), "steps": p["steps"], "losses": losses,
                "learning_rate": self.effective_learning_rate(), "loss_scaling": needs_loss_scaling(pipe)}

    def load_tuned(self, face, artifact_dir: Path) -> WordVectors:
        from safetensors.torch import load_file

        path = artifact_dir / ARTIFACT
        tensors = load_file(str(path))
        width = self.trained_params()
        name = token_name(face.face_id)
        if set(tensors) != {name} or tuple(tensors[name].shape) != (1, width):
            found = {k: tuple(v.shape) for k, v in tensors.items()}
            raise F2DBenchError(f"{path}: expected one tensor {name!r} of shape (1, {width}), found {found}; "
                                "delete the folder to tune the face again")
        return WordVectors(tensors[name].float())

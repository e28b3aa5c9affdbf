"""Shared rendering for methods built on the base Stable Diffusion pipeline.

Every request is turned into its own text embedding first (``prompt_embeds``), so requests with
different subjects (different faces, different injected tokens) share one pipeline call.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from f2d_bench.methods.base import GenerationRequest, Method
from f2d_bench.pipelines import noise  # a module reference: benchmarks time noise.draw_ahead


class StableDiffusionMethod(Method):
    """A method whose images come from the base pipeline, conditioned on per-request embeddings.

    Subclasses override ``prompt_embeds`` (F2D injects identity tokens there); the unconditional
    branch of classifier-free guidance is always the empty prompt, as in diffusers.
    """

    def prompt_text(self, request: GenerationRequest) -> str:
        """The text fed to the text encoder for this request."""
        raise NotImplementedError

    @torch.inference_mode()
    def prompt_embeds(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """Text-encoder output, shape (batch, 77, text width)."""
        pipe = self.context.pipeline()
        embeds, _ = pipe.encode_prompt(
            [self.prompt_text(r) for r in requests], pipe.device, 1, do_classifier_free_guidance=False
        )
        return embeds

    @torch.inference_mode()
    def negative_embeds(self, batch: int) -> torch.Tensor:
        """The empty prompt's embedding for ``batch`` rows, encoded once per batch size (no method changes
        the embeddings of the start, end and padding tokens it is made of)."""
        cache = self.__dict__.setdefault("_negative_embeds", {})
        if batch not in cache:
            pipe = self.context.pipeline()
            cache[batch], _ = pipe.encode_prompt([""] * batch, pipe.device, 1, do_classifier_free_guidance=False)
        return cache[batch]

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Image.Image]:
        sampling = self.context.sampling
        return pipeline_images(
            self.context.pipeline(),
            prompt_embeds=self.prompt_embeds(requests),
            negative_prompt_embeds=self.negative_embeds(len(requests)),
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            height=sampling.height,
            width=sampling.width,
            generator=[r.generator for r in requests],
        )


@torch.inference_mode()
def pipeline_images(pipe, **call) -> list[Image.Image]:
    """``pipe(**call)``'s images with the float-to-uint8 step on the pipeline's device: the pixels of
    ``output_type="pil"`` (the same multiply, round half to even and cast), moving a quarter of the bytes.

    With one CPU generator per image, each image's noise is drawn ahead and copied to the device once
    (``f2d_bench.pipelines.noise``: the same values as the generator path, which unsupported schedulers keep).
    """
    feed = noise.draw_ahead(pipe, call)
    if feed is not None:
        call = {**call, "latents": feed.initial, "generator": feed}
    images = pipe(**call, output_type="pt").images  # (batch, 3, H, W) in [0, 1], as "pil" has before numpy
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]

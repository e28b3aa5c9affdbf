"""``sd-class``: plain Stable Diffusion with the subject written as the class phrase ("a person").

It knows nothing of the face: its images are the text-fidelity reference a personalization method is
compared with.
"""

from __future__ import annotations

from f2d_bench.methods.base import GenerationRequest
from f2d_bench.methods.stable_diffusion import StableDiffusionMethod


class SDClassMethod(StableDiffusionMethod):
    name = "sd-class"
    summary = "plain Stable Diffusion, subject written as the class phrase"

    def prompt_text(self, request: GenerationRequest) -> str:
        return request.prompt.render(self.context.prompt_set.class_phrase)

"""Methods whose subject is one or more learned word vectors per face (TextualInversion, CelebBasis,
CustomDiffusion's modifier token), rendered on the shared base pipeline.

The prompt's subject is the method's ``subject`` text with ``<token>`` replaced by slot words; each
request's vectors are written into the word-embedding rows of those slots (``token_slots``), which is
what a new token with that embedding gives, so faces share one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from f2d_bench.errors import ConfigError
from f2d_bench.methods.base import GenerationRequest, MethodContext
from f2d_bench.methods.stable_diffusion import StableDiffusionMethod
from f2d_bench.methods.token_slots import single_token_ids, token_embedding_module, written_slots

TOKEN = "<token>"
#: Ordinary single CLIP tokens that stand for the learned vectors in the prompt (their own embedding
#: rows are overwritten, so which words they are does not matter; they only need to be one token each).
SLOT_WORDS = ("sks", "bnha", "olis")


def word_vector_parameters(text_encoder, n_vectors: int) -> int:
    """Trained parameters of ``n_vectors`` new word vectors: n x the text width (768 for SD 1.4)."""
    return n_vectors * token_embedding_module(text_encoder).embedding_dim


@dataclass(frozen=True, eq=False)
class WordVectors:
    """A face's learned vectors, (n_vectors, text width) float32 on the CPU."""

    vectors: torch.Tensor


class WordVectorMethod(StableDiffusionMethod):
    """Renders each request with its face's ``WordVectors`` (``prepared``) in place of ``<token>``.

    Subclasses set ``n_vectors`` and a ``subject`` param default containing ``<token>`` once.
    """

    n_vectors: int = 1

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        subject = self.params.get("subject", TOKEN)
        if not isinstance(subject, str) or subject.count(TOKEN) != 1:
            raise ConfigError(f"param subject {subject!r} must contain {TOKEN} exactly once (where the face goes)")

    @property
    def slot_text(self) -> str:
        return " ".join(SLOT_WORDS[: self.n_vectors])

    def subject_text(self) -> str:
        return self.params.get("subject", TOKEN).replace(TOKEN, self.slot_text)

    def slot_ids(self) -> tuple[int, ...]:
        return single_token_ids(self.context.pipeline().tokenizer, SLOT_WORDS[: self.n_vectors])

    def prompt_text(self, request: GenerationRequest) -> str:
        return request.prompt.render(self.subject_text())

    def written(self, vectors: torch.Tensor):
        """Context in which text-encoder calls get ``vectors`` (B, n_vectors, width) at the slots."""
        te = self.context.pipeline().text_encoder
        return written_slots(token_embedding_module(te), self.slot_ids(), vectors, what=f"{self.name} subject")

    @torch.inference_mode()
    def prompt_embeds(self, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        """Text embeddings (batch, 77, width) with each request's own word vectors."""
        vectors = torch.stack([r.prepared.vectors for r in requests])
        with self.written(vectors):
            return super().prompt_embeds(requests)

"""Writing F2D's two identity tokens into the CLIP text encoder, without patching transformers.

The official inference computes ``text_model.embeddings(input_ids)`` (token + position embeddings),
overwrites the rows of the placeholder "f" and of the token after it ("l") with S1*, S2*, and runs the
rest of the text encoder on that: the vectors are written after the position embeddings
(``token_slots.embeddings_module``). Each batch row gets its own pair of vectors, so requests for
different faces share one text-encoder (and one pipeline) call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from f2d_bench.methods.token_slots import embeddings_module, single_token_ids, slot_positions, written_slots

#: The subject text of every F2D prompt (official: "f l", no class word).
SUBJECT = "f l"
_WHAT = f"F2D placeholder (subject {SUBJECT!r})"


def placeholder_ids(tokenizer) -> tuple[int, int]:
    """Token ids of the two subject words "f" and "l" (each must be a single token)."""
    first, second = single_token_ids(tokenizer, SUBJECT.split())
    return first, second


def placeholder_positions(input_ids: torch.Tensor, first_id: int, second_id: int) -> torch.Tensor:
    """Per row, the position of the first "f" token, which must be followed by "l"; (B,) int64."""
    return slot_positions(input_ids, (first_id, second_id), _WHAT)


@contextmanager
def injected_tokens(text_encoder: nn.Module, ids: tuple[int, int], vectors: torch.Tensor) -> Iterator[None]:
    """While active, every text-encoder call gets ``vectors`` (B, 2, width) at its "f l" positions."""
    with written_slots(embeddings_module(text_encoder), ids, vectors, _WHAT):
        yield

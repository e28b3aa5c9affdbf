"""Per-prompt word vectors written into the CLIP text encoder, without touching its vocabulary.

Several methods represent the subject as learned word vectors: F2D's S1*/S2*, TextualInversion's
token, CustomDiffusion's ``<new1>``, CelebBasis's two tokens. Adding a token per face to the tokenizer
and the embedding table would make every face a different model and forbid sharing a batch. Instead the
prompt holds one ordinary *slot* token per vector, and a forward hook overwrites the output rows at
the slots with each prompt's own vectors, so prompts for different faces share one text-encoder call.

Where the rows are written decides what the vectors mean:

- ``token_embedding_module``: the word embedding before position embeddings are added. This is
  exactly what a new token with that embedding gives (diffusers' ``load_textual_inversion``).
- ``embeddings_module``: the sum of word and position embeddings (F2D's official inference overwrites
  the rows there, so its vectors carry no position embedding).

Gradients flow through the hook into ``vectors``, so training uses the same path as rendering.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn


def embeddings_module(text_encoder: nn.Module) -> nn.Module:
    """The token+position embedding module of a transformers CLIP text model.

    transformers 4.x nests it as ``text_model.embeddings``; 5.x has ``embeddings`` at the top.
    """
    inner = getattr(text_encoder, "text_model", text_encoder)
    module = getattr(inner, "embeddings", None)
    if module is None:
        raise TypeError(f"{type(text_encoder).__name__} has no CLIP text embeddings module")
    return module


def token_embedding_module(text_encoder: nn.Module) -> nn.Embedding:
    """The word-embedding table (vocabulary x width) of a CLIP text model."""
    module = text_encoder.get_input_embeddings()
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"{type(text_encoder).__name__}'s input embeddings are not an nn.Embedding")
    return module


def single_token_ids(tokenizer, words: Sequence[str]) -> tuple[int, ...]:
    """The token id of each word; each must be one token, or the slots could not be found."""
    ids = []
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False).input_ids
        if len(tokens) != 1:
            raise ValueError(f"the tokenizer splits the slot word {word!r} into {len(tokens)} tokens")
        ids.append(int(tokens[0]))
    return tuple(ids)


def slot_positions(input_ids: torch.Tensor, slot_ids: Sequence[int], what: str = "slot") -> torch.Tensor:
    """Per row, the position of the first ``slot_ids[0]``, which must be followed by the other slots.

    input_ids: (B, T) integer token ids. Returns (B,) int64 positions. Raises ValueError naming the row
    when a prompt lacks the slots (e.g. cut off by the 77-token limit). ``what`` names them in errors.
    """
    first, rest = int(slot_ids[0]), [int(i) for i in slot_ids[1:]]
    positions = []
    for row, ids in enumerate(input_ids.tolist()):
        if first not in ids:
            raise ValueError(f"prompt {row} of the batch has no {what} token")
        pos = ids.index(first)
        if ids[pos + 1: pos + 1 + len(rest)] != rest:
            raise ValueError(f"prompt {row} of the batch: its first {what} token is not followed by the "
                             f"{len(rest)} other {what} token(s)")
        positions.append(pos)
    return torch.tensor(positions, dtype=torch.long)


@contextmanager
def written_slots(
    module: nn.Module, slot_ids: Sequence[int], vectors: torch.Tensor, what: str = "slot"
) -> Iterator[None]:
    """While active, every call of ``module`` gets ``vectors`` written at its prompts' slot positions.

    module: ``token_embedding_module(te)`` or ``embeddings_module(te)`` (see the module docstring).
    vectors: (B, len(slot_ids), width), row b for prompt b of the batch. Every call inside must encode
    exactly B prompts holding the slots; a block in which the module was never called is an error.
    """
    if vectors.ndim != 3 or vectors.shape[1] != len(slot_ids):
        raise ValueError(f"expected vectors of shape (batch, {len(slot_ids)}, width), got {tuple(vectors.shape)}")
    calls = 0

    def hook(mod, args, kwargs, output):
        nonlocal calls
        input_ids = kwargs.get("input_ids", kwargs.get("input", args[0] if args else None))
        if input_ids is None:
            raise RuntimeError(f"writing {what} vectors needs input_ids; the text encoder got embeddings")
        if output.shape[0] != vectors.shape[0] or output.shape[-1] != vectors.shape[-1]:
            raise RuntimeError(
                f"{what} vectors: the text encoder got {output.shape[0]} prompts of width {output.shape[-1]} "
                f"but {vectors.shape[0]} rows of width {vectors.shape[-1]}"
            )
        pos = slot_positions(input_ids, slot_ids, what).to(output.device)
        rows = torch.arange(output.shape[0], device=output.device)
        out = output.clone()
        for j in range(len(slot_ids)):
            out[rows, pos + j] = vectors[:, j].to(out)
        calls += 1
        return out

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
    if calls == 0:
        raise RuntimeError(f"{what} vectors: the text encoder's embeddings were never computed")

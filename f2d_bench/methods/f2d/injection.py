"""Writing F2D's two identity tokens into the CLIP text encoder, without patching transformers.

The official inference computes ``text_model.embeddings(input_ids)`` (token + position embeddings),
overwrites the rows of the placeholder "f" and of the token after it ("l") with S1*, S2*, and runs the
rest of the text encoder on that. A forward hook on the embeddings module does exactly this: the
injected rows replace the sum, so they carry no position embedding. Each batch row gets its own pair of
vectors, so requests for different faces share one text-encoder (and one pipeline) call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

#: The subject text of every F2D prompt (official: "f l", no class word).
SUBJECT = "f l"


def embeddings_module(text_encoder: nn.Module) -> nn.Module:
    """The token+position embedding module of a transformers CLIP text model.

    transformers 4.x nests it as ``text_model.embeddings``; 5.x has ``embeddings`` at the top.
    """
    inner = getattr(text_encoder, "text_model", text_encoder)
    module = getattr(inner, "embeddings", None)
    if module is None:
        raise TypeError(f"{type(text_encoder).__name__} has no CLIP text embeddings module")
    return module


def placeholder_ids(tokenizer) -> tuple[int, int]:
    """Token ids of the two subject words "f" and "l" (each must be a single token)."""
    ids = []
    for word in SUBJECT.split():
        tokens = tokenizer(word, add_special_tokens=False).input_ids
        if len(tokens) != 1:
            raise ValueError(f"the tokenizer splits the F2D subject word {word!r} into {len(tokens)} tokens")
        ids.append(int(tokens[0]))
    return ids[0], ids[1]


def placeholder_positions(input_ids: torch.Tensor, first_id: int, second_id: int) -> torch.Tensor:
    """Per row, the position of the first ``first_id`` token; it must be followed by ``second_id``.

    input_ids: (B, T) integer token ids. Returns (B,) int64 positions. Raises ValueError naming the
    row when a prompt lacks the pair (e.g. cut off by the 77-token limit).
    """
    positions = []
    for row, ids in enumerate(input_ids.tolist()):
        if first_id not in ids:
            raise ValueError(f"prompt {row} of the batch has no F2D placeholder token (subject {SUBJECT!r})")
        pos = ids.index(first_id)
        if pos + 1 >= len(ids) or ids[pos + 1] != second_id:
            raise ValueError(
                f"prompt {row} of the batch: its first {SUBJECT.split()[0]!r} token is not followed by "
                f"{SUBJECT.split()[1]!r}; write the subject exactly as {SUBJECT!r}"
            )
        positions.append(pos)
    return torch.tensor(positions, dtype=torch.long)


@contextmanager
def injected_tokens(
    text_encoder: nn.Module, ids: tuple[int, int], vectors: torch.Tensor
) -> Iterator[None]:
    """While active, every text-encoder call gets ``vectors`` written at its placeholder positions.

    vectors: (B, 2, width), row b for prompt b of the batch (S1* at the "f" position, S2* at the next).
    Every call inside must encode exactly B prompts, each holding the subject "f l"; a call that
    never reaches the embeddings module (so nothing was injected) is an error at exit.
    """
    if vectors.ndim != 3 or vectors.shape[1] != 2:
        raise ValueError(f"expected vectors of shape (batch, 2, width), got {tuple(vectors.shape)}")
    calls = 0

    def hook(module, args, kwargs, output):
        nonlocal calls
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise RuntimeError("F2D injection needs input_ids; the text encoder was called with embeddings")
        if output.shape[0] != vectors.shape[0] or output.shape[-1] != vectors.shape[-1]:
            raise RuntimeError(
                f"F2D injection: the text encoder got {output.shape[0]} prompts of width {output.shape[-1]} "
                f"but {vectors.shape[0]} token pairs of width {vectors.shape[-1]}"
            )
        pos = placeholder_positions(input_ids, *ids).to(output.device)
        rows = torch.arange(output.shape[0], device=output.device)
        out = output.clone()
        out[rows, pos] = vectors[:, 0].to(out)
        out[rows, pos + 1] = vectors[:, 1].to(out)
        calls += 1
        return out

    handle = embeddings_module(text_encoder).register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
    if calls == 0:
        raise RuntimeError("F2D injection: the text encoder's embeddings module was never called")

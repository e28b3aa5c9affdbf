"""ELITE's cross-attention, as a diffusers attention processor installed only for ELITE's own calls.

The official code replaces ``CrossAttention.__call__`` (a class diffusers no longer has) so that every
``attn2`` of the UNet

1. takes its keys and values of the text context from the global mapper's projections
   (``to_k_global`` / ``to_v_global``, ELITE's fine-tuned copies of the UNet's ``to_k`` / ``to_v``), for
   the conditional and the unconditional branch alike;
2. on the conditional branch adds a local term: the same queries attend over the local words (the
   local mapper's patch words, zero outside the subject mask) through the local mapper's projections,
   and that attention is weighted per query by the global attention on the placeholder word (divided by
   its maximum) and by ``llambda``:

   ``out = softmax(q k_g^T s) v_g + llambda * [softmax(q k_l^T s) * m / max(m)] v_l``,
   ``m = softmax(q k_g^T s)[..., placeholder]``, ``s = head_dim ** -0.5``, per head.

Self-attention (``attn1``) keeps the pipeline's own processor. The base pipeline is shared with other
methods, so :func:`installed` swaps these processors in for one call and puts the originals back.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn


@dataclass
class LocalContext:
    """What the processors of one ELITE call need besides the text context; shared by all of them.

    words: (B, patches, text width) local words of the conditional rows, already masked; None: no local
    term (only the global K/V). index: (B,) int64 position of the placeholder word in each prompt.
    llambda: weight of the local term (official inference 0.8; 0 turns it off).
    """

    words: torch.Tensor | None = None
    index: torch.Tensor | None = None
    llambda: float = 0.0

    def clear(self) -> None:
        self.words, self.index = None, None


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


class ELITEAttnProcessor:
    """Cross-attention with ELITE's global K/V and local term (module docstring). Not an ``nn.Module``: it
    only refers to the mappers' projections, so installing it adds nothing to the UNet's module tree.

    The batch is either the conditional rows alone (B rows, no guidance) or diffusers' classifier-free
    guidance layout, the B unconditional rows first, then the B conditional ones; the local term goes to
    the conditional rows only, as in the official sampling loop.
    """

    def __init__(self, to_k_global: nn.Linear, to_v_global: nn.Linear, to_k_local: nn.Linear,
                 to_v_local: nn.Linear, local: LocalContext):
        self.to_k_global, self.to_v_global = to_k_global, to_v_global
        self.to_k_local, self.to_v_local = to_k_local, to_v_local
        self.local = local

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:  # used as self-attention: the module's own projections
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key, value = self.to_k_global(encoder_hidden_states), self.to_v_global(encoder_hidden_states)
        heads = attn.heads
        q, k, v = _heads(query, heads), _heads(key, heads), _heads(value, heads)

        scores = (q @ k.transpose(-1, -2)).float() * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            scores = scores + mask.view(batch, heads, -1, k.shape[2]).float()
        probs = scores.softmax(dim=-1)  # float32 softmax, then the model's dtype
        out = probs.to(v.dtype) @ v

        words = self.local.words
        if words is not None and encoder_hidden_states is not None:
            n = words.shape[0]
            if batch not in (n, 2 * n):
                raise RuntimeError(f"ELITE attention got a batch of {batch} rows for {n} prompts "
                                   f"(expected {n}, or {2 * n} with classifier-free guidance)")
            start = batch - n  # the conditional rows come last
            out = out.clone()
            out[start:] = out[start:] + self.local_term(attn, q[start:], probs[start:], words)

        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def local_term(self, attn, q: torch.Tensor, probs: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """``llambda * [softmax(q k_l^T s) * m / max(m)] v_l`` for the conditional rows, (B, H, N, d).

        q: (B, H, N, d) queries; probs: (B, H, N, tokens) global attention (float32); words: (B, P, width).
        ``max(m)`` is taken per prompt over heads and queries (the official code takes it over the whole
        batch, which it always ran at size 1; per prompt keeps each face's image independent of its batch).
        """
        heads, index = attn.heads, self.local.index
        words = words.to(q)
        kl, vl = _heads(self.to_k_local(words), heads), _heads(self.to_v_local(words), heads)
        local_probs = ((q @ kl.transpose(-1, -2)).float() * attn.scale).softmax(dim=-1)
        b, h, n, _ = probs.shape
        at_word = probs.gather(-1, index.to(probs.device).view(b, 1, 1, 1).expand(b, h, n, 1))  # (B, H, N, 1)
        at_word = at_word / at_word.amax(dim=(1, 2), keepdim=True)
        weighted = local_probs * at_word * float(self.local.llambda)
        return weighted.to(vl.dtype) @ vl


@contextmanager
def installed(unet: nn.Module, processors: Mapping[str, object]) -> Iterator[None]:
    """While active, ``unet``'s attention layers named in ``processors`` (keys as ``unet.attn_processors``)
    use those processors; every layer gets its previous processor object back afterwards, also on error."""
    saved = dict(unet.attn_processors)
    unknown = sorted(set(processors) - set(saved))
    if unknown:
        raise KeyError(f"the UNet has no attention processors {unknown[:3]}")
    unet.set_attn_processor({name: processors.get(name, proc) for name, proc in saved.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(saved))  # set_attn_processor consumes the dict it is given

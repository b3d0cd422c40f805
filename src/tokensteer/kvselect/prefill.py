"""Chunked prefill for transformers models: long prompts in pieces, with progress.

One forward over a long prompt builds a [T, T] mask per layer type and has the CPU attention
kernel compute every masked score of the sliding-window layers; pieces of ``chunk`` tokens keep
both small, and give TokenSelect one selection per piece. Pieces before the last skip the output
layer (only the prompt's last logits are needed).
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Callable

import torch

PREFILL_CHUNK = 512  # tokens per forward (TokenSelect's own chunk size)

Progress = Callable[[int, int], None]  # (prompt tokens done, prompt tokens in all)


@cache
def cache_kwarg(model_type: type) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` (transformers ≥ 5.25) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


@torch.inference_mode()
def prefill_chunks(
    model: torch.nn.Module,
    ids: torch.Tensor,
    kv_cache,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    chunk: int = PREFILL_CHUNK,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Feed ``ids`` [B, T] into ``kv_cache`` ``chunk`` tokens at a time; return the [B, V] float
    logits after the last token. ``attention_mask`` [B, T] (left padding) and ``position_ids``
    [B, T] are sliced along with the tokens; ``progress(done, T)`` is called after every piece."""
    T = ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(T, device=ids.device)[None].expand(ids.shape[0], T)
    body = getattr(model, model.base_model_prefix, None) if T > chunk else None
    out = None
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        last = e == T
        net = model if last or body is None else body
        kw = {cache_kwarg(type(net)): kv_cache}
        out = net(
            input_ids=ids[:, s:e],
            attention_mask=None if attention_mask is None else attention_mask[:, :e],
            position_ids=position_ids[:, s:e],
            use_cache=True,
            **kw,
            **({"logits_to_keep": 1} if net is model else {}),
        )
        if progress is not None:
            progress(e, T)
    return out.logits[:, -1].float()

"""Chunked prefill for transformers models: long prompts in pieces, with progress.

One forward over a long prompt builds a [T, T] mask per layer type and has the CPU attention
kernel compute every masked score of the sliding-window layers; pieces of ``chunk`` tokens keep
both small, and give TokenSelect one selection per piece. Pieces before the last skip the output
layer (only the prompt's last logits are needed).
"""

from __future__ import annotations

import contextlib
import inspect
from functools import cache
from typing import Callable, Iterator

import torch

from tokensteer.kvselect.attention import use

PREFILL_CHUNK = 512  # tokens per forward (TokenSelect's own chunk size)

Progress = Callable[[int, int], None]  # (prompt tokens done, prompt tokens in all)


@cache
def cache_kwarg(model_type: type) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` (transformers ≥ 5.25) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def iter_prefill(
    model: torch.nn.Module,
    ids: torch.Tensor,
    kv_cache,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    chunk: int = PREFILL_CHUNK,
    dense_tail: bool = False,
) -> Iterator[tuple[int, torch.Tensor | None]]:
    """Feed ``ids`` [B, T] into ``kv_cache`` ``chunk`` tokens at a time, yielding after each piece
    (tokens done, then None, or the [B, V] float logits after the last token with the last piece).
    ``attention_mask`` [B, T] (left padding) and ``position_ids`` [B, T] are sliced along.
    ``dense_tail``: the last piece attends to the whole cache, whatever selector is in use."""
    T = ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(T, device=ids.device)[None].expand(ids.shape[0], T)
    body = getattr(model, model.base_model_prefix, None) if T > chunk else None
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        last = e == T
        net = model if last or body is None else body
        with torch.inference_mode(), (use(None) if last and dense_tail else contextlib.nullcontext()):
            out = net(
                input_ids=ids[:, s:e],
                attention_mask=None if attention_mask is None else attention_mask[:, :e],
                position_ids=position_ids[:, s:e],
                use_cache=True,
                **{cache_kwarg(type(net)): kv_cache},
                **({"logits_to_keep": 1} if net is model else {}),
            )
        yield e, out.logits[:, -1].float() if last else None


def prefill_chunks(
    model: torch.nn.Module,
    ids: torch.Tensor,
    kv_cache,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    chunk: int = PREFILL_CHUNK,
    progress: Progress | None = None,
    dense_tail: bool = False,
) -> torch.Tensor:
    """``iter_prefill`` to the end: the [B, V] float logits after the last token;
    ``progress(done, T)`` is called after every piece."""
    logits = None
    for done, logits in iter_prefill(model, ids, kv_cache, attention_mask, position_ids, chunk, dense_tail):
        if progress is not None:
            progress(done, ids.shape[1])
    return logits

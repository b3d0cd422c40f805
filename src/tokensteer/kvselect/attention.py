"""TokenSelect as a transformers attention function, with per-sequence state (``Selector``).

``install(model)`` registers ``tokensteer_kvselect`` in transformers' AttentionInterface (and its
mask maker as sdpa's) and switches the model to it. Each call looks for the running
``Selector``: the one ``use(selector)`` made current, else the model's default (``attach``); with
none, or in a sliding-window layer (its cost does not grow with the context), it is plain SDPA.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from tokensteer.kvselect.config import KVSelectConfig
from tokensteer.kvselect.positions import Rotary
from tokensteer.kvselect.select import LayerState, layout, soft_vote, top_tokens, window

NAME = "tokensteer_kvselect"

_UNSET = object()  # no ``use`` is active: the model's default selector applies
_current: contextvars.ContextVar = contextvars.ContextVar("kvselect", default=_UNSET)
DEFAULT_ATTR = "tokensteer_kv_selector"  # where ``attach`` puts a model's default on its attention modules


class Selector:
    """The selection state of one sequence batch (one session): each layer's last choice, and counts."""

    def __init__(self, cfg: KVSelectConfig, rotary: dict[str, Rotary | None] | None = None) -> None:
        self.cfg = cfg
        self.rotary = rotary or {}  # per layer type, for un-rotating queries and re-indexing keys
        self.layers: dict[int, LayerState] = {}
        self.stats = {"dense": 0, "selected": 0, "reused": 0, "decode_selected": 0}

    def reset(self) -> None:
        """Forget every cached selection (a new prompt, rows reordered or trimmed)."""
        self.layers.clear()

    def hit_rate(self) -> float | None:
        """Share of decode-step selections the selection cache answered, or None before any."""
        n = self.stats["reused"] + self.stats["decode_selected"]
        return self.stats["reused"] / n if n else None

    def attend(self, module, query, key, value, mask, scaling, position_ids, dropout=0.0):
        """Attention of ``query`` [B, Hq, L, D] over the selected part of ``key``/``value`` [B, Hkv, N, D]."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        cfg = self.cfg
        B, Hq, L, D = query.shape
        N = key.shape[2]
        idx = getattr(module, "layer_idx", 0)
        span = window(N, L, cfg)
        state = self.layers.get(idx)
        if N == L:  # a fresh cache: a new sequence starts
            self.layers.pop(idx, None)
            state = None
        if span is None:
            self.stats["dense"] += 1
            if state is not None:
                state.seen = N
            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling)
        lo, hi = span
        rot = self.rotary.get(getattr(module, "layer_type", None) or "default")
        qflat = None
        if L == 1:  # decode: the selection cache compares un-rotated queries
            q0 = query
            if rot is not None and position_ids is not None:
                q0 = rot.rotate(query, -position_ids[:, -1:].to(query.device))
            qflat = q0[:, :, 0].reshape(B, -1)
        if qflat is not None and state is not None and state.reusable(qflat, N, L, cfg):
            chosen = state.extended(hi)
            state.chosen, state.hi, state.query = chosen, hi, qflat  # the next step compares with this query
            self.stats["reused"] += 1
        else:
            valid = _valid(mask, lo, hi, B)
            votes = soft_vote(query.mean(2), key[:, :, lo:hi], scaling, valid)
            chosen = top_tokens(votes, cfg.k, lo)
            if qflat is not None:
                self.layers[idx] = state = LayerState(qflat, chosen, hi, N, N)
                self.stats["decode_selected"] += 1
            else:
                self.layers.pop(idx, None)
                state = None
        if state is not None:
            state.seen = N
        self.stats["selected"] += 1
        sel = layout(chosen, lo, hi, N)  # [B, S]
        S = sel.shape[1]
        k_sel, v_sel = _gather(key, sel), _gather(value, sel)
        m = _sub_mask(mask, sel, N, L)
        if cfg.extrapolate and rot is not None:  # compact positions: key j at j, the queries last
            k_sel = rot.rotate(k_sel, torch.arange(S, device=sel.device)[None] - sel)
            query = rot.rotate(query, torch.full((L,), S - N, device=query.device))
        return sdpa_attention_forward(module, query, k_sel, v_sel, m, dropout=dropout, scaling=scaling)


def _valid(mask: torch.Tensor | None, lo: int, hi: int, B: int) -> torch.Tensor | None:
    """[B, hi - lo] candidates the last query may see (padding excluded), from a bool or additive mask."""
    if mask is None:
        return None
    last = mask[:, 0, -1, lo:hi]
    ok = last if last.dtype == torch.bool else last == 0
    return ok.expand(B, -1)


def _gather(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] at slots sel [B, S] -> [B, H, S, D]."""
    if sel.shape[0] == 1:
        return x.index_select(2, sel[0])
    B, H, _, D = x.shape
    return x.gather(2, sel[:, None, :, None].expand(B, H, sel.shape[1], D))


def _sub_mask(mask: torch.Tensor | None, sel: torch.Tensor, N: int, L: int) -> torch.Tensor | None:
    """The attention mask restricted to the selected slots; causal within the query chunk."""
    if mask is not None:
        B = max(mask.shape[0], sel.shape[0])
        mask = mask.expand(B, -1, -1, -1)
        return mask.gather(-1, sel.expand(B, -1)[:, None, None, :].expand(B, mask.shape[1], mask.shape[2], sel.shape[1]))
    if L == 1:
        return None
    q_slots = N - L + torch.arange(L, device=sel.device)
    return (sel[:, None, None, :] <= q_slots[None, None, :, None])


def tokenselect_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """The registered attention function: TokenSelect in growing layers, SDPA elsewhere."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sel = _current.get()
    if sel is _UNSET:
        sel = getattr(module, DEFAULT_ATTR, None)
    if sel is None or sliding_window is not None or getattr(module, "is_sliding", False) or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return sel.attend(module, query, key, value, attention_mask, scaling, kwargs.get("position_ids"), dropout)


def install(model: torch.nn.Module) -> bool:
    """Route ``model``'s attention through ``tokenselect_attention`` (SDPA until a selector is active).
    False when the model does not run SDPA or cannot take a registered attention function (it
    stays as it was, and has no --kv-select)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    current = getattr(model.config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":  # eager models (soft-capped logits...) keep theirs: the dense path here is SDPA
        return False
    AttentionInterface.register(NAME, tokenselect_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # else masks come back None: causality silently lost
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME


def rotaries(model: torch.nn.Module) -> dict[str, Rotary | None]:
    """The model's rotary frequencies per attention layer type ("default" when it has one kind)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = set(getattr(text, "layer_types", None) or ["default"])
    return {t: Rotary.of(model, None if t == "default" else t) for t in types}


def new_selector(model: torch.nn.Module, cfg: KVSelectConfig) -> Selector:
    """A fresh selector for one sequence batch of ``model``."""
    return Selector(cfg, rotaries(model))


def attach(model: torch.nn.Module, cfg: KVSelectConfig | None) -> Selector | None:
    """Make ``cfg`` the model's default (used when no ``use`` is active); None turns it off.
    Installs the attention function; returns the default selector."""
    sel = None
    if cfg is not None:
        install(model)
        sel = new_selector(model, cfg)
    for m in model.modules():
        if hasattr(m, "layer_idx"):  # attention modules (and their layers) carry the default
            setattr(m, DEFAULT_ATTR, sel)
    return sel


def default_selector(model: torch.nn.Module) -> Selector | None:
    """The selector ``attach`` set on ``model``, if any."""
    return next((getattr(m, DEFAULT_ATTR) for m in model.modules() if hasattr(m, DEFAULT_ATTR)), None)


@contextlib.contextmanager
def use(selector: Selector | None) -> Iterator[Selector | None]:
    """Run the enclosed forward passes with ``selector`` (None: dense attention, whatever the default)."""
    token = _current.set(selector)
    try:
        yield selector
    finally:
        _current.reset(token)

"""TokenSelect's choice of KV entries: per-head soft voting, top-k, and the selection cache.

Positions here are cache slots (the index along the cache's sequence axis); a query chunk of L
tokens occupies the last L slots of N. Every row of a batch gets its own selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensteer.kvselect.config import KVSelectConfig


def soft_vote(qbar: torch.Tensor, keys: torch.Tensor, scaling: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention mass each candidate key gets, summed over heads: [B, n].

    ``qbar`` [B, Hq, D] (one query per head, the chunk's mean), ``keys`` [B, Hkv, n, D]; query head h
    reads key head h // (Hq / Hkv) as grouped-query attention does. Each head's scores are
    softmaxed on their own before the sum, so a few heads with large logits cannot outvote the rest.
    ``valid`` [B, n] bool excludes candidates (padding).
    """
    B, Hq, D = qbar.shape
    Hkv = keys.shape[1]
    # keys @ queries reads the keys row by row (an einsum here would copy them transposed first)
    s = torch.matmul(keys, qbar.reshape(B, Hkv, Hq // Hkv, D).transpose(-1, -2)).transpose(-1, -2).float() * scaling
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.nan_to_num(s.softmax(-1), nan=0.0).sum((1, 2))


def top_tokens(votes: torch.Tensor, k: int, offset: int) -> torch.Tensor:
    """The ``k`` candidates with the most votes, as sorted cache slots: [B, k]."""
    return votes.topk(k, dim=-1).indices.sort(-1).values + offset


def window(n_kv: int, n_query: int, cfg: KVSelectConfig) -> tuple[int, int] | None:
    """The candidate slots [lo, hi) the top-k is chosen from, or None when attending to everything
    costs no more (the cache is not longer than the sink, the budget and the local window). The
    local window is the last ``local`` slots, the queries' own included: a prompt chunk at least
    that long is its own local window, as in the official code (n_local = the chunk size)."""
    lo, hi = cfg.init, n_kv - max(cfg.local, n_query)
    if hi - lo <= cfg.k:
        return None
    return lo, hi


def layout(chosen: torch.Tensor, lo: int, hi: int, n_kv: int) -> torch.Tensor:
    """All attended slots of each row: the first ``lo``, the chosen ones, then [hi, n_kv): [B, S]."""
    B = chosen.shape[0]
    dev = chosen.device
    head = torch.arange(lo, device=dev).expand(B, lo)
    tail = torch.arange(hi, n_kv, device=dev).expand(B, n_kv - hi)
    return torch.cat((head, chosen, tail), dim=1)


@dataclass
class LayerState:
    """One layer's last selection, for the selection cache."""

    query: torch.Tensor  # [B, Hq*D] the latest un-rotated decode query (consecutive queries are compared)
    chosen: torch.Tensor  # [B, k] slots chosen then
    hi: int  # end of the candidate window then
    made_at: int  # cache length when it was made
    seen: int  # cache length after the layer's latest forward

    def reusable(self, query: torch.Tensor, n_kv: int, n_query: int, cfg: KVSelectConfig) -> bool:
        """A decode step may reuse this selection: the same rows, the very next step of the same
        sequence, fewer than ``refresh`` steps since it was made, and every row's query close
        enough to the previous step's."""
        if self.query.shape != query.shape or n_kv != self.seen + n_query or n_kv - self.made_at >= cfg.refresh:
            return False
        cos = torch.nn.functional.cosine_similarity(self.query.float(), query.float(), dim=-1)
        return bool((cos >= cfg.theta).all())

    def extended(self, hi: int) -> torch.Tensor:
        """The cached choice plus the slots that left the local window since: [B, k + hi - self.hi]."""
        B = self.chosen.shape[0]
        moved = torch.arange(self.hi, hi, device=self.chosen.device).expand(B, hi - self.hi)
        return torch.cat((self.chosen, moved), dim=1)

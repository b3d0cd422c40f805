"""Speculative sampling for formulas over several models (LMA's speculation across terms).

The draft is the formula with every other-model term replaced by the loaded model (same prefix,
same temperature), so drafting costs only the rows the loop batches anyway. The other models then
score all drafted tokens in one forward each, and ``accept`` applies the standard rule: keep a
drafted x with probability min(1, P(x)/Q(x)), and at the first rejection sample the normalised
residual max(0, P − Q). The emitted tokens are distributed exactly as sampling the full formula
token by token (and equal it under greedy decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensteer.formula.ast import Model, Node, Op, Sum, lin
from tokensteer.sampling import Generators, SamplingConfig, draw, sampling_probs, uniforms


def draft_of(n: Node) -> Node:
    """The cheap draft of a formula: other-model terms become the loaded model (same prefix and T)."""
    if isinstance(n, Model):
        return Model(n.prefix, None, n.temperature) if n.model is not None else n
    if isinstance(n, Sum):
        return lin([(w, draft_of(t)) for w, t in n.terms])
    if isinstance(n, Op):
        return Op(n.name, tuple(draft_of(a) for a in n.args), n.param)
    return n


@dataclass
class SpecStats:
    """What speculation did: rounds of verification, drafting steps of the loop, tokens drafted and
    accepted (summed over unfinished prompts), and forward passes of the other models (prefill
    excluded; counted without speculation too)."""

    rounds: int = 0
    draft_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    other_calls: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def accept(
    cfg: SamplingConfig,
    gen: Generators,
    p: torch.Tensor,
    q: torch.Tensor | None,
    drafted: torch.Tensor | None,
    finished: list[bool],
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Verify n drafted tokens for a batch of B prompts.

    ``p`` [n+1, B, V]: the full formula's log-probabilities at each drafted position and one past
    the last; ``q`` [n, B, V]: the draft's; ``drafted`` [n, B]. Distributions go through the
    sampler's temperature and truncations (one-hot under greedy) before the rule is applied.
    Returns (keep, tokens [B], accepted [B]): every prompt keeps the first ``keep`` drafted tokens
    (the fewest any unfinished prompt accepted), and ``tokens`` is each prompt's token at position
    ``keep``: its accepted draft if it accepted more, else a residual sample, or a sample from P
    when every draft was accepted. Cutting a prompt short of what it accepted keeps exactness: the
    dropped tokens are simply sampled again.
    """
    n1, B, V = p.shape
    n = n1 - 1
    P = sampling_probs(cfg, p.reshape(-1, V)).view(n1, B, V)
    done = torch.tensor(finished, dtype=torch.bool)
    if n:
        Q = sampling_probs(cfg, q.reshape(-1, V)).view(n, B, V)
        px = P[:n].gather(-1, drafted[..., None]).squeeze(-1)
        qx = Q.gather(-1, drafted[..., None]).squeeze(-1)
        u = uniforms(gen, B, n).T.to(P.dtype)  # [n, B]
        ok = (u * qx < px) | done  # u < P/Q without dividing; finished prompts do not hold others back
        accepted = ok.long().cumprod(0).sum(0)
    else:
        accepted = torch.zeros(B, dtype=torch.long)
    keep = int(accepted.min())
    tokens = torch.empty(B, dtype=torch.long)
    for b in range(B):
        if keep < n and int(accepted[b]) > keep:
            tokens[b] = drafted[keep, b]
            continue
        dist = P[keep, b] if keep == n else (P[keep, b] - Q[keep, b]).clamp(min=0)
        if float(dist.sum()) <= 0:  # P == Q up to rounding: the residual is empty, P is exact
            dist = P[keep, b]
        tokens[b] = draw(dist[None], gen if gen is None or isinstance(gen, torch.Generator) else [gen[b]])[0]
    return keep, tokens, accepted

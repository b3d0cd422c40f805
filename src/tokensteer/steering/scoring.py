"""Coherence of steered text: its perplexity under the base model and the KL of steered from base.

With a guard the KL is that of the distribution actually sampled (the steered one within the base
model's top-p nucleus); repetition, which a narrow nucleus can cause, is the distinct-2 check's job.
Both come from one teacher-forced pass that steps a steered session and a plain session in
lockstep through the same tokens (the public Session API, so any backend works), never holding
more than one step of full distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from tokensteer.hooks import ResidualEdit


@dataclass
class Coherence:
    """Per text: base-model perplexity of the continuation and mean KL(steered ‖ base) per token."""

    perplexity: list[float]
    kl: list[float]


@torch.inference_mode()
def coherence(lm, prompts: Sequence[str], continuations: Sequence[Sequence[int]], edits: Sequence[ResidualEdit] = (),
              guard: float | None = None) -> Coherence:
    """Teacher-force ``continuations`` (token ids) after ``prompts`` with and without ``edits``
    (``guard``: the KL is taken of the steered distribution restricted to the base's top-``guard``)."""
    rows = [lm.tokenizer.encode(p) for p in prompts]
    base = lm.session(())
    steered = lm.session(edits) if edits else None
    n = len(rows)
    nll, kl = [0.0] * n, [0.0] * n
    try:
        lb = base.prefill(rows)
        ls = steered.prefill(rows) if steered else None
        T = max((len(c) for c in continuations), default=0)
        for t in range(T):
            pb = torch.log_softmax(lb.float(), dim=-1)
            ps = guarded(ls.float(), pb, guard) if steered else None
            step_kl = kl_rows(ps, pb) if steered else None
            nxt = []
            for i, c in enumerate(continuations):
                if t < len(c):
                    nll[i] -= float(pb[i, c[t]])
                    if steered:
                        kl[i] += float(step_kl[i])
                nxt.append(c[t] if t < len(c) else (c[-1] if c else rows[i][-1]))
            if t == T - 1:
                break
            ids = torch.tensor(nxt, dtype=torch.long)
            lb = base.step(ids)
            ls = steered.step(ids) if steered else None
    finally:
        base.close()
        if steered:
            steered.close()
    ppl = [math.exp(v / len(c)) if c else float("nan") for v, c in zip(nll, continuations)]
    return Coherence(ppl, [v / len(c) if c else 0.0 for v, c in zip(kl, continuations)])


def guarded(logits: torch.Tensor, base_logprobs: torch.Tensor, guard: float | None) -> torch.Tensor:
    """Log-probabilities sampled from: ``logits`` within the base's top-``guard`` nucleus (as
    ``SteerGuard`` samples), or all of them without a guard."""
    if guard is None:
        return torch.log_softmax(logits, dim=-1)
    from tokensteer.sampling import nucleus_mask

    return torch.log_softmax(logits.masked_fill(~nucleus_mask(base_logprobs, guard), float("-inf")), dim=-1)


def kl_rows(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p) per row; tokens q leaves out (-inf) add nothing."""
    q = logq.exp()
    return torch.where(q > 0, q * (logq - logp), torch.zeros_like(q)).sum(dim=-1)


def continuation_ids(lm, prompts: Sequence[str], texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each continuation exactly as the eval suite's perplexity scorer reads them.

    The text is re-tokenized after its prompt (not the sampled ids), so the search measures the
    same perplexity the evaluation reports.
    """
    from tokensteer.eval.scorers import continuation_tokens  # the scorer's own definition, on purpose

    tok = lm.tokenizer
    return [continuation_tokens(tok, p, t, tok.encode(p)) for p, t in zip(prompts, texts)]


def ratio_upper_bound(steered: Sequence[float], base: Sequence[float], confidence: float = 0.9,
                      draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Ratio of mean perplexities (steered ÷ base, as the eval reports it) and its upper bound.

    The bound is a one-sided paired bootstrap over prompts at ``confidence`` (seeded, so the search
    stays deterministic); prompts where either text is empty are left out, as the eval leaves them out.
    With ``confidence`` ≤ 0.5 the bound is the estimate itself.
    """
    pairs = [(s, b) for s, b in zip(steered, base) if math.isfinite(s) and math.isfinite(b)]
    if not pairs:
        return float("inf"), float("inf")
    s = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    est = float(s.mean() / b.mean())
    if confidence <= 0.5 or len(pairs) < 2:
        return est, est
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(pairs), (draws, len(pairs)), generator=g)
    ratios = s[idx].mean(dim=1) / b[idx].mean(dim=1)
    return est, max(est, float(torch.quantile(ratios, confidence)))

"""Coherence of steered text: its perplexity under the base model and the KL of steered from base.

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
def coherence(lm, prompts: Sequence[str], continuations: Sequence[Sequence[int]], edits: Sequence[ResidualEdit] = ()) -> Coherence:
    """Teacher-force ``continuations`` (token ids) after ``prompts`` with and without ``edits``."""
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
            ps = torch.log_softmax(ls.float(), dim=-1) if steered else None
            step_kl = (ps.exp() * (ps - pb)).sum(dim=-1) if steered else None
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

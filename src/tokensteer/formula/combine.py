"""Adding the terms' scores: a weighted sum in which a token any term excludes stays excluded."""

from __future__ import annotations

from typing import Sequence

import torch

from tokensteer.formula.ast import Model, Node, Op, Sum

NEG_INF = float("-inf")


def may_exclude(n: Node) -> bool:
    """Whether a node can give −inf to some tokens (filters, and other models with a smaller vocabulary)."""
    if isinstance(n, Model):
        return n.model is not None
    if isinstance(n, Op):
        return n.param is not None and n.name != "temp" or any(may_exclude(a) for a in n.args)
    if isinstance(n, Sum):
        return any(may_exclude(t) for _, t in n.terms)
    return False


def combine(terms: Sequence[tuple[float, torch.Tensor]], exclusive: bool = True) -> torch.Tensor:
    """Σ wᵢ·xᵢ where a token excluded (−inf) by any term stays excluded, whatever the sign of w.

    ``exclusive=False`` promises no term has −inf entries and takes the fast path.
    """
    if not exclusive:
        (w0, x0), rest = terms[0], terms[1:]
        out = x0 * w0
        for w, x in rest:
            out.add_(x, alpha=w)
        return out
    out: torch.Tensor | None = None
    dead: torch.Tensor | None = None
    for w, x in terms:
        neg = torch.isneginf(x)
        part = w * x
        if bool(neg.any()):
            part = part.masked_fill(neg, 0.0)
            dead = neg if dead is None else dead | neg
        out = part if out is None else out + part
    return out if dead is None else out.masked_fill(dead, NEG_INF)


def set_op(name: str, xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``union`` (max), ``intersection`` (min) or ``softunion`` (log-sum-exp) of the operands' log-probabilities."""
    x = torch.stack(list(xs))
    if name == "union":
        return x.max(0).values
    if name == "intersection":
        return x.min(0).values
    return torch.logsumexp(x, 0)

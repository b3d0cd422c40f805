"""Fused formulas: when the same-model terms meet only in the top-level weighted sum, the backend
mixes their rows' final hidden states and runs the output layer once."""

from __future__ import annotations

from tokensteer.formula.ast import Formula, Model, Node, Op, Sum
from tokensteer.formula.check import any_node, kind, peel, top_terms


def is_same_model(n: Node) -> bool:
    """A term on the loaded model itself (one more row of its batched forward)."""
    return isinstance(n, Model) and n.model is None


def prefixes_of(n: Node) -> list[str]:
    """The conditioning texts of the same-model terms, in order of appearance: one row each."""
    if isinstance(n, Model):
        return [n.prefix] if n.model is None and n.prefix else []
    parts = [t for _, t in n.terms] if isinstance(n, Sum) else list(n.args) if isinstance(n, Op) else []
    return list(dict.fromkeys(p for a in parts for p in prefixes_of(a)))


def fusion(formula: Formula, prefixes: list[str]) -> tuple[list[float], bool] | None:
    """Weights over [prompt row, variant rows] when the formula reads its same-model terms only as
    a weighted sum at the top (``M + 2*(M("a", T=0.5) - M("b"))``, under any filters), else None.

    Then Σ wᵢ·log pᵢ = Σ wᵢ·zᵢ − Σ wᵢ·log Zᵢ: the constants vanish in the final normalisation, and
    Σ wᵢ·zᵢ is the output layer applied once to Σ wᵢ·hᵢ. The flag asks for the prompt's own row
    as well, which a nucleus filter (DExperts' base nucleus) restricts to.
    """
    if not prefixes:
        return None
    filters, body = peel(formula.root)
    terms = top_terms(body)
    total = sum(w for w, t in terms if kind(t) in ("model", "operator"))
    div = total if formula.mode == "normalized" else 1.0
    weights = [0.0] * (1 + len(prefixes))
    for w, t in terms:
        if is_same_model(t):  # w·log softmax(z/T) = (w/T)·z − a constant: a temperature is a weight too
            weights[1 + prefixes.index(t.prefix) if t.prefix else 0] += w / div / t.temperature
        elif any_node(t, is_same_model):
            return None  # inside an operator (union, intersection, a filter): needs its own row
    needs_base = any_node(formula.root, lambda n: isinstance(n, Op) and n.name == "nucleus")
    return weights, needs_base

"""Check a formula before it runs: refuse nonsense with a clear message, and say what the
weights really are (``tokensteer formula check`` prints this report).

Rules: a formula needs at least one model term; guides ``C(..)`` are terms of a sum (they rescore
its top-k candidates); in every linear combination of distributions the weights
must sum to a positive number Σλ. In ``normalized`` mode (LMA's weighted log-probability average)
each weight is divided by Σλ; in ``logits`` mode (DExperts, CFG) the weights are used as written
and Σλ acts as an inverse temperature of the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokensteer.errors import UserError
from tokensteer.formula.ast import FILTERS, Const, Formula, Guide, Model, Node, Op, Retrieve, Sum, to_string


@dataclass
class Weight:
    """One top-level term: as written, and as it really enters the combination."""

    term: str
    written: float
    effective: float
    kind: str  # "model", "guide", "operator", "constant"


@dataclass
class Report:
    """What ``check`` found: the effective weights and notes worth reading."""

    formula: Formula
    weights: list[Weight]
    total: float  # Σλ of the top-level distribution terms, as written
    notes: list[str] = field(default_factory=list)


def peel(root: Node) -> tuple[list[Op], Node]:
    """Split the outer filters (topk/topp/nucleus/temp) from the combination under them."""
    filters: list[Op] = []
    while isinstance(root, Op) and root.name in FILTERS:
        filters.append(root)
        root = root.args[0]
    return filters, root


def top_terms(root: Node) -> tuple[tuple[float, Node], ...]:
    return root.terms if isinstance(root, Sum) else ((1.0, root),)


def kind(n: Node) -> str:
    if isinstance(n, Guide):
        return "guide"
    if isinstance(n, Const):
        return "constant"
    if isinstance(n, (Model, Retrieve)):  # R: a mixture of the model's distributions
        return "model"
    return "operator"


def _has_model(n: Node) -> bool:
    if isinstance(n, (Model, Retrieve)):
        return True
    if isinstance(n, Sum):
        return any(_has_model(t) for _, t in n.terms)
    if isinstance(n, Op):
        return any(_has_model(a) for a in n.args)
    return False


def any_node(n: Node, pred) -> bool:
    """Whether any node of the tree satisfies ``pred``."""
    if pred(n):
        return True
    if isinstance(n, Sum):
        return any(any_node(t, pred) for _, t in n.terms)
    if isinstance(n, Op):
        return any(any_node(a, pred) for a in n.args)
    return False


def has_other_model(n: Node) -> bool:
    """Whether a term runs on another local model (what speculative mode speeds up)."""
    return any_node(n, lambda x: isinstance(x, Model) and x.model is not None)


def check_speculative(f: Formula, k: int) -> None:
    """Refuse ``--speculate K`` where it cannot work; K = 0 is off and always fine."""
    if k == 0:
        return
    if k < 0 or k != int(k):
        raise UserError(f"--speculate takes a whole number of tokens to draft, ≥ 1 (0 = off), got {k}")
    if not has_other_model(f.root):
        raise UserError(
            "--speculate needs a term on another model, M(model=\"path\"): every other term is a row of "
            "the loaded model's one batched forward, so there is nothing to speculate; drop --speculate"
        )
    if any_node(f.root, lambda x: isinstance(x, Retrieve)):
        raise UserError("--speculate does not support retrieval terms R(...): drop --speculate or the R term")
    if any_node(f.root, lambda x: isinstance(x, Guide)):
        raise UserError("--speculate does not support guide terms C(...): they rescore each token's context one at a time; drop --speculate or the guide")


def _check_node(n: Node, mode: str) -> None:
    if isinstance(n, Op):
        for a in n.args:
            if isinstance(a, Guide):
                raise UserError(
                    f"the guide {to_string(a)} must be a term of a sum (it rescores the sum's top-k "
                    f"candidates), e.g. M + {to_string(a)}, not an argument of {n.name}"
                )
            _check_node(a, mode)
            if not isinstance(a, Const) and not _has_model(a):
                raise UserError(f"the argument {to_string(a)} of {n.name} has no model term")
    if isinstance(n, Sum):
        for _, t in n.terms:
            _check_node(t, mode)
        dist = [(w, t) for w, t in n.terms if kind(t) in ("model", "operator")]
        if dist:
            total = sum(w for w, _ in dist)
            if total <= 0:
                raise UserError(_bad_sum(n, total, mode))


def _bad_sum(n: Node, total: float, mode: str) -> str:
    s = f"the weights of the distributions in {to_string(n)} sum to Σλ = {total:.4g}"
    if mode == "normalized":
        return s + "; normalized mode divides by Σλ, so it must be > 0 (e.g. add M or lower the negative weights)"
    return s + (
        "; Σλ ≤ 0 would favour tokens the models find unlikely (in logits mode Σλ acts as an "
        "inverse temperature), so it must be > 0; e.g. write M + α*(M(\"a\") - M(\"b\")) instead of M(\"a\") - M(\"b\")"
    )


def check(f: Formula) -> Report:
    """Validate ``f`` and compute its effective top-level weights; raises UserError on nonsense."""
    if not _has_model(f.root):
        raise UserError("the formula has no model term: add M (the model on the prompt)")
    filters, body = peel(f.root)
    _check_node(f.root, f.mode)
    terms = top_terms(body)
    total = sum(w for w, t in terms if kind(t) in ("model", "operator"))
    if total <= 0:
        raise UserError(_bad_sum(body, total, f.mode))
    scale = 1.0
    for flt in filters:
        if flt.name == "temp":
            scale /= flt.param
    div = total if f.mode == "normalized" else 1.0
    weights = []
    for w, t in terms:
        k = kind(t)
        eff = w * scale if k == "guide" else w * scale / div  # the engine divides constants too, not guides
        weights.append(Weight(to_string(t), w, eff, k))
    notes = []
    if f.mode == "normalized":
        if abs(total - 1.0) > 1e-9:
            notes.append(
                f"normalized mode divides the distribution weights by Σλ = {total:.4g}, "
                f"so they become {', '.join(f'{x.effective:.4g}' for x in weights if x.kind in ('model', 'operator'))}"
            )
        if total < 0.2:
            notes.append(f"Σλ = {total:.4g} is small: every weight is multiplied by {1 / total:.3g}")
    elif abs(total - 1.0) > 1e-9:
        notes.append(
            f"Σλ = {total:.4g}: in logits mode this sharpens (>1) or flattens (<1) the result "
            f"like a temperature of {1 / total:.3g}; use normalized mode to average instead"
        )
    if has_other_model(f.root):
        notes.append(
            "terms on other models cost one forward each per token; --speculate K drafts K tokens with them "
            "replaced by the loaded model and verifies all K in one forward of each (same output distribution)"
        )
    if any(x.kind == "guide" for x in weights):
        notes.append("guides add λ·(log C(text+token) − log C(text)) on their top-k candidates, 0 elsewhere")
    return Report(f, weights, total, notes)

"""Formulas over next-token distributions ("model arithmetic"): combine the model under several
conditioning texts, other local models, classifier guides and constants with + − × union
intersection and filters, in ``logits`` or ``normalized`` mode, with a per-token trace.

    from tokensteer.formula import M, C, FormulaControl, nucleus
    f = nucleus(M + 2*(M("A happy story:\\n") - M("A sad story:\\n")), 0.9)
    ts.generate(lm, "The day began", controls=[FormulaControl(lm, f, trace=True)])

Strings work too (``tokensteer generate --formula "positive"``); see ``parser.py`` for the grammar
and ``recipes.py`` for the named recipes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokensteer.formula.ast import (
    Formula,
    Guide,
    M,
    Model,
    Node,
    intersection,
    nucleus,
    softunion,
    temp,
    topk,
    topp,
    union,
)
from tokensteer.formula.check import any_node, check
from tokensteer.formula.parser import FormulaError, parse
from tokensteer.formula.recipes import RECIPES

if TYPE_CHECKING:
    from tokensteer.backends.base import Backend
    from tokensteer.controls import RequestControls
    from tokensteer.hooks import Control


def __getattr__(name: str):
    if name == "FormulaControl":  # lazily: it pulls in torch, which `formula check` does not need
        from tokensteer.formula.engine import FormulaControl

        return FormulaControl
    raise AttributeError(name)


def C(name: str, k: int = 20) -> Guide:
    """A classifier term: the named guide's log-probability, on the formula's top-k candidates."""
    from tokensteer.formula.guides import GUIDES
    from tokensteer.errors import UserError

    if name not in GUIDES:
        raise UserError(f"unknown guide {name!r}; known: {', '.join(GUIDES)}")
    return Guide(name, k)


def formula_text(req: "RequestControls") -> str | None:
    """The request's formula: ``formula``, or ``R(k=…)`` for ``retrieve`` (tokensteer.retrieval)."""
    if req.docs is None and req.retrieve is None:
        return req.formula
    from tokensteer.retrieval.request import request_formula

    return request_formula(req)


def formula_controls(lm: "Backend", req: "RequestControls") -> list["Control"]:
    """The Controls for a request's ``--formula`` (or ``--docs``/``--retrieve``) and ``--trace``."""
    text = formula_text(req)
    if req.trace and text is None:
        from tokensteer.errors import UserError

        raise UserError("--trace needs --formula")
    from tokensteer.formula.engine import FormulaControl

    k = int(req.speculate or 0)  # --speculate K
    return [FormulaControl(lm, text, trace=req.trace, speculative=k, docs=req.docs)] if text is not None else []


def required_capabilities(req: "RequestControls") -> frozenset[str]:
    """Formulas only use hooks 1, 3 and 5, which every backend runs; another model given as a
    Hugging Face folder loads on the torch backend only. Checks the formula (and --speculate), so
    nonsense fails before any model loads."""
    text = formula_text(req)
    if text is None:
        return frozenset()
    from tokensteer.backends.base import LOAD_HF
    from tokensteer.errors import UserError, expand
    from tokensteer.formula.ast import fmt_str
    from tokensteer.formula.check import check_speculative
    from tokensteer.models import resolve
    from tokensteer.retrieval.request import check_docs

    f = parse(text)
    check(f)
    check_speculative(f, int(req.speculate or 0))
    check_docs(f, req.docs)

    def hf_term(n: Node) -> bool:
        if not isinstance(n, Model) or n.model is None:
            return False
        if not expand(n.model).exists():  # resolve's message would say "omit --model", which does not apply here
            raise UserError(f"the formula term M(model={fmt_str(n.model)}) names a path that does not exist; give a local "
                            "Hugging Face model folder or .gguf file with the loaded model's tokenizer (nothing is downloaded)")
        return resolve(n.model).kind == "hf"

    return frozenset({LOAD_HF}) if any_node(f.root, hf_term) else frozenset()


__all__ = [
    "C",
    "Formula",
    "FormulaControl",
    "FormulaError",
    "M",
    "Model",
    "RECIPES",
    "check",
    "formula_controls",
    "intersection",
    "nucleus",
    "parse",
    "required_capabilities",
    "softunion",
    "temp",
    "topk",
    "topp",
    "union",
]

"""Named recipes: formulas for the common jobs, usable alone (``--formula positive``) or inside a
bigger formula (``positive(4) + 0.5*C("formal")``). Each recipe documents the formula it expands to.

The bundled model is a small base model, so conditioning texts are written as text it would
naturally continue (a heading and a newline), not as instructions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tokensteer.errors import UserError
from tokensteer.formula.ast import Node, fmt_num, fmt_str

POSITIVE = "The following is a cheerful, happy and uplifting story full of joy and love.\n\n"
NEGATIVE = "The following is a bleak, sad and depressing story full of misery and anger.\n\n"
TOXIC = "The following is a hateful, rude and obscene rant full of insults and swear words.\n\n"
CLEAN = "The following is a polite, kind and respectful text.\n\n"
FORMAL = "The following is an excerpt from a formal academic report.\n\n"
# sentiment recipes' defaults, tuned on openings_dev only (openings_test is for reporting)
ALPHA, BETA, NUCLEUS, GUIDE_K = 0.0, 24.0, 0.95, 80.0
# detox's (guide weight, top-p of the steered distribution, candidates), tuned on rude_dev only
DETOX_BETA, DETOX_TOP_P, DETOX_K = 16.0, 0.9, 40.0
TEXT_PARAMS = frozenset({"text", "expert", "anti"})
INFORMAL = "lol ok so here's what happened, super casual chat msg:\n\n"


@dataclass(frozen=True)
class Recipe:
    """A named formula with optional parameters (positional or by name)."""

    name: str
    doc: str
    params: tuple[tuple[str, object], ...]  # (name, default); a default None means required
    template: Callable[..., str]  # params -> formula text

    def build(self, pos: list, kw: dict) -> Node:
        """Expand with the given arguments into a formula tree."""
        from tokensteer.formula.ast import Const
        from tokensteer.formula.parser import parse

        names = [p for p, _ in self.params]
        if len(pos) > len(names):
            raise UserError(f"recipe {self.name} takes at most {len(names)} arguments ({', '.join(names)})")
        values = dict(self.params)
        for (p, _), v in zip(self.params, pos):
            values[p] = v
        for k, v in kw.items():
            if k not in values:
                raise UserError(f"recipe {self.name} has no parameter {k}; it has {', '.join(names) or 'none'}")
            values[k] = v
        for k, v in values.items():
            if v is None:
                raise UserError(f"recipe {self.name} needs {k}: {self.usage()}")
            if isinstance(v, Const):
                values[k] = v.value
            if isinstance(values[k], float) and not math.isfinite(values[k]):
                raise UserError(f"recipe {self.name}: {k} must be finite")
            want = str if k in TEXT_PARAMS else float
            if want is float and isinstance(values[k], int):
                values[k] = float(values[k])
            if not isinstance(values[k], want):
                raise UserError(f"recipe {self.name}: {k} must be {'a quoted string' if want is str else 'a number'}")
        return parse(self.template(**values)).root

    def usage(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}({', '.join(p if d is None else f'{p}={_show(d)}' for p, d in self.params)})"

    def formula(self) -> str:
        """The expansion with default (or placeholder) arguments, for documentation."""
        vals = {p: (d if d is not None else f"<{p}>") for p, d in self.params}
        try:
            return self.template(**vals)
        except (TypeError, ValueError):
            return "(needs arguments)"


def _show(v: object) -> str:
    return fmt_str(v) if isinstance(v, str) else fmt_num(v)


def _q(v: object) -> str:
    return fmt_str(v) if isinstance(v, str) else str(v)


def _n(v: object) -> str:
    return fmt_num(float(v)) if isinstance(v, (int, float)) else str(v)


def _dexperts(expert: str, anti: str, alpha: object, p: object, guide: str | None = None, beta: object = 0, k: object = None, cut: str = "nucleus") -> str:
    """DExperts inside the base nucleus, plus a guide term; α = 0 leaves the expert rows out (one
    row per token: the guide alone steers, at about the cost of plain decoding). ``cut="topp"``
    takes the nucleus of the steered distribution instead, so the guide can move the text off a
    token the base model is sure of."""
    body = "M" if isinstance(alpha, (int, float)) and float(alpha) == 0 else f"M + {_n(alpha)}*(M({_q(expert)}) - M({_q(anti)}))"
    if guide and float(beta) != 0:
        kk = f", k={_n(k)}" if k is not None else ""
        body += f" + {_n(beta)}*C({fmt_str(guide)}{kk})"
    return f"{cut}({body}, {_n(p)})"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "positive",
            "Positive sentiment: the base model inside its own top-p nucleus, rescored by the offline "
            "positive guide on the k likeliest candidates (a word-level classifier that keeps pushing "
            "until the text is clearly positive and weighs against ending a passage before it is). "
            "Plain decoding's one row per token; "
            "alpha > 0 adds DExperts rows (a cheerful vs a bleak conditioning text). Defaults chosen "
            "on the dev openings only.",
            (("alpha", ALPHA), ("guide", BETA), ("p", NUCLEUS), ("k", GUIDE_K)),
            lambda alpha, guide, p, k: _dexperts(POSITIVE, NEGATIVE, alpha, p, "positive", guide, k),
        ),
        Recipe(
            "negative",
            "Negative sentiment: the mirror image of positive (same weights and nucleus); its guide "
            "learns from the broad word lists, without words that are negative only in context.",
            (("alpha", ALPHA), ("guide", BETA), ("p", NUCLEUS), ("k", GUIDE_K)),
            lambda alpha, guide, p, k: _dexperts(NEGATIVE, POSITIVE, alpha, p, "negative", guide, k),
        ),
        Recipe(
            "detox",
            "Less toxic text: the base model rescored by the offline civility guide on the k "
            "likeliest candidates (each insult or swear word weighs fully against, however polite "
            "the rest, from the first piece of a word the tokenizer splits), then the top-p nucleus "
            "of the result, so even a token the base model is sure of can be avoided; alpha > 0 "
            "adds DExperts rows (a polite vs a hateful-rant conditioning text).",
            (("alpha", 0.0), ("guide", DETOX_BETA), ("p", DETOX_TOP_P), ("k", DETOX_K)),
            lambda alpha, guide, p, k: _dexperts(CLEAN, TOXIC, alpha, p, "nontoxic", guide, k, cut="topp"),
        ),
        Recipe(
            "formal",
            "Formal register: towards an academic-report conditioning text, away from a casual chat one.",
            (("alpha", 1.5), ("guide", 1.0), ("p", 0.9)),
            lambda alpha, guide, p: _dexperts(FORMAL, INFORMAL, alpha, p, "formal", guide),
        ),
        Recipe(
            "cfg",
            "Classifier-free guidance: γ·log p(x | text + prompt) + (1 − γ)·log p(x | prompt).",
            (("text", None), ("gamma", 1.5)),
            lambda text, gamma: f"{_n(gamma)}*M({_q(text)}) - {_n(gamma - 1) if isinstance(gamma, float) else f'({gamma} - 1)'}*M",
        ),
        Recipe(
            "expert-antiexpert",
            "DExperts with your own conditioning texts: M + α·(M(expert) − M(anti)) inside the base "
            "model's top-p nucleus.",
            (("expert", None), ("anti", None), ("alpha", 2.0), ("p", 0.9)),
            lambda expert, anti, alpha, p: _dexperts(expert, anti, alpha, p),
        ),
    ]
}

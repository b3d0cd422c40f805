"""Turn a request's options (CLI flags, API fields) into Controls, and say what backend they need.

One ``RequestControls`` value describes every control a request asks for; each capability module
(formula, steering, constraints) builds its own Controls from its part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tokensteer.backends.base import Backend
from tokensteer.hooks import Control


@dataclass
class RequestControls:
    """Everything a request can ask of the controls; empty means plain decoding."""

    formula: str | None = None  # a formula string or a recipe name (tokensteer.formula)
    trace: bool = False  # per-token trace of the formula's terms
    speculate: int = 0  # draft this many tokens per verification by the formula's other models (0 = off)
    steer: Sequence[str] = ()  # "VEC[:strength]" items (tokensteer.steering)
    ban: Sequence[str] = ()  # tokensteer.constraints from here on
    require: Sequence[str] = ()
    words: int | None = None
    end_word: str | None = None
    regex: str | None = None
    json_schema: str | None = None  # path to a JSON Schema file
    script: Sequence[str] = ()
    script_soft: float | None = None  # with script: scale other scripts' probabilities instead of banning them
    sentences: int | None = None
    require_within: int | None = None  # the required words appear within this many words
    vocab: str | Sequence[str] | None = None  # a word-list file, or the words
    grammar: str | None = None  # path to a Lark (.lark) or GBNF (.gbnf) grammar file
    fast_forward: bool = True  # feed a grammar's fixed text to the model in one pass
    docs: object = None  # documents R terms retrieve from: a folder, .jsonl or .txt/.md path, or a DocStore (tokensteer.retrieval)
    retrieve: object = None  # shortcut for the formula R(k=…): k, or {"k": 4, "tau": 0.1, "every": 0}

    def required_capabilities(self) -> frozenset[str]:
        """Capabilities a backend needs to run these controls (used by ``--backend auto``)."""
        needs: set[str] = set()
        if self.steer:
            from tokensteer.steering import required_capabilities as steer_caps

            needs |= steer_caps(self)
        if self.formula is not None or self.docs is not None or self.retrieve is not None:  # "" is a mistake to report, not "off"
            from tokensteer.formula import required_capabilities as formula_caps

            needs |= formula_caps(self)
        return frozenset(needs)

    def has_constraints(self) -> bool:
        given = (self.words, self.end_word, self.regex, self.json_schema, self.sentences, self.require_within, self.vocab,
                 self.grammar, self.script_soft)  # 0 or "" are mistakes to report, not "off"
        return bool(self.ban or self.require or self.script) or any(v is not None for v in given)


def build_controls(lm: Backend, req: RequestControls) -> list[Control]:
    """Build the Controls for a request on a loaded backend; raises UserError on bad specs."""
    controls: list[Control] = []
    if req.steer:
        from tokensteer.steering import steering_controls

        controls += steering_controls(lm, req)
    if req.formula is not None or req.docs is not None or req.retrieve is not None:
        from tokensteer.formula import formula_controls

        controls += formula_controls(lm, req)
    if req.has_constraints():
        from tokensteer.constraints import constraint_controls

        controls += constraint_controls(lm, req)
    return controls

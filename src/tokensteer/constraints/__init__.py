"""Hard constraints on generated text: banned words, required keywords, exact counts, regex/JSON/
grammars (llguidance), script and vocabulary restriction. Each is a Control (mask + on_token) that
composes with formulas and steering in the one decode loop.

Python use::

    spec = ConstraintSpec(ban=["dog"], words=7, end_word="sea")
    controls = build(lm, spec)          # checked before decoding; one combined Control
    tokensteer.generate(lm, prompt, cfg, controls)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokensteer.constraints.spec import ConstraintSpec, build, check, from_mapping

if TYPE_CHECKING:
    from tokensteer.backends.base import Backend
    from tokensteer.controls import RequestControls
    from tokensteer.hooks import Control


def spec_from_request(req: RequestControls) -> ConstraintSpec:
    """The ConstraintSpec of CLI/API request fields."""
    d = {
        "ban": list(req.ban), "require": list(req.require), "words": req.words, "end_word": req.end_word,
        "regex": req.regex, "json_schema": req.json_schema, "script": list(req.script),
    }  # fmt: skip
    for k in ("require_within", "sentences", "grammar", "script_soft", "vocab"):
        if getattr(req, k) is not None:
            d[k] = getattr(req, k)
    d["fast_forward"] = req.fast_forward
    return from_mapping(d)


def constraint_controls(lm: Backend, req: RequestControls) -> list[Control]:
    """Controls for a request's constraints; raises UserError before decoding on bad or contradictory ones."""
    return build(lm, spec_from_request(req))


__all__ = ["ConstraintSpec", "build", "check", "constraint_controls", "from_mapping", "spec_from_request"]

"""The ``formula:ARG`` evaluation method: ARG is a recipe name, a formula, or a YAML/JSON file
with a ``formula`` key. Every item shares one FormulaControl, so the runner batches them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokensteer.errors import UserError
from tokensteer.eval.methods import Method, read_spec
from tokensteer.formula.check import check
from tokensteer.formula.parser import parse

if TYPE_CHECKING:
    from tokensteer.backends.base import Backend
    from tokensteer.eval.tasks import Item, Task
    from tokensteer.hooks import Control


class FormulaMethod(Method):
    """Generate every item under one formula."""

    def __init__(self, formula: str) -> None:
        super().__init__(f"formula:{formula}")
        self.formula = parse(formula)
        check(self.formula)  # fail before any model is loaded
        self._controls: dict[int, list[Control]] = {}

    def controls(self, lm: Backend, task: Task, item: Item) -> list[Control]:
        from tokensteer.formula.engine import FormulaControl

        if id(lm) not in self._controls:
            self._controls[id(lm)] = [FormulaControl(lm, self.formula)]
        return self._controls[id(lm)]


def make(arg: str | None) -> Method:
    """``formula:positive``, ``formula:M + 2*(M("a") - M("b"))`` or ``formula:spec.yaml``."""
    spec = read_spec(arg)
    if isinstance(spec, dict):
        spec = spec.get("formula")
    if not spec or not isinstance(spec, str):
        raise UserError("formula needs a recipe name or a formula, e.g. --method formula:positive")
    return FormulaMethod(spec)

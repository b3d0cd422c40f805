"""The ``retrieve:ARG`` evaluation method: REPLUG over the task's documents (the qa tasks ship
theirs) or over ``docs=PATH``. ARG is K (``retrieve:4``), ``k=4,tau=0.1,every=8[,docs=PATH]``, or a
formula with R terms (``retrieve:R(k=4) - 0.2*M``). Every item shares one FormulaControl, so the
runner batches them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokensteer.errors import UserError
from tokensteer.eval.methods import Method, read_spec
from tokensteer.formula.ast import to_string
from tokensteer.formula.check import check
from tokensteer.formula.parser import parse
from tokensteer.retrieval.request import retrieve_node

if TYPE_CHECKING:
    from tokensteer.backends.base import Backend
    from tokensteer.eval.tasks import Item, Task
    from tokensteer.hooks import Control


class RetrieveMethod(Method):
    """Generate every item under one formula with R terms, over one document store."""

    def __init__(self, formula: str, docs: str | None) -> None:
        super().__init__(f"retrieve:{formula}")
        self.formula = parse(formula)
        check(self.formula)  # fail before any model is loaded
        self.docs = docs
        self._controls: dict[int, list[Control]] = {}

    def controls(self, lm: Backend, task: Task, item: Item) -> list[Control]:
        from tokensteer.formula.engine import FormulaControl

        docs = self.docs or getattr(task, "docs", None)
        if docs is None:
            raise UserError(f"the task {task.name} ships no documents; name them: --method 'retrieve:k=4,docs=PATH'")
        if id(lm) not in self._controls:
            self._controls[id(lm)] = [FormulaControl(lm, self.formula, docs=docs)]
        return self._controls[id(lm)]


def make(arg: str | None) -> Method:
    """``retrieve:4``, ``retrieve:k=4,tau=0.05,docs=kb/``, ``retrieve:R(k=4) - 0.2*M`` or a YAML/JSON
    file with ``formula`` (or ``k``, ``tau``, ``every``) and ``docs``."""
    spec = read_spec(arg)
    if not spec:
        raise UserError("retrieve needs K or a formula with R terms, e.g. --method retrieve:4")
    if isinstance(spec, str) and "R" in spec and "(" in spec or spec == "R":
        return RetrieveMethod(spec, None)
    if isinstance(spec, str):
        spec = dict(part.partition("=")[::2] for part in spec.split(",")) if "=" in spec else {"k": spec}
    if not isinstance(spec, dict):
        raise UserError("a retrieve spec file must hold a mapping: formula (or k, tau, every) and docs")
    docs = spec.pop("docs", None)
    if "formula" in spec:
        return RetrieveMethod(str(spec.pop("formula")), docs)
    try:
        numbers = {k.strip(): float(v) for k, v in spec.items()}
    except (TypeError, ValueError):
        raise UserError(f"retrieve:{arg}: k, tau and every must be numbers") from None
    return RetrieveMethod(to_string(retrieve_node(numbers)), docs)

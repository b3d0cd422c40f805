"""The method registry: how a spec string such as ``prompt`` or ``steer:vec.pt@4`` becomes a Method.

A Method says, for one task item, what text to feed the model and which Controls to run; every
control capability (formulas, steering, constraints) plugs in here, so the eval compares them all
through the one decode loop. Built-in kinds are ``none`` and ``prompt``; the others are found
lazily in their own modules (each exposes ``make(arg: str | None) -> Method``).
"""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING, Any, Callable

from tokensteer.errors import UserError, existing_file
from tokensteer.eval.tasks import Item, Task

if TYPE_CHECKING:
    from tokensteer.backends.base import Backend
    from tokensteer.hooks import Control

Factory = Callable[[str | None], "Method"]


class Method:
    """A way to generate for a task item. Subclass and override what you need."""

    def __init__(self, name: str = "none") -> None:
        self.name = name  # the spec string, e.g. "formula:positive"

    def prompt(self, task: Task, item: Item) -> str:
        """The text the model continues; by default the item's prompt unchanged."""
        return item.prompt

    def controls(self, lm: Backend, task: Task, item: Item) -> list[Control]:
        """Controls to run for this item. Return the SAME list object for items that can share a batch."""
        return []

    def needs(self) -> frozenset[str]:
        """Backend capabilities the controls require (passed to ``tokensteer.load(needs=...)``)."""
        return frozenset()

    def vary(self, param: str, value: str) -> Method:
        """This method with one parameter changed, for ``--sweep PARAM=v1,v2``.

        Default: substitute ``{PARAM}`` in the spec, or for ``strength`` the number after the last
        ``@`` (``steer:vec.pt@4``); subclasses may override.
        """
        key = "{" + param + "}"
        if key in self.name:
            return make_method(self.name.replace(key, value))
        if param == "strength" and "@" in self.name:
            return make_method(self.name.rsplit("@", 1)[0] + "@" + value)
        raise UserError(
            f"method {self.name!r} has no parameter {param!r} to sweep; write {key} in the method spec "
            f"where the value goes, e.g. --method 'steer:vec.pt@{{{param}}}' --sweep {param}=0,2,4"
        )

    def __repr__(self) -> str:
        return f"<Method {self.name}>"


class NoControl(Method):
    """``none``: the plain model continuing the prompt, the floor every method is measured against."""


class PromptInstruction(Method):
    """``prompt``: the task's instruction written into the prompt, the baseline every control must beat.

    The bundled model is a base model, so instructions are phrased as text it continues
    (``"The following is a very positive review.\\n\\n" + prompt``).
    """

    def prompt(self, task: Task, item: Item) -> str:
        return task.instruction(item) + item.prompt


_REGISTRY: dict[str, Factory] = {}

#: plug-in kinds found lazily; each module exposes ``make(arg: str | None) -> Method``
PLUGINS: dict[str, str] = {
    "formula": "tokensteer.formula.evalmethod",
    "steer": "tokensteer.steering.evalmethod",
    "constraints": "tokensteer.constraints.evalmethod",
    "retrieve": "tokensteer.retrieval.evalmethod",
}


def register(kind: str, factory: Factory) -> None:
    """Register a method kind: ``factory(arg)`` builds the Method for spec ``KIND:ARG`` (arg None for ``KIND``)."""
    if not kind or ":" in kind:
        raise ValueError(f"a method kind must be a non-empty name without ':', got {kind!r}")
    _REGISTRY[kind] = factory


def kinds() -> list[str]:
    """Every method kind that can be named: registered ones and the lazily found plug-ins."""
    return sorted(set(_REGISTRY) | set(PLUGINS))


def _simple(cls: type[Method], kind: str) -> Factory:
    def factory(arg: str | None) -> Method:
        if arg:
            raise UserError(f"method {kind!r} takes no argument, got {kind}:{arg}")
        return cls(kind)

    return factory


register("none", _simple(NoControl, "none"))
register("prompt", _simple(PromptInstruction, "prompt"))


def make_method(spec: str) -> Method:
    """Build a Method from ``KIND`` or ``KIND:ARG``; ARG may name a YAML/JSON spec file (see ``read_spec``)."""
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    if kind not in _REGISTRY and kind in PLUGINS:
        try:
            module = importlib.import_module(PLUGINS[kind])
        except ModuleNotFoundError as e:
            raise UserError(f"method kind {kind!r} is not available yet ({e.name} is not installed)") from e
        register(kind, module.make)
    if kind not in _REGISTRY:
        raise UserError(f"unknown method {spec!r}; method kinds: {', '.join(kinds())} (write KIND or KIND:ARG)")
    method = _REGISTRY[kind](arg or None)
    method.name = spec  # the spec names the method in results, whatever the factory called it
    return method


def read_spec(arg: str | None) -> Any:
    """For plug-ins: parse ARG as a YAML or JSON file if it names one, else return it unchanged."""
    if arg and arg.lower().endswith((".yaml", ".yml", ".json")):
        path = existing_file(arg, "method spec file")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix.lower() == ".json":
                return json.loads(text)
            import yaml

            return yaml.safe_load(text)
        except Exception as e:  # UnicodeDecodeError, json.JSONDecodeError or yaml.YAMLError
            raise UserError(f"cannot parse method spec file {arg!r}: {one_line(e)}") from e
    return arg


def one_line(e: Exception) -> str:
    """A parser's error as one line: YAML's problem and where, else the first line of the message."""
    mark = getattr(e, "problem_mark", None)
    if getattr(e, "problem", None) and mark is not None:
        return f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

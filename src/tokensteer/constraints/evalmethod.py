"""The eval method ``constraints`` / ``constraints:SPEC``: hard constraints for a task's items.

Without SPEC the constraints come from each item's fields (``words``, ``end_word``, ``sentences``,
``keywords``, ``ban``), so ``--method constraints`` runs the count and keywords tasks as asked.
SPEC is a YAML/JSON file or an inline YAML mapping (``constraints:{ban: [dog, cat]}``); the item's
fields are added to it. Items with the same constraints share one Control list (and a batch).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tokensteer.constraints.spec import build, from_mapping
from tokensteer.errors import UserError
from tokensteer.eval.methods import Method, read_spec

if TYPE_CHECKING:
    from tokensteer.eval.tasks import Item, Task

FIELDS = {"words": "words", "end_word": "end_word", "sentences": "sentences", "keywords": "require", "ban": "ban"}


class ConstraintsMethod(Method):
    """Decode under the constraints of the spec plus those the item's fields ask for."""

    def __init__(self, base: dict) -> None:
        super().__init__("constraints")
        from_mapping(dict(base))  # check the spec itself before any model is loaded
        self.base = base
        self._built: dict[tuple[int, str], list] = {}

    def spec_for(self, item: Item) -> dict:
        d = dict(self.base)
        for field, key in FIELDS.items():
            if item.fields.get(field) is not None and key not in self.base:
                d[key] = item.fields[field]
        return d

    def controls(self, lm, task: Task, item: Item) -> list:
        d = self.spec_for(item)
        key = (id(lm), json.dumps(d, sort_keys=True, default=str))
        if key not in self._built:
            self._built[key] = build(lm, from_mapping(d))
        return self._built[key]


def _parse(arg: str | None) -> dict:
    spec: Any = read_spec(arg)
    if spec is None:
        return {}
    if isinstance(spec, str):
        import yaml

        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise UserError(f"cannot parse constraints spec {arg!r}: {e}") from e
    if not isinstance(spec, dict):
        raise UserError(f"a constraints spec is a mapping such as {{ban: [dog], words: 7}}; got {arg!r}")
    return spec


def make(arg: str | None) -> Method:
    """Factory for ``constraints`` and ``constraints:SPEC`` (registered lazily by the eval)."""
    return ConstraintsMethod(_parse(arg))

"""The eval method ``constraints`` / ``constraints:SPEC``: hard constraints for a task's items.

Without SPEC the constraints come from each item's fields (``words``, ``end_word``, ``sentences``,
``keywords``, ``ban``), so ``--method constraints`` runs the count and keywords tasks as asked.
SPEC is a YAML/JSON file or an inline YAML mapping (``constraints:{ban: [dog, cat]}``); the item's
fields are added to it. All items share one Control list (so one batch), each row running its
own item's constraints.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from tokensteer.constraints.spec import build, from_mapping
from tokensteer.errors import UserError
from tokensteer.eval.methods import Method, one_line, read_spec
from tokensteer.hooks import Control

if TYPE_CHECKING:
    from tokensteer.eval.tasks import Item, Task

FIELDS = {"words": "words", "end_word": "end_word", "sentences": "sentences", "keywords": "require", "ban": "ban"}


class RowView:
    """One row of a LoopState seen as a batch of one, so per-item constraints can share a batch."""

    def __init__(self, state, b: int) -> None:
        self._s, self._b = state, b
        self.backend, self.tokenizer = state.backend, state.tokenizer
        self.prompt_tokens = [state.prompt_tokens[b]]
        self.rows_per_prompt = state.rows_per_prompt
        self.offsets = state.offsets

    batch_size = 1
    generated = property(lambda self: [self._s.generated[self._b]])
    finished = property(lambda self: [self._s.finished[self._b]])
    step = property(lambda self: self._s.step)
    max_tokens = property(lambda self: self._s.max_tokens)
    stop = property(lambda self: self._s.stop)
    cfg = property(lambda self: self._s.cfg)
    generators = property(lambda self: self._s.generators[self._b : self._b + 1])
    rows = property(lambda self: None if self._s.rows is None else self._s.rows[self._b : self._b + 1])


class PerRow(Control):
    """Each row runs the constraints of its own item (found by its prompt tokens), in one batch."""

    stages = frozenset({"rewrite", "mask", "accept"})

    def __init__(self, by_prompt: dict[tuple[int, ...], list]) -> None:
        self.by_prompt = by_prompt

    def start(self, state) -> None:
        self.views, self.parts = [], []
        for b, p in enumerate(state.prompt_tokens):
            if tuple(p) not in self.by_prompt:
                raise UserError("the constraints method met a prompt it was not planned for; run the eval with --workers 1")
            self.views.append(RowView(state, b))
            self.parts.append(self.by_prompt[tuple(p)])
            for c in self.parts[-1]:
                c.start(self.views[-1])

    def logprobs(self, state, logprobs: torch.Tensor) -> torch.Tensor:
        rows = [logprobs[b : b + 1] for b in range(len(self.views))]
        for b, (v, cs) in enumerate(zip(self.views, self.parts)):
            for c in cs:
                rows[b] = c.logprobs(v, rows[b])
        return torch.cat(rows)

    def mask(self, state) -> torch.Tensor | None:
        out = []
        for v, cs in zip(self.views, self.parts):
            m = None
            for c in cs:
                r = c.mask(v)
                m = r if m is None else (m if r is None else m & r)
            out.append(m)
        if all(m is None for m in out):
            return None
        V = next(m for m in out if m is not None).shape[-1]
        return torch.cat([torch.ones(1, V, dtype=torch.bool) if m is None else m for m in out])

    def on_token(self, state, tokens: torch.Tensor) -> None:
        for b, (v, cs) in enumerate(zip(self.views, self.parts)):
            for c in cs:
                c.on_token(v, tokens[b : b + 1])


class ConstraintsMethod(Method):
    """Decode under the constraints of the spec plus those the item's fields ask for.

    Items with different constraints (the count task's N and end word) still share batches: one
    ``PerRow`` control gives every row its own item's constraints.
    """

    def __init__(self, base: dict) -> None:
        super().__init__("constraints")
        from_mapping(dict(base))  # check the spec itself before any model is loaded
        self.base = base
        self._built: dict[tuple[int, str], list] = {}
        self._shared: dict[int, tuple[list, dict]] = {}

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
        if id(lm) not in self._shared:
            by_prompt: dict = {}
            self._shared[id(lm)] = ([PerRow(by_prompt)], by_prompt)
        shared, by_prompt = self._shared[id(lm)]
        by_prompt[tuple(lm.tokenizer.encode(self.prompt(task, item)))] = self._built[key]
        return shared


def _parse(arg: str | None) -> dict:
    spec: Any = read_spec(arg)
    if spec is None:
        return {}
    if isinstance(spec, str):
        import yaml

        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise UserError(f"cannot parse constraints spec {arg!r}: {one_line(e)}") from e
    if not isinstance(spec, dict):
        raise UserError(f"a constraints spec is a mapping such as {{ban: [dog], words: 7}}; got {arg!r}")
    return spec


def make(arg: str | None) -> Method:
    """Factory for ``constraints`` and ``constraints:SPEC`` (registered lazily by the eval)."""
    return ConstraintsMethod(_parse(arg))

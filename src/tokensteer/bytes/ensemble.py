"""Model arithmetic on bytes: a formula whose terms are next-byte distributions, so models with
different tokenizers combine (each term keeps its own session and KV cache).

The formula language is the token-level one (``tokensteer.formula``) read over the 257 next
symbols: ``softunion(M, M(model="b"))`` is the mean of two models' probabilities (after the final
normalisation), ``normalized: 0.7*M + 0.3*M(model="b")`` a weighted sum of log-probabilities,
``M + M(model="b")`` their product, ``min(M, M(model="b"))`` the minimum; filters and conditioning
texts work as they do on tokens. Terms that only exist on tokens (guides ``C(...)``, retrieval
``R(...)``) are refused.
"""

from __future__ import annotations

from typing import Mapping

import torch

from tokensteer.backends.base import Backend
from tokensteer.bytes.state import ByteOptions, ByteState
from tokensteer.errors import UserError
from tokensteer.formula.ast import Const, Formula, Model, Node, Op, Sum, to_string
from tokensteer.formula.check import check, kind
from tokensteer.formula.parser import parse
from tokensteer.sampling import top_k

NEG_INF = float("-inf")
_LOADED: dict[str, Backend] = {}


def token_only_terms(n: Node) -> list[str]:
    """The terms of ``n`` that are defined on tokens only (everything but models, constants, sums
    and operators), as written."""
    if isinstance(n, Sum):
        return [s for _, t in n.terms for s in token_only_terms(t)]
    if isinstance(n, Op):
        return [s for a in n.args for s in token_only_terms(a)]
    return [] if isinstance(n, (Model, Const)) else [to_string(n)]


def check_bytes_formula(f: Formula) -> None:
    """Refuse a formula that mixes in terms that cannot be computed on bytes."""
    check(f)
    bad = token_only_terms(f.root)
    if bad:
        raise UserError(
            f"the term {bad[0]} works on whole tokens of the loaded model and cannot be combined byte by byte; "
            "drop it or generate without --byte-level"
        )


def other_model(path: str, models: Mapping[str, Backend] | None) -> Backend:
    """The backend of ``M(model=path)``: a given one, else loaded once (any tokenizer will do)."""
    if models and path in models:
        return models[path]
    if path not in _LOADED:
        import tokensteer

        _LOADED[path] = tokensteer.load(path, backend="auto")
    return _LOADED[path]


class ByteFormula:
    """A formula's next-byte distribution over one text; ``push`` feeds a byte to every term."""

    def __init__(
        self,
        lm: Backend,
        formula: Formula | Node | str,
        prompt: bytes | str = b"",
        models: Mapping[str, Backend] | None = None,
        options: ByteOptions | None = None,
    ) -> None:
        f = parse(formula) if isinstance(formula, str) else Formula(formula) if isinstance(formula, Node) else formula
        check_bytes_formula(f)
        self.formula = f
        data = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
        self.states: dict[tuple[str | None, str], ByteState] = {}
        try:
            for m in self._models(f.root):
                key = (m.model, m.prefix)
                if key not in self.states:
                    backend = lm if m.model is None else other_model(m.model, models)
                    self.states[key] = ByteState(backend, m.prefix.encode("utf-8") + data, options)
            if self._uses_nucleus(f.root) and (None, "") not in self.states:
                self.states[(None, "")] = ByteState(lm, data, options)
        except BaseException:
            self.close()
            raise

    @property
    def forwards(self) -> int:
        return sum(s.forwards for s in self.states.values())

    def push(self, byte: int) -> None:
        for s in self.states.values():
            s.push(byte)

    def close(self) -> None:
        for s in self.states.values():
            s.close()

    def logprobs(self) -> torch.Tensor:
        """[257] float64 log-probabilities of the formula's next symbol."""
        out = torch.log_softmax(self.eval(self.formula.root), -1)
        if bool(torch.isnan(out).any()):
            raise UserError("the formula leaves no possible next byte: its filters or intersection exclude every byte; loosen them")
        return out

    def eval(self, n: Node) -> torch.Tensor:
        """Scores of a node over the 257 symbols (log-probabilities for terms)."""
        from tokensteer.formula.combine import combine, set_op
        from tokensteer.sampling import nucleus_mask

        if isinstance(n, Model):
            lp = self.states[(n.model, n.prefix)].logprobs()
            return lp if n.temperature == 1.0 else torch.log_softmax(lp / n.temperature, -1)
        if isinstance(n, Const):
            return torch.full((257,), n.value, dtype=torch.float64)
        if isinstance(n, Sum):
            total = sum(w for w, t in n.terms if kind(t) in ("model", "operator"))
            div = total if self.formula.mode == "normalized" else 1.0
            return combine([(w / div, self.eval(t)) for w, t in n.terms])
        if n.param is not None:  # a filter
            lp = torch.log_softmax(self.eval(n.args[0]), -1)
            if n.name == "topk":
                return top_k(lp[None], int(n.param))[0]
            if n.name in ("topp", "nucleus"):
                base = lp if n.name == "topp" else self.states[(None, "")].logprobs()
                return lp.masked_fill(~nucleus_mask(base[None].float(), n.param)[0], NEG_INF)
            return torch.log_softmax(lp / n.param, -1)
        return set_op(n.name, [self.eval(a) if isinstance(a, Const) else torch.log_softmax(self.eval(a), -1) for a in n.args])

    @staticmethod
    def _models(n: Node) -> list[Model]:
        if isinstance(n, Model):
            return [n]
        parts = [t for _, t in n.terms] if isinstance(n, Sum) else list(n.args) if isinstance(n, Op) else []
        return [m for a in parts for m in ByteFormula._models(a)]

    @staticmethod
    def _uses_nucleus(n: Node) -> bool:
        if isinstance(n, Op):
            return n.name == "nucleus" or any(ByteFormula._uses_nucleus(a) for a in n.args)
        return isinstance(n, Sum) and any(ByteFormula._uses_nucleus(t) for _, t in n.terms)

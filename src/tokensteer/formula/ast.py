"""The formula tree: terms (models, guides, constants), linear sums and operators, with Python
operator overloading (``2*M("Be kind:\\n") - M``) and a canonical string form that parses back.

Construction normalises: sums are flat, equal terms are merged, zero weights dropped and constants
folded, so two formulas that mean the same linear combination compare equal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Union

from tokensteer.errors import UserError

Number = Union[int, float]

#: operators that take formulas as arguments: name -> (min args, max args or None)
COMBINERS = {"union": (2, None), "softunion": (2, None), "intersection": (2, None)}
#: operators that take one formula and one number: name -> description of the number
FILTERS = {"topk": "k", "topp": "p", "nucleus": "p", "temp": "T"}
MODES = ("logits", "normalized")


def fmt_num(x: float) -> str:
    """Shortest text that parses back to exactly ``x`` (``2`` for 2.0)."""
    r = repr(float(x))
    return r[:-2] if r.endswith(".0") else r


def fmt_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


class Node:
    """Base of every formula node; gives the arithmetic operators."""

    def __add__(self, other: Node | Number) -> Node:
        return lin([(1.0, self), (1.0, as_node(other))])

    def __radd__(self, other: Number) -> Node:
        return lin([(1.0, as_node(other)), (1.0, self)])

    def __sub__(self, other: Node | Number) -> Node:
        return lin([(1.0, self), (-1.0, as_node(other))])

    def __rsub__(self, other: Number) -> Node:
        return lin([(1.0, as_node(other)), (-1.0, self)])

    def __neg__(self) -> Node:
        return lin([(-1.0, self)])

    def __mul__(self, other: Number) -> Node:
        if isinstance(other, Node):
            raise UserError("formulas can only be multiplied by numbers, not by other formulas")
        return lin([(_finite(other), self)])

    __rmul__ = __mul__

    def __truediv__(self, other: Number) -> Node:
        if isinstance(other, Node) or other == 0:
            raise UserError("formulas can only be divided by a non-zero number")
        return lin([(1.0 / _finite(other), self)])

    def __str__(self) -> str:
        return to_string(self)


MAX_WEIGHT = 1e6
MAX_GUIDE_K = 256  # candidate tokens a guide scores per step (each is one classifier call)
MIN_TEMPERATURE = 1 / MAX_WEIGHT  # dividing by T is a weight of 1/T


def _finite(x: Number) -> float:
    try:
        x = float(x)
    except OverflowError:  # a Python int beyond float range
        x = math.inf
    if not abs(x) <= MAX_WEIGHT:  # larger ones overflow float32 log-probabilities (and NaN fails this too)
        raise UserError(f"weights must be finite numbers of size at most {MAX_WEIGHT:g} (constants too), got {x:.10g}")
    return x


@dataclass(frozen=True, eq=True)
class Model(Node):
    """A language model's next-token log-probabilities: the prompt behind ``prefix``.

    ``model`` None is the loaded model (its terms share one batched forward); a path is another
    local model with the same tokenizer. ``temperature`` divides this term's log-probabilities.
    """

    prefix: str = ""
    model: str | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not (MIN_TEMPERATURE <= self.temperature < math.inf):
            raise UserError(f"a term's temperature must be a finite number ≥ {MIN_TEMPERATURE:g}, got {self.temperature}")
        if self.model is not None and not self.model.strip():
            raise UserError('model= needs the path of a local model, e.g. M(model="path/to/model")')

    def __call__(self, prefix: str = "", model: str | None = None, T: float = 1.0) -> "Model":
        """``M("Be kind:\\n", T=0.7)``: the model behind a conditioning text (as in the string form)."""
        return Model(prefix, model, T)


@dataclass(frozen=True, eq=True)
class Guide(Node):
    """A classifier term: log P(attribute | text + candidate) on the ``k`` best candidate tokens."""

    name: str
    k: int = 20

    def __post_init__(self) -> None:
        k = self.k
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not (isinstance(k, int) or k.is_integer()):
            raise UserError(f"a guide's k must be a whole number of candidate tokens, got k={k!r}")
        if not 1 <= k <= MAX_GUIDE_K:
            raise UserError(
                f"a guide scores 1 to {MAX_GUIDE_K} candidate tokens, got k={fmt_num(k)}: it runs its classifier on every "
                "candidate at every step, and candidates far down the list barely change the text"
            )
        object.__setattr__(self, "k", int(k))


@dataclass(frozen=True, eq=True)
class Retrieve(Node):
    """REPLUG's retrieval mixture Σ_d softmax(sim(d, x)/τ)·P(y | d ⊕ x) over the ``k`` passages of
    the request's documents most similar to the prompt (``tokensteer.retrieval``); with ``every``
    > 0 they are re-retrieved on prompt + generated text every that many tokens."""

    k: int = 4
    tau: float = 0.1
    every: int = 0

    def __post_init__(self) -> None:
        for name, v, low in (("k", self.k, 1), ("every", self.every, 0)):
            if isinstance(v, bool) or not (isinstance(v, int) or isinstance(v, float) and v.is_integer()) or v < low:
                shown = fmt_num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v)
                raise UserError(f"R's {name} must be a whole number ≥ {low}, got {shown}")
            object.__setattr__(self, name, int(v))
        if not (MIN_TEMPERATURE <= self.tau < math.inf):
            raise UserError(f"R's tau (the softmax temperature of the passages' similarities) must be a finite number ≥ {MIN_TEMPERATURE:g}, got {self.tau}")
        object.__setattr__(self, "tau", float(self.tau))


@dataclass(frozen=True, eq=True)
class Const(Node):
    """The same number for every token (a floor inside union, a shift in a sum)."""

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", float(self.value) + 0.0)  # one zero: -0.0 becomes 0.0


@dataclass(frozen=True, eq=True)
class Sum(Node):
    """A linear combination Σ wᵢ·termᵢ; build it with ``lin`` so it stays normalised."""

    terms: tuple[tuple[float, Node], ...]


@dataclass(frozen=True, eq=True)
class Op(Node):
    """An operator: union/softunion/intersection of formulas, or a filter with one number."""

    name: str
    args: tuple[Node, ...]
    param: float | None = None


@dataclass(frozen=True)
class Formula:
    """A whole formula: its tree and how linear combinations are read (``logits``/``normalized``)."""

    root: Node
    mode: str = "logits"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown combination mode {self.mode!r}; choose logits or normalized")

    def __str__(self) -> str:
        body = to_string(self.root)
        return body if self.mode == "logits" else f"{self.mode}: {body}"


def as_node(x: Node | Number) -> Node:
    if isinstance(x, Node):
        return x
    if isinstance(x, (int, float)):
        return Const(_finite(x))
    raise UserError(f"cannot use {type(x).__name__} in a formula")


def lin(terms: list[tuple[float, Node]]) -> Node:
    """A normalised linear combination: flattened, equal terms merged, constants folded."""
    merged: dict[Node, float] = {}
    const = 0.0
    stack = list(reversed(terms))  # popped from the end: linear time, terms kept in order
    flat: list[tuple[float, Node]] = []
    while stack:
        w, n = stack.pop()
        if isinstance(n, Sum):
            stack.extend((w * w2, n2) for w2, n2 in reversed(n.terms))
        else:
            flat.append((w, n))
    for w, n in flat:
        if isinstance(n, Const):
            const += w * n.value
        else:
            merged[n] = merged.get(n, 0.0) + w
    out = [(_finite(w), n) for n, w in merged.items() if w != 0.0]  # products of weights can overflow
    if const != 0.0:
        _finite(const)
        out.append((1.0, Const(const)))
    if not out:
        return Const(0.0)
    if len(out) == 1 and (out[0][0] == 1.0 or isinstance(out[0][1], Const)):
        return out[0][1]
    return Sum(tuple(out))


def op(name: str, *args: Node | Number, param: float | None = None) -> Node:
    """Build an operator node, checking its arity and number."""
    nodes = tuple(as_node(a) for a in args)
    if name in COMBINERS:
        lo, hi = COMBINERS[name]
        if len(nodes) < lo or (hi is not None and len(nodes) > hi):
            raise UserError(f"{name} takes at least {lo} formulas, got {len(nodes)}")
        if param is not None:
            raise UserError(f"{name} takes no number")
        for a in nodes:
            if isinstance(a, Const):
                _finite(a.value)  # a huge floor overflows float32 log-probabilities
        return Op(name, nodes, None)
    if name not in FILTERS:
        raise UserError(f"unknown operator {name!r}")
    if len(nodes) != 1 or param is None:
        raise UserError(f"{name} takes one formula and {FILTERS[name]}, e.g. {name}(M, {_example(name)})")
    p = float(param)
    if name == "topk" and not (p >= 1 and math.isfinite(p) and p.is_integer()):
        raise UserError(f"topk needs a whole number k ≥ 1, got {fmt_num(p)}")
    if name in ("topp", "nucleus") and not 0 < p <= 1:
        raise UserError(f"{name} needs p in (0, 1], got {fmt_num(p)}")
    if name == "temp" and not (MIN_TEMPERATURE <= p < math.inf):
        raise UserError(f"temp needs a finite T ≥ {MIN_TEMPERATURE:g}, got {fmt_num(p)}")
    return Op(name, nodes, p)


def _example(name: str) -> str:
    return {"topk": "10", "topp": "0.9", "nucleus": "0.9", "temp": "0.7"}[name]


def union(*args: Node | Number) -> Node:
    """Max of the arguments' log-probabilities (LMA's union): a token likely under any of them."""
    return op("union", *args)


def softunion(*args: Node | Number) -> Node:
    """log Σ exp of the arguments' log-probabilities (a mixture without the 1/n)."""
    return op("softunion", *args)


def intersection(*args: Node | Number) -> Node:
    """Min of the arguments' log-probabilities: a token likely under all of them."""
    return op("intersection", *args)


def topk(x: Node, k: int) -> Node:
    return op("topk", x, param=k)


def topp(x: Node, p: float) -> Node:
    return op("topp", x, param=p)


def nucleus(x: Node, p: float = 0.9) -> Node:
    """Restrict ``x`` to the base model's top-p nucleus (DExperts)."""
    return op("nucleus", x, param=p)


def temp(x: Node, t: float) -> Node:
    return op("temp", x, param=t)


M = Model()


def to_string(n: Node) -> str:
    """The canonical text of a node; ``parse(to_string(n))`` gives ``n`` back."""
    if isinstance(n, Const):
        return fmt_num(n.value)
    if isinstance(n, Model):
        args = [fmt_str(n.prefix)] if n.prefix else []
        if n.model is not None:
            args.append(f"model={fmt_str(n.model)}")
        if n.temperature != 1.0:
            args.append(f"T={fmt_num(n.temperature)}")
        return "M" if not args else f"M({', '.join(args)})"
    if isinstance(n, Retrieve):
        tau = f", tau={fmt_num(n.tau)}" if n.tau != Retrieve.tau else ""
        return f"R(k={n.k}{tau}{f', every={n.every}' if n.every else ''})"
    if isinstance(n, Guide):
        k = f", k={n.k}" if n.k != 20 else ""
        return f"C({fmt_str(n.name)}{k})"
    if isinstance(n, Op):
        inner = ", ".join(to_string(a) for a in n.args)
        return f"{n.name}({inner})" if n.param is None else f"{n.name}({inner}, {fmt_num(n.param)})"
    if isinstance(n, Sum):
        parts = []
        for i, (w, t) in enumerate(n.terms):
            if isinstance(t, Const):
                body, w = fmt_num(abs(t.value)), math.copysign(1.0, t.value) * w
            else:
                body = to_string(t) if abs(w) == 1.0 else f"{fmt_num(abs(w))}*{to_string(t)}"
            sign = "-" if w < 0 else "+"
            parts.append((f"-{body}" if sign == "-" else body) if i == 0 else f" {sign} {body}")
        return "".join(parts)
    raise TypeError(f"not a formula node: {n!r}")

"""Parse the formula language safely (a tokenizer and a recursive-descent parser, never ``eval``).

    [logits: | normalized:] expr
    expr    := product (("+" | "-") product)*
    product := signed (("*" | "/") signed)*          one side of "*" must be a number
    signed  := ("-" | "+") signed | atom
    atom    := NUMBER | "(" expr ")" | NAME | NAME "(" [arg ("," arg)*] ")"
    arg     := [NAME "="] (STRING | expr)

Names: ``M`` (the model), ``C`` (a guide), ``R`` (a retrieval mixture), ``union``/``max``, ``softunion``, ``intersection``/``min``,
``topk``, ``topp``, ``nucleus``, ``temp`` and the recipe names. ``−`` and ``×`` are accepted too.
Errors say the column and draw a caret under it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from tokensteer.errors import UserError
from tokensteer.formula.ast import (
    COMBINERS,
    FILTERS,
    MAX_GUIDE_K,
    MODES,
    Const,
    Formula,
    Guide,
    Model,
    Node,
    Retrieve,
    fmt_num,
    lin,
    op,
)

ALIASES = {"max": "union", "min": "intersection", "−": "-", "×": "*"}


class FormulaError(UserError):
    """A malformed formula; ``column`` is 1-based."""

    def __init__(self, msg: str, text: str, column: int) -> None:
        self.column, self.text, self.reason = column, text, msg
        caret = " " * (column - 1) + "^"
        super().__init__(f"formula error at column {column}: {msg}\n  {text}\n  {caret}")


@dataclass
class Tok:
    kind: str  # num, str, name, op, end
    text: str
    col: int  # 1-based
    value: object = None


_TOKEN = re.compile(
    r"""(?P<ws>\s+)
    |(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z_][A-Za-z0-9_]*)*)
    |(?P<op>[-+*/(),=:−×])""",
    re.VERBOSE,
)


def _unquote(raw: str, text: str, col: int) -> str:
    body = raw[1:-1]
    if raw[0] == "'":
        body = re.sub(r'(?<!\\)((?:\\\\)*)"', r'\1\\"', body).replace("\\'", "'")
    try:
        value = json.loads(f'"{body}"')
        value.encode("utf-8")
    except json.JSONDecodeError as e:
        raise FormulaError(f"bad escape in string ({e.msg})", text, col) from None
    except UnicodeEncodeError:  # "\ud800": a lone surrogate no tokenizer or terminal can encode
        raise FormulaError("the string is not valid Unicode (a lone surrogate escape like \\ud800)", text, col) from None
    return value


def tokenize(text: str, names: frozenset[str] = frozenset()) -> list[Tok]:
    """Split ``text`` into tokens; hyphenated names are kept only if they are in ``names``."""
    out: list[Tok] = []
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if not m:
            ch = text[i]
            hint = " (strings need matching quotes)" if ch in "\"'" else ""
            raise FormulaError(f"unexpected character {ch!r}{hint}", text, i + 1)
        kind = m.lastgroup
        s = m.group()
        if kind == "name" and "-" in s and s not in names:
            s = s.split("-")[0]  # "M-M" is a subtraction, not a name
        if kind == "str":
            out.append(Tok("str", s, i + 1, _unquote(s, text, i + 1)))
        elif kind == "num":
            if not math.isfinite(float(s)):
                raise FormulaError(f"the number {s[:20]}{'...' if len(s) > 20 else ''} is too large", text, i + 1)
            out.append(Tok("num", s, i + 1, float(s)))
        elif kind == "op":
            out.append(Tok("op", ALIASES.get(s, s), i + 1))
        elif kind == "name":
            out.append(Tok("name", s, i + 1))
        i += len(s)
    out.append(Tok("end", "", len(text) + 1))
    return out


class Parser:
    """Recursive descent over the tokens of one formula string."""

    def __init__(self, text: str) -> None:
        from tokensteer.formula.recipes import RECIPES

        self.text = text
        self.recipes = RECIPES
        self.toks = tokenize(text, frozenset(RECIPES))
        self.i = 0

    def error(self, msg: str, tok: Tok | None = None) -> FormulaError:
        tok = tok or self.peek()
        return FormulaError(msg, self.text, tok.col)

    def peek(self) -> Tok:
        return self.toks[self.i]

    def next(self) -> Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def accept(self, s: str) -> Tok | None:
        t = self.peek()
        if t.kind == "op" and t.text == s:
            self.i += 1
            return t
        return None

    def expect(self, s: str, what: str) -> Tok:
        t = self.accept(s)
        if t is None:
            found = self.peek()
            raise self.error(f"expected {what} but found {_describe(found)}")
        return t

    # grammar ------------------------------------------------------------------------------
    def formula(self) -> Formula:
        mode = "logits"
        t0, t1 = self.toks[0], self.toks[min(1, len(self.toks) - 1)]
        if t0.kind == "name" and t1.kind == "op" and t1.text == ":":
            if t0.text not in MODES:
                raise self.error(f"unknown mode {t0.text!r}; choose logits or normalized", t0)
            mode = t0.text
            self.i = 2
        if self.peek().kind == "end":
            raise self.error("the formula is empty; try e.g. M + 2*(M(\"Be kind:\\n\") - M)")
        root = self.expr()
        t = self.peek()
        if t.kind != "end":
            raise self.error(f"unexpected {_describe(t)}; expected + - * / or the end")
        return Formula(root, mode)

    def expr(self) -> Node:
        first = self.product()
        terms, sign = [(1.0, first)], None
        while True:
            t = self.peek()
            if t.kind == "op" and t.text in "+-":
                self.next()
                sign = sign or t
                terms.append((1.0 if t.text == "+" else -1.0, self.product()))
            elif sign is None:
                return first
            else:  # one normalisation for the whole sum: linear time in its length
                try:
                    return lin(terms)
                except UserError as e:  # a merged weight too large: point at the sum's first sign
                    raise self.error(str(e), sign) from None

    def product(self) -> Node:
        node = self.signed()
        while True:
            t = self.peek()
            if t.kind == "op" and t.text in "*/":
                self.next()
                rhs = self.signed()
                try:
                    if t.text == "/":
                        if not isinstance(rhs, Const) or rhs.value == 0:
                            raise self.error("can only divide by a non-zero number", t)
                        node = node / rhs.value
                    elif isinstance(rhs, Const):
                        node = node * rhs.value
                    elif isinstance(node, Const):
                        node = rhs * node.value
                    else:
                        raise self.error("can only multiply a formula by a number (no product of two formulas)", t)
                except FormulaError:
                    raise
                except UserError as e:  # a weight too large
                    raise self.error(str(e), t) from None
            else:
                return node

    def signed(self) -> Node:
        t = self.peek()
        if t.kind == "op" and t.text in "+-":
            self.next()
            inner = self.signed()
            try:
                return -inner if t.text == "-" else inner
            except UserError as e:  # a constant too large to negate into a weight: point at the sign
                raise self.error(str(e), t) from None
        return self.atom()

    def atom(self) -> Node:
        t = self.next()
        if t.kind == "num":
            return Const(t.value)
        if t.kind == "op" and t.text == "(":
            node = self.expr()
            self.expect(")", "')'")
            return node
        if t.kind == "name":
            return self.call(t)
        if t.kind == "str":
            raise self.error("a string can only be an argument, e.g. M(\"Be kind:\\n\")", t)
        raise self.error(f"expected a term but found {_describe(t)}", t)

    def args(self) -> tuple[list[tuple[object, Tok]], dict[str, tuple[object, Tok]]]:
        pos: list[tuple[object, Tok]] = []
        kw: dict[str, tuple[object, Tok]] = {}
        if self.accept(")"):
            return pos, kw
        while True:
            t = self.peek()
            if t.kind == "name" and self.toks[self.i + 1].kind == "op" and self.toks[self.i + 1].text == "=":
                self.i += 2
                if t.text in kw:
                    raise self.error(f"argument {t.text} given twice", t)
                kw[t.text] = (self.value(), t)
            else:
                if kw:
                    raise self.error("positional argument after a keyword argument", t)
                pos.append((self.value(), t))
            if self.accept(")"):
                return pos, kw
            self.expect(",", "',' or ')'")

    def value(self) -> object:
        t = self.peek()
        if t.kind == "str":
            self.next()
            if self.peek().kind == "op" and self.peek().text in "+-*/":
                raise self.error("strings cannot be combined with operators", self.peek())
            return t.value
        return self.expr()

    def call(self, name: Tok) -> Node:
        n = ALIASES.get(name.text, name.text)
        has_args = self.accept("(") is not None
        pos, kw = self.args() if has_args else ([], {})
        try:
            if n == "M":
                return self.model(name, pos, kw)
            if n == "C":
                return self.guide(name, pos, kw)
            if n == "R":
                return self.retrieve(pos, kw)
            if n in COMBINERS:
                self.no_kw(name, kw)
                return op(n, *[self.formula_arg(v, t) for v, t in pos])
            if n in FILTERS:
                self.no_kw(name, kw)
                if len(pos) != 2:
                    raise self.error(f"{n} takes a formula and a number, e.g. {n}(M, 0.9)", name)
                return op(n, self.formula_arg(*pos[0]), param=self.number(*pos[1]))
            if n in self.recipes:
                try:
                    return self.recipes[n].build([v for v, _ in pos], {k: v for k, (v, _) in kw.items()})
                except FormulaError as e:  # its column is in the recipe's expansion, not in this text
                    raise self.error(f"recipe {n}: {e.reason}", name) from None
        except FormulaError:
            raise
        except UserError as e:
            raise self.error(str(e), name) from None
        known = ", ".join(["M", "C", "R", *COMBINERS, "max", "min", *FILTERS])
        raise self.error(
            f"unknown name {name.text!r}; known: {known}; recipes: {', '.join(self.recipes)}", name
        )

    def no_kw(self, name: Tok, kw: dict) -> None:
        if kw:
            k, (_, t) = next(iter(kw.items()))
            raise self.error(f"{name.text} takes no argument named {k}", t)

    def formula_arg(self, v: object, t: Tok) -> Node:
        if not isinstance(v, Node):
            raise self.error("expected a formula here, not a string", t)
        return v

    def number(self, v: object, t: Tok) -> float:
        if not isinstance(v, Const):
            raise self.error("expected a number here", t)
        return v.value

    def string(self, v: object, t: Tok) -> str:
        if not isinstance(v, str):
            raise self.error("expected a quoted string here", t)
        return v

    def model(self, name: Tok, pos: list, kw: dict) -> Node:
        if len(pos) > 1:
            raise self.error('M takes one conditioning text, e.g. M("Be kind:\\n")', pos[1][1])
        prefix = self.string(*pos[0]) if pos else ""
        model, temp = None, 1.0
        for k, (v, t) in kw.items():
            if k == "model":
                model = self.string(v, t)
            elif k in ("T", "temperature"):
                temp = self.number(v, t)
                if temp <= 0:
                    raise self.error(f"temperature must be > 0, got {temp}", t)
            else:
                raise self.error(f"M takes no argument named {k}; it takes a text, model= and T=", t)
        return Model(prefix, model, temp)

    def guide(self, name: Tok, pos: list, kw: dict) -> Node:
        if len(pos) != 1:
            raise self.error('C takes the name of a guide, e.g. C("positive")', name)
        gname = self.string(*pos[0])
        k = 20
        for key, (v, t) in kw.items():
            if key != "k":
                raise self.error(f"C takes no argument named {key}; it takes a guide name and k=", t)
            kf = self.number(v, t)
            if not (1 <= kf <= MAX_GUIDE_K and kf.is_integer()):
                raise self.error(f"k must be a whole number from 1 to {MAX_GUIDE_K}, got {fmt_num(kf)}", t)
            k = int(kf)
        from tokensteer.formula.guides import GUIDES

        if gname not in GUIDES:
            raise self.error(f"unknown guide {gname!r}; known: {', '.join(GUIDES)}", pos[0][1])
        return Guide(gname, k)


    def retrieve(self, pos: list, kw: dict) -> Node:
        """``R(k=4, tau=0.1, every=0)``; k may also come first without its name."""
        if len(pos) > 1:
            raise self.error("R takes k, tau and every by name, e.g. R(k=4, tau=0.1)", pos[1][1])
        args = {"k": pos[0]} if pos else {}
        for key, v in kw.items():
            if key not in ("k", "tau", "every"):
                raise self.error(f"R takes no argument named {key}; it takes k=, tau= and every=", v[1])
            if key in args:
                raise self.error("argument k given twice", v[1])
            args[key] = v
        values = {}
        for key, (v, t) in args.items():
            values[key] = self.number(v, t)
            if key != "tau" and not values[key].is_integer():
                raise self.error(f"{key} must be a whole number, got {values[key]:g}", t)
        try:
            return Retrieve(**values)
        except UserError as e:
            raise self.error(str(e), args[next(iter(args))][1] if args else self.peek()) from None


def _describe(t: Tok) -> str:
    return "the end of the formula" if t.kind == "end" else repr(t.text)


def parse(text: str) -> Formula:
    """Parse a formula string or a recipe name into a Formula; raises FormulaError with a column."""
    p = Parser(text)
    try:
        return p.formula()
    except RecursionError:
        raise p.error("the formula nests too deeply (hundreds of parentheses); write it flatter", p.toks[min(p.i, len(p.toks) - 1)]) from None

"""Script (language) restriction: allow only tokens written in chosen Unicode scripts, or down-weight
the others by a factor (soft, like Smoothie-Qwen's down-weighting of another language's tokens).

Characters of the Common and Inherited scripts (spaces, digits, punctuation, combining marks) are
always allowed. Byte-fallback tokens are checked at the byte level: a lone lead byte is allowed
only if some allowed character starts with it, and the continuation bytes that complete a
character are checked once the row has its first bytes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from tokensteer.constraints.base import Constraint
from tokensteer.constraints.vocab import TokenTable
from tokensteer.errors import UserError
from tokensteer.hooks import Control

if TYPE_CHECKING:
    from tokensteer.engine.state import LoopState

ALWAYS = ("Common", "Inherited")


def script_names(scripts: Sequence[str]) -> tuple[str, ...]:
    """Canonical script names (``latin`` -> ``Latin``); raises UserError for unknown ones."""
    import regex

    out = []
    for s in scripts:
        name = s.strip().replace(" ", "_").title()
        try:
            regex.compile(rf"\p{{Script={name}}}")
        except regex.error:
            raise UserError(f"unknown Unicode script {s!r}; examples: Latin, Cyrillic, Greek, Han, Arabic, Hiragana") from None
        out.append(name)
    if not out:
        raise UserError("--script needs at least one script name, e.g. --script Latin")
    return tuple(sorted(set(out)))


def _char_class(scripts: tuple[str, ...]) -> str:
    return "".join(rf"\p{{Script={s}}}" for s in (*scripts, *ALWAYS))


def allowed_prefixes(scripts: tuple[str, ...]) -> frozenset[bytes]:
    """Every proper prefix (1-3 bytes) of the UTF-8 encoding of an allowed character."""
    import regex

    cls = regex.compile(f"[{_char_class(scripts)}]")
    out: set[bytes] = set()
    for cp in range(0x80, 0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        if cls.match(c):
            e = c.encode("utf-8")
            out.update(e[:k] for k in range(1, len(e)))
    return frozenset(out)


def _split_utf8(data: bytes) -> tuple[bytes, str | None, bytes]:
    """(leading continuation bytes, decoded middle or None if invalid, incomplete tail bytes)."""
    i = 0
    while i < len(data) and 0x80 <= data[i] < 0xC0:
        i += 1
    head, rest = data[:i], data[i:]
    for k in range(0, min(3, len(rest)) + 1):
        body, tail = rest[: len(rest) - k], rest[len(rest) - k :]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if k and not (tail[0] >= 0xC0):
            continue
        return head, text, tail
    return head, None, b""


class ScriptTables:
    """Per token: written only in the allowed scripts (static part), and how byte pieces fit."""

    def __init__(self, table: TokenTable, scripts: tuple[str, ...]) -> None:
        import regex

        self.table = table
        self.scripts = scripts
        ok_text = regex.compile(f"[{_char_class(scripts)}]*")
        self.prefixes = allowed_prefixes(scripts)
        V = table.size
        self.clean = torch.zeros(V, dtype=torch.bool)  # allowed after a complete character
        self.foreign = torch.zeros(V, dtype=torch.bool)  # holds a character of another script
        self.continuing: list[int] = []  # starts with continuation bytes: checked against the row
        self.whole = torch.zeros(V, dtype=torch.bool)  # ends on a complete character
        self.need = torch.zeros(V, dtype=torch.int32)  # bytes still missing from its last character
        for i, data in enumerate(table.tokens):
            if not data:
                continue
            head, text, tail = _split_utf8(data)
            if text is None:
                self.foreign[i] = False
                continue
            good = ok_text.fullmatch(text) is not None
            self.foreign[i] = not good
            if head:
                self.continuing.append(i)
            elif good and (not tail or tail in self.prefixes):
                self.clean[i] = True
            self.whole[i] = not tail
            self.need[i] = missing(tail)

    def fits(self, pending: bytes, data: bytes) -> tuple[bool, bytes]:
        """Whether ``data`` may follow the incomplete character ``pending``; and the new pending bytes."""
        import regex

        whole = pending + data
        head, text, tail = _split_utf8(whole)
        if head or text is None:
            return False, b""
        ok = regex.fullmatch(f"[{_char_class(self.scripts)}]*", text) is not None
        return ok and (not tail or tail in self.prefixes), tail


def missing(tail: bytes) -> int:
    """How many bytes the incomplete character ``tail`` still lacks (0 for no tail)."""
    if not tail:
        return 0
    return (2 if tail[0] < 0xE0 else 3 if tail[0] < 0xF0 else 4) - len(tail)


def script_tables(table: TokenTable, scripts: tuple[str, ...]) -> ScriptTables:
    return table.memo(("script", scripts), lambda: ScriptTables(table, scripts))


class ScriptOnly(Constraint):
    """Hard: every character of the generated text is in one of ``scripts`` (or Common/Inherited)."""

    def __init__(self, table: TokenTable, scripts: Sequence[str]) -> None:
        super().__init__(table)
        self.scripts = script_names(scripts)
        self.t = script_tables(table, self.scripts)

    def __repr__(self) -> str:
        return f"ScriptOnly({', '.join(self.scripts)})"

    def reset(self, state: LoopState) -> None:
        self.pending = [b""] * state.batch_size

    def allowed(self, state: LoopState, b: int) -> torch.Tensor:
        pending = self.pending[b]
        # The text must not end inside a character: a token may leave k bytes missing only if k more
        # tokens fit the budget (each later token adds at least one byte).
        spare = self.steps_left(state) - 1
        if not pending:
            self.need(b, self.t.need)
            return (self.t.clean & (self.t.need <= spare) if spare < 3 else self.t.clean) | self.table.eos
        fits = [(i, missing(tail)) for i in self.t.continuing for ok, tail in [self.t.fits(pending, self.table.tokens[i])] if ok]
        if self.shares_budget:
            need = torch.zeros(self.table.size, dtype=torch.long)
            if fits:
                need[[i for i, _ in fits]] = torch.tensor([k for _, k in fits], dtype=torch.long)
            self.need(b, need)
        return self.table.ids_mask(i for i, k in fits if k <= spare)

    def advance(self, state: LoopState, b: int, token: int, data: bytes) -> None:
        if data:
            self.pending[b] = self.t.fits(self.pending[b], data)[1]


class ScriptPreference(Control):
    """Soft: multiply the probability of tokens holding other scripts' characters by ``factor``."""

    stages = frozenset({"rewrite"})

    def __init__(self, table: TokenTable, scripts: Sequence[str], factor: float) -> None:
        if not 0 < factor < 1:
            raise UserError(f"--script-soft must be a factor between 0 and 1 (e.g. 0.1), got {factor}")
        self.scripts = script_names(scripts)
        t = script_tables(table, self.scripts)
        self.bias = t.foreign.float() * math.log(factor)

    def __repr__(self) -> str:
        return f"ScriptPreference({', '.join(self.scripts)})"

    def logprobs(self, state: LoopState, logprobs: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logprobs + self.bias, dim=-1)

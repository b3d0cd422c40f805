"""Vocabulary restriction: every word of the text comes from a word list (e.g. a learner's), in any
casing, plus punctuation and spaces.

A word is a run of letters, digits, ``_`` and ``'`` (non-ASCII bytes count as letters, so foreign
punctuation must be listed too). Tokens are checked on their lowered bytes: a token is allowed when
every word it completes is listed and the word it leaves open is the start of a listed word. The
check from a word boundary is one table per tokenizer and list; inside a word, the tokens that go
on spelling it are looked up from the listed words that start with it (cached per word prefix).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Iterable

import torch

from tokensteer.constraints.base import Constraint
from tokensteer.constraints.vocab import NEVER, TokenTable
from tokensteer.errors import UserError, existing_file

if TYPE_CHECKING:
    from tokensteer.engine.state import LoopState

LETTERS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_'") | frozenset(range(0x80, 0x100))


def is_letter(byte: int) -> bool:
    return byte in LETTERS


def split_runs(data: bytes) -> list[tuple[bool, bytes]]:
    """The bytes as alternating runs: (True, word bytes) / (False, other bytes)."""
    runs: list[tuple[bool, bytes]] = []
    for c in data:
        w = is_letter(c)
        if runs and runs[-1][0] == w:
            runs[-1] = (w, runs[-1][1] + bytes([c]))
        else:
            runs.append((w, bytes([c])))
    return runs


def read_wordlist(path: str) -> list[str]:
    """Words from a file: one or more per line, ``#`` starts a comment."""
    p = existing_file(path, "word list")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"word list {path!r} is not UTF-8 text") from None
    words = []
    for line in text.splitlines():
        words += line.split("#", 1)[0].replace(",", " ").split()
    if not words:
        raise UserError(f"word list {path!r} has no words")
    return words


class WordList(Constraint):
    """Only words from ``words`` (case-insensitive), punctuation and whitespace."""

    def __init__(self, table: TokenTable, words: Iterable[str]) -> None:
        super().__init__(table)
        listed = set()
        for w in words:
            data = w.strip().lower().encode("utf-8")
            bad = [chr(c) for c in data if not is_letter(c)]
            if not data:
                continue
            if bad:
                raise UserError(f"word list entry {w!r} has {bad[0]!r}; list single words (letters, digits, ')")
            listed.add(data)
        if not listed:
            raise UserError("the word list is empty")
        self.listed = frozenset(listed)
        self.sorted = sorted(listed)
        self.prefixes = frozenset(w[:k] for w in listed for k in range(1, len(w) + 1))
        key = ("wordlist", self.listed)
        self.static = table.memo(key, self._static)
        self._inside: dict[bytes, torch.Tensor] = {}
        self._finish: dict[bytes, int] = {}
        self._budgeted: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.longest = max(len(w) for w in listed)

    def __repr__(self) -> str:
        return f"WordList({len(self.listed)} words)"

    def knows(self, word: str) -> bool:
        """Whether every word of ``word`` (a word or phrase) is listed."""
        return all(r in self.listed for w, r in split_runs(word.lower().encode("utf-8")) if w)

    def _fine(self, runs: list[tuple[bool, bytes]]) -> bool:
        """Runs starting at a word boundary: closed words listed, the open one a listed prefix."""
        for k, (w, r) in enumerate(runs):
            if w and r not in (self.prefixes if k == len(runs) - 1 else self.listed):
                return False
        return True

    def _static(self) -> dict:
        t = self.table
        ok_boundary = torch.zeros(t.size, dtype=torch.bool)
        lead_other = torch.zeros(t.size, dtype=torch.bool)
        closes = torch.zeros(t.size, dtype=torch.bool)  # several runs, leaving no unlisted word open
        only_word: dict[bytes, list[int]] = {}  # whole token is word bytes
        word_then: dict[bytes, list[int]] = {}  # first run of word bytes, then a fine rest
        for i, low in enumerate(t.lowered):
            if not low:
                continue
            runs = split_runs(low)
            ok_boundary[i] = self._fine(runs)
            closes[i] = (len(runs) > 1 or not runs[0][0]) and (not runs[-1][0] or runs[-1][1] in self.listed)
            if not runs[0][0]:
                lead_other[i] = True
            elif len(runs) == 1:
                only_word.setdefault(runs[0][1], []).append(i)
            elif self._fine(runs[1:]):
                word_then.setdefault(runs[0][1], []).append(i)
        tails = [split_runs(low) for low in t.lowered]
        return {
            "ok_boundary": ok_boundary, "lead_other": lead_other, "closes": closes,
            "only_word": only_word, "word_then": word_then,
            "open_unlisted": torch.tensor([bool(r) and r[-1][0] and r[-1][1] not in self.listed for r in tails], dtype=torch.bool),
            "whole": torch.tensor([len(r) == 1 and r[0][0] for r in tails], dtype=torch.bool),
        }

    def _inside_mask(self, cur: bytes) -> torch.Tensor:
        """Tokens allowed while the open word is ``cur``."""
        m = self._inside.get(cur)
        if m is None:
            s = self.static
            ids: list[int] = []
            lo = bisect.bisect_left(self.sorted, cur)
            conts = set()
            for w in self.sorted[lo:]:
                if not w.startswith(cur):
                    break
                conts.update(w[len(cur) : k] for k in range(len(cur) + 1, len(w) + 1))
            for rest in conts:
                ids += s["only_word"].get(rest, [])
                if cur + rest in self.listed:
                    ids += s["word_then"].get(rest, [])
            m = self.table.ids_mask(ids)
            if cur in self.listed:
                m |= s["lead_other"] & s["ok_boundary"] | self.table.eos
            if len(self._inside) < 4096:
                self._inside[cur] = m
        return m

    def finish_cost(self, prefix: bytes) -> int:
        """The fewest tokens that complete the open word ``prefix`` into a listed word (0 if it is one)."""
        if not prefix:
            return 0
        cost = self._finish.get(prefix)
        if cost is None:
            cost = NEVER
            for w in self.sorted[bisect.bisect_left(self.sorted, prefix) :]:
                if not w.startswith(prefix):
                    break
                cost = min(cost, self.table.spell_costs(w)[len(prefix)])
            self._finish[prefix] = cost
        return cost

    def _open_after(self, cur: bytes, token: int) -> bytes:
        """The word left open after ``token`` when the open word was ``cur``."""
        whole, tail = self.table.memo("word-tails", self._tails)[token]
        return cur + tail if whole else tail

    def _tails(self) -> list[tuple[bool, bytes]]:
        """Per token: (all word bytes, the word bytes it ends with), from its lowered bytes."""
        out = []
        for low in self.table.lowered:
            runs = split_runs(low)
            out.append((len(runs) == 1 and runs[0][0], runs[-1][1] if runs and runs[-1][0] else b""))
        return out

    def _in_budget(self, m: torch.Tensor, cur: bytes, left: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``m`` without the tokens whose open word cannot be finished in the ``left`` tokens after
        them, and per token the tokens that finishing it takes."""
        key = (cur, left)  # ``m`` depends on nothing else
        if key not in self._budgeted:
            ids = m.nonzero().flatten().tolist()
            costs = [self.finish_cost(self._open_after(cur, i)) for i in ids]
            need = torch.zeros(self.table.size, dtype=torch.long)
            if ids:
                need[ids] = torch.tensor(costs, dtype=torch.long)
            if len(self._budgeted) >= 1024:
                self._budgeted.clear()
            self._budgeted[key] = (m & (need <= left), need)
        return self._budgeted[key]

    def _least_need(self, cur: bytes) -> torch.Tensor:
        """Per token, 1 if it leaves a word open that is not yet listed (one more token at least), else 0."""
        s = self.static
        need = s["open_unlisted"].int()
        if cur:
            need = need.clone()
            need[s["whole"]] = 1
            done = []
            for w in self.sorted[bisect.bisect_left(self.sorted, cur) :]:
                if not w.startswith(cur):
                    break
                done += s["only_word"].get(w[len(cur) :], [])
            need[done] = 0
        return need

    def reset(self, state: LoopState) -> None:
        self.cur = [b""] * state.batch_size

    def allowed(self, state: LoopState, b: int) -> torch.Tensor:
        cur = self.cur[b]
        m = self.static["ok_boundary"] | self.table.eos if not cur else self._inside_mask(cur)
        if self.last_step(state):  # the text ends here: no word may be left half-spelled
            s = self.static
            done = [i for rest, ids in s["only_word"].items() if cur + rest in self.listed for i in ids]
            m = m & (s["closes"] | self.table.eos | self.table.ids_mask(done))
        left = self.steps_left(state) - 1
        if left < self.longest:  # near the end of the budget: every open word must still fit
            m, need = self._in_budget(m, cur, left)
            self.need(b, need)
        elif self.shares_budget:
            self.need(b, self._least_need(cur))
        return m

    def advance(self, state: LoopState, b: int, token: int, data: bytes) -> None:
        low = self.table.lowered[token]
        runs = split_runs(low)
        if not runs:
            return
        if len(runs) == 1 and runs[0][0]:
            self.cur[b] += runs[0][1]
        else:
            self.cur[b] = runs[-1][1] if runs[-1][0] else b""

"""Banned words and phrases, blocked in every tokenization and every casing, by a look-ahead mask.

Matching runs on the lower-cased bytes of the text, so " Cat", "CAT", "c"+"at" and byte-fallback
spellings are all the same. A banned word is matched as a whole word: its edges that are word
characters need a non-word byte (or the start of the generation) next to them. A match that ends
exactly at the end of the text is *pending*: the next token must then extend the word (e.g. "cats"),
and EOS is refused; on the last step of the budget no pending match may be created at all.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from tokensteer.constraints.base import Constraint
from tokensteer.constraints.vocab import WORD_BYTES, TokenTable, lower_bytes
from tokensteer.errors import UserError

if TYPE_CHECKING:
    from tokensteer.engine.state import LoopState

MAX_VARIANTS = 64
_WORD_ARRAY = np.frombuffer(bytes(sorted(WORD_BYTES)), np.uint8).astype(np.int16)


def normalize_phrase(text: str) -> str:
    """One space between words, no outer whitespace; the form used everywhere for phrases."""
    return " ".join(text.split())


def spellings(phrase: str) -> set[bytes]:
    """Lower-cased byte spellings of ``phrase`` the text may contain.

    Tokens that are valid UTF-8 are lower-cased in full; byte-fallback pieces only in ASCII, so a
    non-ASCII letter is matched in both cases.
    """
    low = phrase.lower()
    options = [sorted({c.encode(), c.upper().encode()}) if ord(c) > 127 else [c.encode()] for c in low]
    n = 1
    for o in options:
        n *= len(o)
    if n > MAX_VARIANTS:
        return {low.encode(), "".join(c.upper() if ord(c) > 127 else c for c in low).encode()}
    return {b"".join(p) for p in itertools.product(*options)}


@dataclass(frozen=True)
class Pattern:
    data: bytes
    left: bool  # needs a word boundary before it
    right: bool  # needs a word boundary after it


def _is_word(byte: int) -> bool:
    return byte in WORD_BYTES


class BannedWords(Constraint):
    """Never let the generated text contain any of ``words`` (whole words, any casing)."""

    def __init__(self, table: TokenTable, words: Sequence[str]) -> None:
        super().__init__(table)
        self.words = [normalize_phrase(w) for w in words]
        for w, raw in zip(self.words, words):
            if not w:
                raise UserError(f"a banned word is empty ({raw!r}); give the word or phrase to ban")
        pats = {Pattern(s, _is_word(s[0]), _is_word(s[-1])) for w in self.words for s in spellings(w)}
        self.patterns = sorted(pats, key=lambda p: p.data)
        self.longest = max(len(p.data) for p in self.patterns)
        key = ("banned", tuple(self.patterns))
        self.static = table.memo(key, self._static_tables)
        table.prefix_index()  # for the cross-token tables built as matches start
        self._masks: dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"BannedWords({self.words!r})"

    # ---- tables computed once per tokenizer and word set

    def _static_tables(self) -> dict[str, torch.Tensor]:
        """For every token on its own: matches that are complete or pending inside its bytes."""
        t = self.table
        V = t.size
        names = ("bad_mid", "bad_start", "pend_mid", "pend_start")
        out = {n: torch.zeros(V, dtype=torch.bool) for n in names}
        finder = re.compile(b"|".join(re.escape(p.data) for p in self.patterns))
        hits = [i for i, low in enumerate(t.lowered) if finder.search(low)]
        for i in hits:
            low = t.lowered[i]
            for p in self.patterns:
                start = low.find(p.data)
                while start != -1:
                    end = start + len(p.data)
                    at_start = start == 0 and p.left
                    if start > 0 and p.left and _is_word(low[start - 1]):
                        pass  # glued to the word before it inside the token: not this word
                    elif end == len(low) and p.right:
                        out["pend_start" if at_start else "pend_mid"][i] = True
                    elif end == len(low) or not p.right or not _is_word(low[end]):
                        out["bad_start" if at_start else "bad_mid"][i] = True
                    start = low.find(p.data, start + 1)
        out["lead_word"] = t.flags(lambda b: bool(b) and _is_word(b[0]))
        out["lead_other"] = t.flags(lambda b: bool(b) and not _is_word(b[0]))
        return out

    def _cross_tables(self, rest: bytes, right: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids that finish a started match whose remaining bytes are ``rest``: (bad, pending).

        They depend only on the tokenizer, so they are kept on its table for every later request."""
        return self.table.memo(("banned-cross", rest, right), lambda: self._build_cross(rest, right))

    def _build_cross(self, rest: bytes, right: bool) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.table
        ids = np.asarray(t.starting_with(rest), dtype=np.int64)
        after = t.byte_at(ids, len(rest))  # the byte after the match, -1 at the token's end
        ends = after < 0
        glued = np.isin(after, _WORD_ARRAY)  # a word byte follows: a longer word, not this one
        if right:
            bad, pend = ids[~ends & ~glued], ids[ends]
        else:
            bad, pend = ids, ids[:0]
        return torch.from_numpy(bad), torch.from_numpy(pend)

    # ---- per-row state

    def reset(self, state: LoopState) -> None:
        B = state.batch_size
        self.active: list[list[tuple[bytes, bool]]] = [[] for _ in range(B)]  # (remaining bytes, right)
        self.pending = [False] * B
        self.boundary = [True] * B  # the next byte may start a word-bounded match
        self.tail = [b"" for _ in range(B)]
        self.gen_len = [0] * B
        for b in range(B):  # the prompt's last bytes, so matches across the seam are seen too
            ids = state.prompt_tokens[b][-self.longest - 2 :]
            prompt_tail = b"".join(self.table.tokens[i] for i in ids if 0 <= i < self.table.size)
            self.tail[b] = lower_bytes(prompt_tail)[-(self.longest + 1) :]
            self._scan(b)

    def _scan(self, b: int) -> None:
        """Recompute row b's started and pending matches from its tail of lowered bytes.

        A match may start after a non-word byte, at the start of the text, or where the generated
        text starts (so the continuation is safe on its own and joined to the prompt).
        """
        buf = self.tail[b]
        seam = len(buf) - self.gen_len[b]
        active, pending = [], False
        for i in range(len(buf)):
            frag = buf[i:]
            bounded = i == 0 or i == seam or not _is_word(buf[i - 1])
            for p in self.patterns:
                if p.left and not bounded:
                    continue
                if len(frag) < len(p.data) and p.data.startswith(frag):
                    active.append((p.data[len(frag) :], p.right))
                elif frag == p.data and p.right:
                    pending = True
        self.active[b] = active
        self.pending[b] = pending
        self.boundary[b] = not buf or seam == len(buf) or not _is_word(buf[-1])

    def allowed(self, state: LoopState, b: int) -> torch.Tensor:
        # The mask depends only on this small key, which repeats from step to step: cache it.
        key = (self.last_step(state), self.boundary[b], self.pending[b], tuple(self.active[b]))
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) >= 512:
                self._masks.clear()
            mask = self._masks[key] = self._allowed(*key)
        return mask

    def _allowed(self, last: bool, boundary: bool, pending: bool, active: tuple[tuple[bytes, bool], ...]) -> torch.Tensor:
        s = self.static
        bad = s["bad_mid"] | s["pend_mid"] if last else s["bad_mid"].clone()
        if boundary:
            bad |= s["bad_start"]
            if last:
                bad |= s["pend_start"]
        for rest, right in active:
            ids_bad, ids_pend = self._cross_tables(rest, right)
            if len(ids_bad):
                bad[ids_bad] = True
            if last and len(ids_pend):
                bad[ids_pend] = True
        if pending:
            bad |= s["lead_other"]
            bad |= self.table.eos
        return ~bad

    def advance(self, state: LoopState, b: int, token: int, data: bytes) -> None:
        self.gen_len[b] += len(data)
        keep = self.longest + 1
        self.tail[b] = (self.tail[b] + self.table.lowered[token])[-keep:]
        self.gen_len[b] = min(self.gen_len[b], len(self.tail[b]))
        self._scan(b)

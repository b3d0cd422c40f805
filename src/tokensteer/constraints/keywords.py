"""Required keywords (CommonGen-style sets) with an optional deadline of N words.

EOS is refused until every keyword has appeared as a whole word (any casing). The model is free to
use them where it likes; when the words left before the deadline (or the tokens left in the budget)
only just suffice for the missing keywords, the next word is forced to be one of them: the mask
then allows only tokens that go on spelling a missing keyword, and after it a word boundary.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

import torch

from tokensteer.constraints.banned import normalize_phrase
from tokensteer.constraints.base import Constraint
from tokensteer.constraints.counts import SPACE, count_words
from tokensteer.constraints.vocab import WORD_BYTES, TokenTable
from tokensteer.errors import UserError

#: bytes that would glue onto a keyword and hide it (``\w``, ``'`` and any non-ASCII byte)
GLUE = WORD_BYTES | {ord("'")} | frozenset(range(0x80, 0x100))

if TYPE_CHECKING:
    from tokensteer.backends.base import Tokenizer
    from tokensteer.loop import LoopState


def keyword_regex(keyword: str) -> re.Pattern:
    """Whole-word, case-insensitive occurrence of ``keyword`` (words end at any non-``\\w`` char)."""
    return re.compile(r"(?<![\w'])" + re.escape(normalize_phrase(keyword).lower()) + r"(?![\w'])")


def found(keyword: str, text: str) -> bool:
    """Whether ``keyword`` appears in ``text`` as a whole word, in any casing."""
    return keyword_regex(keyword).search(text.lower()) is not None


class RequiredWords(Constraint):
    """Every keyword must appear; with ``within``, inside the first ``within`` words."""

    def __init__(self, tok: Tokenizer, table: TokenTable, keywords: Sequence[str], within: int | None = None) -> None:
        super().__init__(table)
        self.keywords = [normalize_phrase(k) for k in keywords]
        if any(not k for k in self.keywords):
            raise UserError("a required word is empty; give the word to require")
        self.targets = [k.lower().encode("utf-8") for k in self.keywords]
        self.n_words = [len(k.split()) for k in self.keywords]
        if within is not None and within < sum(self.n_words):
            raise UserError(
                f"the required words need {sum(self.n_words)} words but must appear within {within}; raise the limit"
            )
        self.within = within
        self.patterns = [keyword_regex(k) for k in self.keywords]
        self.n_tokens = [len(t) + 1 for t in self.targets]  # worst case: a token per byte
        self.lead_word = table.memo("lead-glue", lambda: table.flags(lambda b: bool(b) and b[0] in GLUE))

    def __repr__(self) -> str:
        return f"RequiredWords({self.keywords!r}, within={self.within})"

    def reset(self, state: LoopState) -> None:
        B = state.batch_size
        self.spell: list[bytes] = [b""] * B  # lowered bytes written since a keyword was forced
        self.forcing: list[list[bytes]] = [[] for _ in range(B)]  # targets being spelled
        self.prompt_space = []
        for b in range(B):
            ids = state.prompt_tokens[b][-1:]
            last = b"".join(self.table.tokens[i] for i in ids if 0 <= i < self.table.size)
            self.prompt_space.append(not last or last[-1] in SPACE)

    def status(self, b: int) -> tuple[list[int], bool]:
        """(indices of missing keywords, whether a found keyword is at risk of being extended)."""
        text = bytes(self.generated[b]).decode("utf-8", errors="replace").lower()
        missing, risk = [], False
        for k, p in enumerate(self.patterns):
            ends = [m.end() for m in p.finditer(text)]
            if not ends:
                missing.append(k)
            elif all(e == len(text) for e in ends):
                risk = True
        return missing, risk

    def _spelling(self, targets: list[bytes], done: bytes) -> torch.Tensor:
        """Tokens that go on spelling one of ``targets`` after ``done`` of it is written."""
        t = self.table
        ids: list[int] = []
        for s in targets:
            if not s.startswith(done) or s == done:
                continue
            rest = s[len(done) :]
            ids += t.prefixes_of(rest)
            ids += [i for i in t.starting_with(rest) if len(t.lowered[i]) > len(rest) and t.lowered[i][len(rest)] not in GLUE]
        return t.ids_mask(ids)

    def allowed(self, state: LoopState, b: int) -> torch.Tensor | None:
        missing, risk = self.status(b)
        t = self.table
        if self.forcing[b]:
            return self._spelling(self.forcing[b], self.spell[b])
        if not missing:
            return ~self.lead_word if risk else None
        data = bytes(self.generated[b])
        need_words = sum(self.n_words[k] for k in missing)
        need_tokens = sum(self.n_tokens[k] for k in missing)
        force = self.steps_left(state) <= need_tokens + 1
        if self.within is not None and self.within - count_words(data) <= need_words:
            force = True
        if force:
            space = (data[-1] in SPACE) if data else self.prompt_space[b]
            lead = b"" if space else b" "
            self.forcing[b] = [lead + self.targets[k] for k in missing]
            self.spell[b] = b""
            return self._spelling(self.forcing[b], b"")
        ok = ~t.eos
        if risk:
            ok &= ~self.lead_word
        return ok

    def advance(self, state: LoopState, b: int, token: int, data: bytes) -> None:
        if not self.forcing[b]:
            return
        done = self.spell[b] + self.table.lowered[token]
        if any(done.startswith(s) for s in self.forcing[b]) or not any(s.startswith(done) for s in self.forcing[b]):
            self.forcing[b], self.spell[b] = [], b""
        else:
            self.spell[b] = done

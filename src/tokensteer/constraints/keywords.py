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
from tokensteer.constraints.vocab import NEVER, WORD_BYTES, TokenTable
from tokensteer.errors import UserError

#: bytes that would glue onto a keyword and hide it (``\w``, ``'`` and any non-ASCII byte)
GLUE = WORD_BYTES | {ord("'")} | frozenset(range(0x80, 0x100))

if TYPE_CHECKING:
    from tokensteer.backends.base import Tokenizer
    from tokensteer.engine.state import LoopState


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
        self.must_write = tuple(self.keywords)
        self.n_words = [len(k.split()) for k in self.keywords]
        if within is not None and within < sum(self.n_words):
            raise UserError(
                f"the required words need {sum(self.n_words)} words but must appear within {within}; raise the limit"
            )
        self.within = within
        self.patterns = [keyword_regex(k) for k in self.keywords]
        # tokens each keyword needs at most, written as a new word (" dog") in its shortest spelling
        self.n_tokens = [min(table.spell_costs(b" " + t)[0], len(t) + 1) for t in self.targets]
        self.lead_word = table.memo("lead-glue", lambda: table.flags(lambda b: bool(b) and b[0] in GLUE))

    def __repr__(self) -> str:
        return f"RequiredWords({self.keywords!r}, within={self.within})"

    def reset(self, state: LoopState) -> None:
        B = state.batch_size
        self.spell: list[bytes] = [b""] * B  # lowered bytes written since a keyword was forced
        self.forcing: list[list[tuple[int, bytes]]] = [[] for _ in range(B)]  # (keyword, bytes) being spelled
        self.owed: list[set[int]] = [set() for _ in range(B)]  # the keywords missing when forcing began
        self.prompt_space = []
        for b in range(B):
            ids = state.prompt_tokens[b][-1:]
            last = b"".join(self.table.tokens[i] for i in ids if 0 <= i < self.table.size)
            self.prompt_space.append(not last or last[-1] in SPACE)
            # after a space the first keyword may go without one ("dog" rather than " dog")
            saved = max(n - self.table.spell_costs(t)[0] for n, t in zip(self.n_tokens, self.targets)) if self.prompt_space[b] else 0
            need = sum(self.n_tokens) - max(saved, 0)
            if state.max_tokens is not None and need > state.max_tokens:
                raise UserError(
                    f"the required words need {need} tokens to write but --max-tokens is {state.max_tokens}; raise --max-tokens"
                )

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

    def _spelling(self, b: int, targets: list[tuple[int, bytes]], done: bytes, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens that go on spelling one of ``targets`` (keyword index, bytes) after ``done`` of it is
        written, leaving enough of the ``budget`` of later tokens to finish it and the other keywords;
        and per token the tokens still needed after it."""
        t = self.table
        ids: list[int] = []
        needs: list[int] = []
        missing = self.owed[b]
        for k, s in targets:
            if not s.startswith(done) or s == done:
                continue
            rest, costs = s[len(done) :], t.spell_costs(s)
            spare = budget - sum(self.n_tokens[j] for j in missing if j != k)
            for n in range(1, len(rest) + 1):
                if costs[len(done) + n] <= spare:
                    ids += t.exactly(rest[:n])
                    needs += [costs[len(done) + n] + budget - spare] * len(t.exactly(rest[:n]))
            if spare >= 0:
                over = [i for i in t.starting_with(rest) if len(t.lowered[i]) > len(rest) and t.lowered[i][len(rest)] not in GLUE]
                ids, needs = ids + over, needs + [budget - spare] * len(over)
        need = torch.zeros(t.size, dtype=torch.long)
        if ids:  # a token on two spellings (after a space: "dog" and " dog") keeps the smaller need
            idx = torch.tensor(ids, dtype=torch.long)
            need[idx] = NEVER
            need.scatter_reduce_(0, idx, torch.tensor(needs, dtype=torch.long), "amin")
        return t.ids_mask(ids), need

    def _spelled(self, b: int, mask_need: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.need(b, mask_need[1])
        return mask_need[0]

    def allowed(self, state: LoopState, b: int) -> torch.Tensor | None:
        missing, risk = self.status(b)
        t = self.table
        if self.forcing[b]:
            return self._spelled(b, self._spelling(b, self.forcing[b], self.spell[b], self.steps_left(state) - 1))
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
            leads = (b"", b" ") if space else (b" ",)  # after a space, " dog" may still be the shorter spelling
            self.forcing[b] = [(k, lead + self.targets[k]) for k in missing for lead in leads]
            self.owed[b] = set(missing)
            self.spell[b] = b""
            return self._spelled(b, self._spelling(b, self.forcing[b], b"", self.steps_left(state) - 1))
        if self.shares_budget:
            self.need(b, torch.full((t.size,), need_tokens, dtype=torch.long))
        ok = ~t.eos
        if risk:
            ok &= ~self.lead_word
        return ok

    def advance(self, state: LoopState, b: int, token: int, data: bytes) -> None:
        if not self.forcing[b]:
            return
        done = self.spell[b] + self.table.lowered[token]
        # a keyword is written once its bytes end at a word boundary (" to" does not write " t")
        written = any(done == s or (done.startswith(s) and done[len(s)] not in GLUE) for _, s in self.forcing[b])
        going = [(k, s) for k, s in self.forcing[b] if s.startswith(done) and s != done]
        if written or not going:
            self.forcing[b], self.spell[b] = [], b""
        else:  # the keywords still owed stay in the budget through the ``owed`` set
            self.forcing[b], self.spell[b] = going, done

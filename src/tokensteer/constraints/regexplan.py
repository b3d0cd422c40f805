"""Budget planning for ``--regex``: keep room to finish the match within ``--max-tokens``.

llguidance says which tokens a regex allows next, not how many tokens the match still needs, so a
small budget used to end the text half-matched. Here the regex's DFA (built by interegular) gives
every state a cost: the fewest tokens that reach a full match. For small DFAs it is exact over the
vocabulary's whole-text tokens (each token walked from each state); for big ones it is one token
per character, an upper bound the single-character tokens can always meet. While the budget is
tight, a token is allowed only if the state it leads to can still finish in the steps left.
Regexes interegular cannot read, and texts its DFA disagrees with, are left unplanned (llguidance
alone decides, as before), so planning can only ever narrow llguidance's mask, never widen it.
"""

from __future__ import annotations

import codecs
import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from tokensteer.constraints.vocab import TokenTable

INF = 1 << 20
#: at most this many DFA transitions are explored: some regexes (``(a|b)*a(a|b){20}``) have
#: exponentially many states, which llguidance never builds but a DFA would; those go unplanned
MAX_MOVES = 5000
#: DFAs with at most this many states get exact token costs (each state walks the whole vocabulary
#: once, ~40 ms at 262k tokens); bigger ones keep the one-token-per-character bound
EXACT_STATES = 32
_CRAWL = threading.Lock()


class TooBig(ValueError):
    """The regex's DFA would be too big to build here."""


@contextmanager
def _bounded_dfa(limit: int) -> Iterator[None]:
    """Make interegular's DFA construction (its ``crawl``) give up after ``limit`` transitions."""
    import interegular.fsm as fsm

    original = fsm.crawl

    def crawl(alphabet, initial, final, follow):
        moves = 0

        def counted(state, transition):
            nonlocal moves
            moves += 1
            if moves > limit:
                raise TooBig(f"more than {limit} DFA transitions")
            return follow(state, transition)

        return original(alphabet, initial, final, counted)

    with _CRAWL:
        fsm.crawl = crawl
        try:
            yield
        finally:
            fsm.crawl = original


def _single_chars(table: TokenTable) -> list[str]:
    """The characters that some token writes alone (a cheap pass: only tokens of up to 4 bytes)."""
    out = set()
    for t in table.tokens:
        if 0 < len(t) <= 4:
            try:
                text = t.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(text) == 1:
                out.add(text)
    return sorted(out)


def _vocab_chars(table: TokenTable) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """The vocabulary's distinct characters; per character position j, (ids of the tokens longer
    than j, index of their j-th character); and a bool [V] of the tokens that are whole UTF-8 text
    (byte pieces and empty tokens are never walked). About a second at 262k tokens, once per table."""
    chars: dict[str, int] = {}
    ids: list[list[int]] = []
    at: list[list[int]] = []
    whole = np.zeros(table.size, dtype=bool)
    for i, t in enumerate(table.tokens):
        try:
            text = t.decode("utf-8")
        except UnicodeDecodeError:
            continue
        whole[i] = bool(text)
        for j, c in enumerate(text):
            if j == len(ids):
                ids.append([])
                at.append([])
            ids[j].append(i)
            at[j].append(chars.setdefault(c, len(chars)))
    cols = [(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)) for a, b in zip(ids, at)]
    return list(chars), cols, whole


class RegexPlan:
    """A regex's DFA with per-state finishing costs, and the tokens that keep a row finishable."""

    def __init__(self, regex: str, table: TokenTable) -> None:
        """Raises TooBig, or interegular's own errors, when the regex has no DFA here."""
        import interegular
        from interegular.fsm import anything_else

        with _bounded_dfa(MAX_MOVES):
            fsm = interegular.parse_pattern(regex).to_fsm()
        self.alphabet, self.other = fsm.alphabet, anything_else
        states = sorted(fsm.states)
        index = {s: k for k, s in enumerate(states)}
        self.dead = len(states)
        n_cls = max(fsm.alphabet.by_transition) + 2  # the last class: characters the regex never takes
        self.no_class = n_cls - 1
        self.trans = np.full((self.dead + 1, n_cls), self.dead, dtype=np.int64)
        for s, moves in fsm.map.items():
            for c, t in moves.items():
                self.trans[index[s], c] = index[t]
        self.initial = index[fsm.initial]
        self.table = table
        self.eos = table.eos.numpy()
        self.size = table.size
        self._walk: tuple | None = None  # (columns, class per character, whole-text tokens): built when first needed
        # cost to finish, one single-character token per step, by reverse breadth-first search
        usable = np.zeros(n_cls, dtype=bool)
        for c in table.memo("regexplan-single", lambda: _single_chars(table)):
            usable[self.klass(c)] = True
        usable[self.no_class] = False
        self.dist = np.full(self.dead + 1, INF, dtype=np.int64)
        queue = deque(index[f] for f in fsm.finals)
        for f in queue:
            self.dist[f] = 0
        back: list[list[int]] = [[] for _ in range(self.dead + 1)]
        for s in range(self.dead):
            for c in np.flatnonzero(usable):
                t = self.trans[s, c]
                if t != self.dead:
                    back[t].append(s)
        while queue:
            t = queue.popleft()
            for s in back[t]:
                if self.dist[s] == INF:
                    self.dist[s] = self.dist[t] + 1
                    queue.append(s)
        self.longest = _longest(self.dist)
        self.exact = False
        self._after: dict[int, np.ndarray] = {}

    def _exact_costs(self) -> None:
        """Replace the per-character costs by exact per-token ones (small DFAs; done once, lazily:
        only requests that reach the end of their budget pay for it)."""
        self.exact = True
        if self.dead > EXACT_STATES:
            return
        walkable = self.walk()[2]
        after = [self.after(s)[walkable] for s in range(self.dead)]
        dist = np.where(self.dist == 0, 0, INF)
        while True:  # Bellman-Ford over tokens: at most one round per state
            new = dist.copy()
            for s in range(self.dead):
                new[s] = min(new[s], 1 + int(dist[after[s]].min())) if after[s].size else new[s]
            if np.array_equal(new, dist):
                break
            dist = new
        self.dist = np.minimum(dist, self.dist)
        self.longest = _longest(self.dist)

    def klass(self, c: str) -> int:
        """The DFA's character class of ``c`` (``no_class`` when the regex never takes it)."""
        try:
            k = self.alphabet[c]
        except KeyError:
            k = None
        if k is None and self.other in self.alphabet:
            k = self.alphabet[self.other]
        return self.no_class if k is None else int(k)

    def step(self, state: int, text: str) -> int:
        """The state after ``text`` (``dead`` once the DFA cannot follow it)."""
        for c in text:
            state = int(self.trans[state, self.klass(c)])
        return state

    def walk(self) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
        """The vocabulary as DFA input: columns of (token ids, character index), the DFA class of
        each character, and which tokens are whole text."""
        if self._walk is None:
            chars, cols, whole = self.table.memo("regexplan-chars", lambda: _vocab_chars(self.table))
            self._walk = cols, np.array([self.klass(c) for c in chars], dtype=np.int64), whole
        return self._walk

    def after(self, state: int) -> np.ndarray:
        """[V] the state each token leads to from ``state`` (meaningful for whole-text tokens only;
        kept for the states seen)."""
        out = self._after.get(state)
        if out is None:
            cols, cls, _ = self.walk()
            out = np.full(self.size, state, dtype=np.int64)
            for ids, chars in cols:
                out[ids] = self.trans[out[ids], cls[chars]]
            if len(self._after) >= 256:
                self._after.clear()
            self._after[state] = out
        return out

    def allowed(self, state: int, steps_left: int) -> torch.Tensor | None:
        """Bool [V] of the tokens after which the match can still finish within ``steps_left - 1``
        more tokens; None when there is room for anything, or when finishing is already out of
        reach (then no choice can help and llguidance alone decides)."""
        if steps_left - 1 >= self.longest:
            return None
        if not self.exact:
            self._exact_costs()
            if steps_left - 1 >= self.longest:
                return None
        if self.dist[state] > steps_left:
            return None
        ok = (self.dist[self.after(state)] <= steps_left - 1) & self.walk()[2]
        return torch.from_numpy(ok | self.eos)


def _longest(dist: np.ndarray) -> int:
    """The largest finite cost: with more steps left than this, any token leaves room to finish."""
    finite = dist[dist < INF]
    return int(finite.max()) if finite.size else 0


class RowPlans:
    """Each row's DFA state, fed the text of every token the row takes."""

    def __init__(self, plan: RegexPlan, rows: int) -> None:
        self.plan = plan
        self.state = [plan.initial] * rows
        self.decoders = [codecs.getincrementaldecoder("utf-8")() for _ in range(rows)]
        self.partial = [False] * rows

    def feed(self, b: int, data: bytes) -> None:
        if self.state[b] == self.plan.dead:
            return
        text = self.decoders[b].decode(data)
        self.partial[b] = bool(self.decoders[b].getstate()[0])
        self.state[b] = self.plan.step(self.state[b], text)

    def planned(self, b: int) -> bool:
        """Whether row b's text is still followed by the DFA (so its plan may narrow the mask)."""
        return self.state[b] != self.plan.dead

    def allowed(self, b: int, steps_left: int) -> torch.Tensor | None:
        """Row b's narrowing of the grammar mask, or None (no need, mid-character, or unplanned)."""
        if self.partial[b] or self.state[b] == self.plan.dead:
            return None
        return self.plan.allowed(self.state[b], steps_left)

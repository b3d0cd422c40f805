"""Budget planning for ``--regex`` and ``--json-schema``: keep room to finish within ``--max-tokens``.

llguidance says which tokens a regex allows next, not how many tokens the match still needs, so a
small budget could end the text half-matched. Here the regex's DFA (built by interegular; a JSON
Schema becomes a regex through outlines-core) gives every state a cost: the fewest tokens that
reach a full match. For small DFAs it is exact over the vocabulary's whole-text tokens (walked
from every state, one token per group of tokens with the same DFA classes); for big ones it is an
upper bound: one single-character token per character, or a run of fixed text in the tokens the
tokenizer spells it with. While the budget is tight, a token is allowed only if the state it leads
to can still finish in the steps left. Regexes interegular cannot read, and texts its DFA
disagrees with, are left unplanned (llguidance alone decides, as before), so planning can only
ever narrow llguidance's mask, never widen it.
"""

from __future__ import annotations

import codecs
import heapq
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from tokensteer.constraints.vocab import TokenTable

INF = 1 << 20
#: at most this many DFA transitions are explored: some regexes (``(a|b)*a(a|b){20}``) have
#: exponentially many states, which llguidance never builds but a DFA would; those go unplanned
MAX_MOVES = 5000
#: DFAs with at most this many states get exact token costs (each state walks every group of tokens
#: once, about a millisecond); bigger ones keep the upper bound
EXACT_STATES = 256
EXACT_WORK = 2_000_000  # states × token groups: the most an exact walk may take before decoding
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


def schema_regex(schema) -> str | None:
    """A regex for the compact JSON a schema allows (outlines-core builds it), so a JSON Schema can
    plan too; None when outlines-core cannot express the schema. Its language need not equal
    llguidance's exactly: the plan only narrows llguidance's mask and steps aside on disagreement."""
    import json

    try:
        from outlines_core.json_schema import build_regex_from_schema

        return build_regex_from_schema(json.dumps(schema), "")
    except Exception:  # unsupported keywords, or outlines-core missing: llguidance alone decides
        return None


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

    def __init__(self, regex: str, table: TokenTable, encode: Callable[[str], list[int]] | None = None) -> None:
        """Raises TooBig, or interegular's own errors, when the regex has no DFA here. ``encode``
        (the tokenizer's, without BOS) prices the runs of characters the regex fixes."""
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
        self._walk: tuple | None = None  # the vocabulary grouped for walking (see ``walk``), built when first needed
        # cost to finish: one single-character token per character, or a run of characters the
        # regex fixes (``","year":``) in as many tokens as the tokenizer writes it with (Dijkstra)
        usable = np.zeros(n_cls, dtype=bool)
        for c in table.memo("regexplan-single", lambda: _single_chars(table)):
            usable[self.klass(c)] = True
        usable[self.no_class] = False
        finals = {index[f] for f in fsm.finals}
        back: list[list[tuple[int, int]]] = [[] for _ in range(self.dead + 1)]
        for s in range(self.dead):
            for c in np.flatnonzero(usable):
                t = int(self.trans[s, c])
                if t != self.dead:
                    back[t].append((s, 1))
        if encode is not None:
            for s, t, k in self._fixed_runs(finals, encode):
                back[t].append((s, k))
        self.dist = np.full(self.dead + 1, INF, dtype=np.int64)
        heap = [(0, f) for f in finals]
        while heap:
            d, t = heapq.heappop(heap)
            if d >= self.dist[t]:
                continue
            self.dist[t] = d
            for s, k in back[t]:
                if d + k < self.dist[s]:
                    heapq.heappush(heap, (d + k, s))
        self.longest = _longest(self.dist)
        self.exact = False
        self._after: dict[int, np.ndarray] = {}

    def _fixed_runs(self, finals: set[int], encode: Callable[[str], list[int]]) -> list[tuple[int, int, int]]:
        """(start, end, tokens) for every run of characters the regex fixes: states with one way
        on, through a class of one character, up to the first state with a choice (or a final one)."""
        only: dict[int, tuple[str, int]] = {}  # state -> (its one character, next state)
        for s in range(self.dead):
            if s in finals:
                continue
            moves = [c for c in range(self.no_class) if self.trans[s, c] != self.dead]
            if len(moves) == 1:
                symbols = self.alphabet.by_transition.get(moves[0], [])
                if len(symbols) == 1 and isinstance(symbols[0], str):
                    only[s] = (symbols[0], int(self.trans[s, moves[0]]))
        runs = []
        for s in only:
            text, t = "", s
            while t in only and len(text) < 256:
                c, t = only[t]
                text += c
            if len(text) > 1:
                ids = encode(text)
                if b"".join(self.table.tokens[i] for i in ids if 0 <= i < self.size) == text.encode("utf-8"):
                    runs.append((s, t, len(ids)))
        return runs

    def _exact_costs(self) -> None:
        """Replace the upper-bound costs by exact per-token ones (at most EXACT_STATES states and
        EXACT_WORK walking; done once, lazily: only requests that reach the end of their budget pay)."""
        self.exact = True
        if self.dead > EXACT_STATES:
            return
        _, _, walkable, _ = self.walk()
        if self.dead * len(walkable) > EXACT_WORK:
            return
        moves = np.stack([self.after(s)[walkable] for s in range(self.dead)])  # [S, walkable groups]
        if moves.shape[1] == 0:
            return
        dist = self.dist.copy()
        while True:  # Bellman-Ford over tokens, all states at once: at most one round per state
            new = dist.copy()
            new[: self.dead] = np.minimum(dist[: self.dead], 1 + dist[moves].min(axis=1))
            if np.array_equal(new, dist):
                break
            dist = new
        self.dist = dist
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

    def walk(self) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray, np.ndarray]:
        """The vocabulary as DFA input, grouped: tokens with the same sequence of DFA classes reach
        the same state from any state (inside a JSON string most tokens do), so one of each group
        is walked. Returns columns of (group, class) to walk, each token's group, which groups are
        whole text, and which tokens are."""
        if self._walk is None:
            chars, cols, whole = self.table.memo("regexplan-chars", lambda: _vocab_chars(self.table))
            cls = np.array([self.klass(c) for c in chars], dtype=np.int64)
            h1 = np.zeros(self.size, dtype=np.uint64)
            h2 = np.zeros(self.size, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for ids, ch in cols:  # two rolling hashes of each token's class sequence
                    k = cls[ch].astype(np.uint64) + np.uint64(1)
                    h1[ids] = h1[ids] * np.uint64(1_000_003) + k
                    h2[ids] = h2[ids] * np.uint64(998_244_353) + k
            keys, first, group = np.unique(np.stack([h1, h2], 1), axis=0, return_index=True, return_inverse=True)
            slot = np.full(self.size, -1, dtype=np.int64)
            slot[first] = np.arange(len(first))
            gcols = []
            for ids, ch in cols:
                keep = slot[ids] >= 0
                if keep.any():
                    gcols.append((slot[ids[keep]], cls[ch[keep]]))
            self._walk = gcols, group.reshape(-1), whole[first] & (keys != 0).any(1), whole
        return self._walk

    def after(self, state: int) -> np.ndarray:
        """Per token group (see ``walk``), the state it leads to from ``state``; kept for the states seen."""
        out = self._after.get(state)
        if out is None:
            cols, group, _, _ = self.walk()
            out = np.full(int(group.max()) + 1, state, dtype=np.int32)
            for idx, c in cols:
                out[idx] = self.trans[out[idx], c]
            if len(self._after) >= 128:
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
        _, group, walkable, whole = self.walk()
        ok = ((self.dist[self.after(state)] <= steps_left - 1) & walkable)[group]
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

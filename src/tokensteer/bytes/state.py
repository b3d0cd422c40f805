"""Exact next-byte probabilities of a tokenized model, kept up to date one byte at a time.

By the Byte-Token Representation Lemma (Phan et al., ICLR 2025) the probability of a byte prefix x
is the sum over its *covers*: canonical token sequences whose last token reaches past the end of x
while the tokens before it end inside x. Every cover is "canonical encoding of x[:j]" plus one token
that starts at byte j, so one **node** per byte position j (the model's next-token distribution
after the canonical encoding of x[:j], and that sequence's probability) holds all covers from j:
the tokens whose bytes start with x[j:]. The next-byte distribution sums them by their next byte
(plus end of text, after the node at the end of x).

Costs stay constant per byte: the tokens before a *fixed boundary* (a position no token can
straddle, found from the vocabulary) never change, so nodes start there; each new byte adds one
node, computed with one forward pass of the changed tokens on the session's KV cache (``trim``
back to the common prefix, ``extend`` the rest). Probabilities are those of the model restricted
to canonical sequences: at each node the likeliest tokens (``ByteOptions``) are checked and the
non-canonical ones removed, then renormalised.

A tokenizer that writes a dummy prefix space before every text (Llama 2's SentencePiece) spells
" " + text: the state runs on that, with the space given (``hidden``). The first token must start
with it, no fixed boundary falls inside or right after it, and the empty text ends with the
start row's end-of-text probability (its encoding is no tokens, not "▁").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokensteer.backends.base import Backend
from tokensteer.bytes.canon import Checker
from tokensteer.bytes.covers import next_logprobs
from tokensteer.bytes.utf8 import tail_state
from tokensteer.bytes.vocab import byte_vocab
from tokensteer.errors import UserError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class ByteOptions:
    """How many next tokens each node checks for canonicality: every allowed token when the
    vocabulary has at most ``check_all_below`` of them (exact), else the likeliest ones until they
    hold ``check_mass`` of the probability, at most ``check_max`` (the rest count as canonical)."""

    check_mass: float = 0.9999
    check_max: int = 256
    check_all_below: int = 4096


@dataclass
class Node:
    """The canonical encoding of the text up to ``pos`` (``tokens``, relative to the fixed
    boundary), its log-probability ``logmass`` relative to the boundary, and ``logq``, the
    log-probabilities of the next token restricted to canonical continuations. Tokens [lo, hi) of
    the sorted vocabulary still start with the text after ``pos`` (its live covers)."""

    tokens: tuple[int, ...]
    pos: int
    logmass: float
    logq: torch.Tensor
    lo: int = 0
    hi: int = 0
    checked: frozenset[int] | None = None  # ids checked for canonicality (None: all of them)


class ByteState:
    """One text and its model's next-byte distribution; ``push`` appends a byte, ``logprobs``
    gives the 257 next symbols (bytes, then END). Owns a session of ``lm`` (``close`` frees it)."""

    def __init__(self, lm: Backend, prompt: bytes | str = b"", options: ByteOptions | None = None) -> None:
        data = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
        self.lm, self.opt = lm, options or ByteOptions()
        self.v = byte_vocab(lm)
        self.check = Checker(self.v)
        self.forwards = 0  # forward passes run (prefill and each extend)
        self.dropped = 0  # covers left out where several canonical-looking sequences end inside one character
        self.session = lm.session(rollback=True)
        try:
            self._start(data)
        except BaseException:
            self.session.close()
            raise

    def _start(self, data: bytes) -> None:
        """Prefill the prompt up to its last fixed boundary, then feed the rest byte by byte."""
        self.hidden = len(self.v.prefix)  # bytes the tokenizer writes before the text, never predicted
        data = self.v.prefix + data
        p = self._initial_boundary(data)
        self.text = bytearray(data[:p])
        self.p = p
        self.safe: set[int] = set()  # positions known to be fixed boundaries
        committed = self.v.encode([data[:p].decode("utf-8")])[0] if p else []
        self._committed = len(committed)  # tokens before the boundary
        self._check_length(len(self.v.start) + len(committed))
        logits = self.session.prefill([self.v.start + committed])
        self.forwards += 1
        self.row: tuple[int, ...] = ()
        self.nodes: dict[tuple[int, ...], Node] = {}
        self.at: dict[int, Node] = {}  # the node made when the text reached each position (boundary candidates)
        self.step: Node | None = self._make((), p, 0.0, logits[0], live=True)
        self._cache: torch.Tensor | None = None
        for b in data[p:]:
            self.push(b)

    # public -------------------------------------------------------------------------------
    def logprobs(self) -> torch.Tensor:
        """[257] float64 log-probabilities of the next byte (0–255) and of END (index 256)."""
        if self._cache is None:
            end = self.nodes[()] if len(self.text) == self.hidden > 0 else self.step  # the empty text: no tokens, then the end
            self._cache = next_logprobs(self.v, self.nodes.values(), bytes(self.text), end, self._complete(len(self.text)))
        return self._cache

    def push(self, byte: int) -> None:
        """Append one byte to the text."""
        if not 0 <= byte < 256:
            raise ValueError(f"a byte is 0–255, got {byte}")
        self.text.append(byte)
        L = len(self.text)
        self._cache = None
        if not self.v.spans_boundary(self.text, L - 1) and L - 1 > max(self.p, self.hidden):
            self.safe.add(L - 1)
        for n in self.nodes.values():
            if n.lo < n.hi:
                n.lo, n.hi = self.v.span(bytes(self.text[n.pos :]), n.lo, n.hi) if L - n.pos <= self.v.maxlen else (0, 0)
        self.step = self._step_node(L)
        if self.step is not None:
            self.at[L] = self.step
        # keep nodes with live covers, the boundary candidates, and the recent nodes along the KV
        # cache's tokens (the next encoding usually changes only its last tokens)
        recent = L - 2 * self.v.maxlen
        keep = {()} | {self.row[:k] for k in range(1, len(self.row) + 1) if self.row[:k] in self.nodes and self.nodes[self.row[:k]].pos >= recent}
        keep |= {self.at[q].tokens for q in self.safe if q in self.at}
        self.nodes = {t: n for t, n in self.nodes.items() if n.lo < n.hi or t in keep or n is self.step}
        self.at = {q: n for q, n in self.at.items() if q in self.safe or q == L}
        self._move_boundary()

    def close(self) -> None:
        self.session.close()

    # nodes --------------------------------------------------------------------------------
    def _complete(self, pos: int) -> bool:
        """Whether the text up to ``pos`` ends on a character boundary (the boundary p always does)."""
        return tail_state(bytes(self.text[self.p : pos])) == 0

    def _step_node(self, L: int) -> Node | None:
        """The node at the end of the text: its canonical encoding on a character boundary; inside
        a character, the likeliest canonical-looking cover that ends exactly there (if any)."""
        if self._complete(L):
            return self._ensure(tuple(self.v.encode([self.text[self.p :].decode("utf-8")])[0]))
        found: list[tuple[float, tuple[int, ...]]] = []
        for n in list(self.nodes.values()):
            d = L - n.pos
            k = n.lo
            while k < n.hi and int(self.v.lens[k]) == d:
                t = int(self.v.order[k])
                lq = float(n.logq[t])
                if lq > NEG_INF and (n.checked is None or t in n.checked or self.check.valid(bytes(self.text[self.p : n.pos]), n.tokens, [t])[0]):
                    found.append((n.logmass + lq, n.tokens + (t,)))
                k += 1
        if not found:
            return None
        found.sort(reverse=True)
        self.dropped += len(found) - 1
        return self._ensure(found[0][1])

    def _ensure(self, toks: tuple[int, ...]) -> Node:
        """The node of ``toks`` as the live node at its position, computing it (and any missing
        node before it) with one forward pass from the longest prefix the KV cache shares."""
        k = len(toks)
        while toks[:k] not in self.nodes:
            k -= 1
        if k == len(toks):
            node = self.nodes[toks]
            if node.lo == node.hi:
                node.lo, node.hi = self.v.span(bytes(self.text[node.pos :]))
            return node
        c = 0
        while c < min(len(self.row), len(toks)) and self.row[c] == toks[c]:
            c += 1
        s = min(c, k)
        self.session.trim(len(self.row) - s)
        self._check_length(len(self.v.start) + self._committed + len(toks))
        logits = self.session.extend(torch.tensor([toks[s:]], dtype=torch.long))[0]
        self.forwards += 1
        self.row = toks
        node = self.nodes[toks[:k]]
        for i in range(k, len(toks)):
            t = toks[i]
            mass = node.logmass + float(node.logq[t])
            node = self._make(toks[: i + 1], node.pos + len(self.v.table[t]), mass, logits[i - s], live=i == len(toks) - 1)
        return node

    def _make(self, toks: tuple[int, ...], pos: int, logmass: float, logits: torch.Tensor, live: bool) -> Node:
        """A node from the model's logits after ``toks``: non-canonical next tokens removed."""
        lp = torch.log_softmax(logits.float(), -1)
        banned = self.v.banned if self._complete(pos) else self.v.banned_all
        if self.hidden and pos == 0:
            banned = self.v.banned_first  # the first token starts with the dummy prefix
        elif self.hidden and pos == self.hidden:
            banned = self.v.banned_all  # the prefix alone is not a text: the empty one has no tokens
        removed = torch.exp(lp[banned].double()).sum()  # normalised, so what is left is 1 - removed
        lp[banned] = NEG_INF
        n_allowed = len(self.v.sorted)
        if n_allowed <= self.opt.check_all_below:
            cands, checked = self.v.order.tolist(), None
        else:
            top, idx = torch.topk(lp, min(self.opt.check_max, n_allowed))
            cum = (torch.exp(top.double()) / (1 - removed)).cumsum(0)
            n = int((cum < self.opt.check_mass).sum()) + 1
            cands = [t for t in idx[:n].tolist() if self.v.allowed[t]]
            checked = frozenset(cands)
        ok = self.check.valid(bytes(self.text[self.p : pos]), toks, cands)
        bad = [t for t, good in zip(cands, ok) if not good]
        if bad:
            removed = removed + torch.exp(lp[bad].double()).sum()
            lp[bad] = NEG_INF
        left = 1 - float(removed)
        logq = lp - (math.log(left) if left > 1e-3 else float(torch.logsumexp(lp, -1)))  # exact sum when little is left
        node = Node(toks, pos, logmass, logq, checked=checked)
        if live:
            node.lo, node.hi = self.v.span(bytes(self.text[pos:]))
        self.nodes[toks] = node
        return node

    # fixed boundaries ---------------------------------------------------------------------
    def _initial_boundary(self, data: bytes) -> int:
        """The last position of the prompt no token can straddle, on a character boundary; the
        text after it is fed byte by byte."""
        for q in range(len(data) - 1, self.hidden, -1):
            if tail_state(data[:q]) == 0 and not self.v.spans_boundary(data, q):
                return q
        return 0

    def _move_boundary(self) -> None:
        """Fix the tokens before the last safe position that has a node, once the text since the
        boundary is whole characters and re-encodes to the same tokens split there."""
        L = len(self.text)
        step = self.step
        cands = sorted((q for q in self.safe if q > self.p), reverse=True)
        if not cands or step is None or not self._complete(L):
            return
        for q in cands:
            nq = self.at.get(q)
            if nq is None or self.nodes.get(nq.tokens) is not nq or not self._complete(q):
                continue
            k = len(nq.tokens)
            moved = [n for n in self.nodes.values() if n.pos >= q]
            if any(n.tokens[:k] != nq.tokens for n in moved) or self.row[:k] != nq.tokens:
                continue
            if tuple(self.v.encode([self.text[q:].decode("utf-8")])[0]) != step.tokens[k:]:
                continue
            base = nq.logmass
            self.nodes = {}
            for n in moved:
                n.tokens, n.logmass = n.tokens[k:], n.logmass - base
                self.nodes[n.tokens] = n
            self.row = self.row[k:]
            self._committed += k
            self.p = q
            self.safe = {s for s in self.safe if s > q}
            return

    def _check_length(self, n: int) -> None:
        limit = self.lm.context_length
        if limit and n > limit:
            raise UserError(f"the text needs {n} positions, more than {self.lm.model_name}'s context of {limit}")


def score(lm: Backend, text: bytes | str, prompt: bytes | str = b"", options: ByteOptions | None = None) -> tuple[list[float], float]:
    """Log-probabilities of each byte of ``text`` after ``prompt``, and of END after it."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    st = ByteState(lm, prompt, options)
    try:
        out = []
        for b in data:
            out.append(float(st.logprobs()[b]))
            st.push(b)
        return out, float(st.logprobs()[256])
    finally:
        st.close()


def total(values: list[float]) -> float:
    """Sum of log-probabilities (−inf stays −inf)."""
    return math.fsum(values) if all(v > NEG_INF for v in values) else NEG_INF

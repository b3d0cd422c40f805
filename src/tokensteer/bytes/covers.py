"""The cover sum: each node's next-token probabilities, grouped by the byte their tokens add next.

A node at position j contributes P(node) · P(t | node) for every live token t (its bytes start
with the text after j and go on past the end of the text), to the byte of t at offset L − j. The
node at the end of the text also gives END its probability of an end-of-text token.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Iterable

import torch

from tokensteer.bytes.utf8 import END, N_SYMBOLS
from tokensteer.bytes.vocab import ByteVocab

if TYPE_CHECKING:
    from tokensteer.bytes.state import Node

def by_next_byte(v: ByteVocab, n: "Node", text: bytes) -> tuple[float, torch.Tensor] | None:
    """Node ``n``'s live covers summed by their next byte: (log scale, [256] float64 sums), or None."""
    d = len(text) - n.pos
    if n.lo >= n.hi or d >= v.maxlen:
        return None
    if d == 0 and n.lo == 0 and n.hi == len(v.sorted):  # the node at the end: every token, by first byte
        top = float(n.logq.max())
        if top == float("-inf"):
            return None
        sums = torch.zeros(257).scatter_add_(0, v.first_of_id, torch.exp(n.logq - top))[:END]
        return top + n.logmass, sums.double()
    lo = bisect.bisect_right(v.sorted, text[n.pos :], n.lo, n.hi)  # skip tokens that end exactly here
    if lo >= n.hi:
        return None
    w = n.logq[v.order[lo : n.hi]]
    top = float(w.max())
    if top == float("-inf"):
        return None
    sums = torch.zeros(256).scatter_add_(0, v.cols[d, lo : n.hi].long(), torch.exp(w - top))
    return top + n.logmass, sums.double()


def next_logprobs(v: ByteVocab, nodes: Iterable["Node"], text: bytes, step: "Node | None", complete: bool) -> torch.Tensor:
    """[257] float64 log-probabilities of the next symbol after ``text``."""
    parts = [p for p in (by_next_byte(v, n, text) for n in nodes) if p is not None]
    end = None
    if step is not None and complete and v.eos:
        end = float(torch.logsumexp(step.logq[v.eos].double(), 0)) + step.logmass
    scales = [s for s, _ in parts] + ([end] if end is not None else [])
    ref = max(scales, default=float("-inf"))
    acc = torch.zeros(N_SYMBOLS, dtype=torch.float64)
    if ref == float("-inf"):
        return acc.fill_(float("-inf"))
    for s, sums in parts:
        acc[:END] += sums * torch.exp(torch.tensor(s - ref, dtype=torch.float64))
    if end is not None:
        acc[END] = torch.exp(torch.tensor(end - ref, dtype=torch.float64))
    return torch.log(acc) - torch.log(acc.sum())

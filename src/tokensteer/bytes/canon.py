"""Which next tokens keep a token sequence canonical (what the tokenizer itself would produce).

A model can put probability on token sequences its tokenizer never produces ("c"+"at" where the
tokenizer writes "cat"); byte-level probabilities count only canonical ones. Only the text since
the last fixed boundary matters (the tokens before it never change), so a candidate is checked by
encoding that short window plus the candidate's bytes. A window that ends inside a character is
checked against the characters that could complete it: the sequence is kept when one of them
gives an encoding that starts with it.
"""

from __future__ import annotations

from typing import Sequence

from tokensteer.bytes.utf8 import completions, tail_state
from tokensteer.bytes.vocab import ByteVocab

#: characters tried, in code-point order, when a window ends inside one
PROBE_LIMIT = 4096
PROBE_CHUNK = 64


class Checker:
    """Canonicality checks of candidate tokens after a node (see the module docstring)."""

    def __init__(self, vocab: ByteVocab, probe_limit: int = PROBE_LIMIT) -> None:
        self.v = vocab
        self.probe_limit = probe_limit
        self.encodes = 0  # texts encoded so far (a cost figure)

    def valid(self, window: bytes, rel: Sequence[int], cands: Sequence[int]) -> list[bool]:
        """For each candidate t: is ``rel + [t]`` the canonical encoding of ``window`` + bytes(t)
        (or, when that ends inside a character, a prefix of one for some completion)?"""
        out = [False] * len(cands)
        texts, where = [], []
        # pure BPE: a token that alone is canonical and cannot merge with the window's end keeps
        # the sequence canonical (merges on each side run as they would alone)
        follow = self.v.follow_bytes(window) if self.v.pure and tail_state(window) == 0 else None
        for k, t in enumerate(cands):
            tb = self.v.table[t]
            if follow is not None and tb[0] not in follow and self.v.self_canonical(t):
                out[k] = True
                continue
            beta = window + tb
            state = tail_state(beta)
            if state is None:
                continue  # never valid UTF-8, whatever follows
            if state == 0:
                texts.append(beta.decode("utf-8"))
                where.append(k)
            else:
                out[k] = self.probe(beta, state, [*rel, t])
        if texts:
            self.encodes += len(texts)
            want = list(rel)
            n = len(want)
            for k, ids in zip(where, self.v.encode(texts)):
                out[k] = len(ids) == n + 1 and ids[-1] == cands[k] and ids[:n] == want
        return out

    def probe(self, beta: bytes, partial: int, seq: list[int]) -> bool:
        """Whether ``seq`` (spelling ``beta``, whose last ``partial`` bytes start a character)
        begins the canonical encoding of ``beta``'s complete part plus some completing character."""
        head = beta[: len(beta) - partial].decode("utf-8")
        chars = completions(beta[len(beta) - partial :], self.probe_limit)
        n = len(seq)
        for i in range(0, len(chars), PROBE_CHUNK):
            chunk = [head + c for c in chars[i : i + PROBE_CHUNK]]
            self.encodes += len(chunk)
            if any(ids[:n] == seq for ids in self.v.encode(chunk)):
                return True
        return False

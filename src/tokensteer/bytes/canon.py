"""Which next tokens keep a token sequence canonical (what the tokenizer itself would produce).

A model can put probability on token sequences its tokenizer never produces ("c"+"at" where the
tokenizer writes "cat"); byte-level probabilities count only canonical ones. Only the text since
the last fixed boundary matters (the tokens before it never change), so a candidate is checked by
encoding that short window plus the candidate's bytes. A window that ends inside a character is
checked against the characters that could complete it: the sequence is kept when one of them
gives an encoding that starts with it.

For BPE over the whole text (no pre-tokenizer) canonicality is a property of adjacent pairs: the
first merge that would cross a token boundary in a sequence would already cross it in the pair
alone. There a candidate that cannot merge with the window's end is canonical at once, and the
others are checked as a pair with the last token, cached across nodes.
"""

from __future__ import annotations

from typing import Sequence

from tokensteer.bytes.utf8 import completions, tail_state
from tokensteer.bytes.vocab import ByteVocab

#: characters tried, in code-point order, when a window ends inside one
PROBE_LIMIT = 4096
PROBE_CHUNKS = (1, 7, 56)  # completions encoded per try, then 64 at a time
PAIR_CACHE = 1 << 20  # pairs remembered before the cache starts over


class Checker:
    """Canonicality checks of candidate tokens after a node (see the module docstring)."""

    def __init__(self, vocab: ByteVocab, probe_limit: int = PROBE_LIMIT) -> None:
        self.v = vocab
        self.probe_limit = probe_limit
        self.encodes = 0  # texts encoded so far (a cost figure)
        self.pairs = vocab.pairs  # shared by every state of this tokenizer

    def valid(self, window: bytes, rel: Sequence[int], cands: Sequence[int]) -> list[bool]:
        """For each candidate t: is ``rel + [t]`` the canonical encoding of ``window`` + bytes(t)
        (or, when that ends inside a character, a prefix of one for some completion)?"""
        out = [False] * len(cands)
        texts, queued = [], []  # (index, sequence, pair key) of the texts to encode
        follow = self.v.follow_bytes(window) if self.v.pure and tail_state(window) == 0 else None
        last = rel[-1] if follow is not None and rel and tail_state(self.v.table[rel[-1]]) == 0 else None  # a whole-character token
        if len(self.pairs) > PAIR_CACHE:
            self.pairs.clear()
        for k, t in enumerate(cands):
            tb = self.v.table[t]
            if follow is not None and tb[0] not in follow and self.v.self_canonical(t):
                out[k] = True  # cannot merge with the window's end
                continue
            key = (last, t) if last is not None else None
            if key is not None:
                if key in self.pairs:
                    out[k] = self.pairs[key]
                    continue
                beta, seq = self.v.table[last] + tb, [last, t]
            else:
                beta, seq = window + tb, [*rel, t]
            state = tail_state(beta)
            if state == 0:
                texts.append(beta.decode("utf-8"))
                queued.append((k, seq, key))
                continue
            out[k] = state is not None and self.probe(beta, state, seq)  # None: never valid UTF-8
            if key is not None:
                self.pairs[key] = out[k]
        if texts:
            self.encodes += len(texts)
            for (k, seq, key), ids in zip(queued, self.v.encode(texts)):
                out[k] = ids == seq
                if key is not None:
                    self.pairs[key] = out[k]
        return out

    def probe(self, beta: bytes, partial: int, seq: list[int]) -> bool:
        """Whether ``seq`` (spelling ``beta``, whose last ``partial`` bytes start a character)
        begins the canonical encoding of ``beta``'s complete part plus some completing character."""
        head = beta[: len(beta) - partial].decode("utf-8")
        chars = completions(beta[len(beta) - partial :], self.probe_limit)
        n = len(seq)
        i = 0
        for size in (*PROBE_CHUNKS, *[64] * (len(chars) // 64 + 1)):
            chunk = [head + c for c in chars[i : i + size]]
            if not chunk:
                return False
            i += size
            self.encodes += len(chunk)
            if any(ids[:n] == seq for ids in self.v.encode(chunk)):
                return True
        return False

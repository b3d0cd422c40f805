"""Log-likelihood of given continuations: each text one prefill (teacher forcing) in a fresh cache.

Scoring needs the logits at every continuation position but no sampling, so each text is decoded
as one prompt instead of one decode step per token. Each text has its call to itself: llama.cpp's
attention rounds differently once a call holds more tokens, so texts packed side by side would get
scores that depend on their neighbours (and bigger calls are no faster here). Where our output
kernel runs (``Q8Head``), the graph stops at the final norm and the kernel computes the scored
rows' logits, as it does for every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import llama_cpp
import numpy as np
import torch

from tokensteer.errors import UserError

if TYPE_CHECKING:
    from tokensteer.backends.llamacpp.backend import LlamaCppBackend
    from tokensteer.backends.llamacpp.context import Context
    from tokensteer.backends.llamacpp.q8head import Q8Head

MAX_OUTPUTS = 64  # logit rows per call: bounds llama.cpp's output buffer (rows x vocabulary floats)


class _Packer:
    """Fills a context's batch with (token, position, sequence, owner of the output) and decodes it
    when full (or flushed), adding each output row's negative log-likelihood to its owner."""

    def __init__(self, c: Context, n_vocab: int, nll: list[float], head: Q8Head | None) -> None:
        self.c, self.n_vocab, self.nll, self.head = c, n_vocab, nll, head
        self.n, self.owners, self.targets = 0, [], []

    def add(self, token: int, pos: int, seq: int, owner: int | None, target: int | None) -> None:
        b = self.c.batch
        b.token[self.n], b.pos[self.n], b.seq[self.n] = token, pos, seq
        b.logits[self.n] = owner is not None
        self.n += 1
        if owner is not None:
            self.owners.append(owner)
            self.targets.append(target)
        if self.n == self.c.n_batch or len(self.owners) == MAX_OUTPUTS:
            self.flush()

    def flush(self) -> None:
        if not self.n:
            return
        c = self.c
        c.batch.c.n_tokens = self.n
        capture = self.head is not None and bool(self.owners)
        if capture:
            c.capture.arm()
        try:
            rc = llama_cpp.llama_decode(c.ptr, c.batch.c)
        finally:
            if capture:
                c.capture.disarm()
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        if self.owners:
            x = torch.from_numpy(self._logits())
            picked = torch.log_softmax(x, dim=-1).gather(1, torch.tensor(self.targets)[:, None]).squeeze(1)
            for owner, v in zip(self.owners, picked.tolist()):
                self.nll[owner] -= v
        self.n, self.owners, self.targets = 0, [], []

    def _logits(self) -> np.ndarray:
        """[outputs, V] logits of this call's scored rows: our kernel on the captured final norms, or llama.cpp's."""
        n = len(self.owners)
        if self.head is None:
            return self.c.logits(n, self.n_vocab)
        h = self.c.capture.h
        if h is None or h.size != n * self.head.width:
            raise RuntimeError("llama.cpp did not stop at the final norm of this model")
        return self.head.logits(h.reshape(n, -1))


def continuation_nll(b: LlamaCppBackend, ctx: Sequence[Sequence[int]], cont: Sequence[Sequence[int]]) -> list[float]:
    """Summed negative log-likelihood of each continuation after its context, no controls."""
    nll = [0.0] * len(ctx)
    head = b.plain_head()
    c = b.acquire(1, capture=head is not None)
    try:
        pack = _Packer(c, b.n_vocab, nll, head)
        for i, (x, y) in enumerate(zip(ctx, cont)):
            if not y:
                continue
            toks = [*x, *y]
            if len(toks) > c.n_ctx:
                raise UserError(f"a text of {len(toks)} tokens does not fit the {c.n_ctx}-token llama.cpp context")
            c.reset()
            for p in range(len(toks) - 1):  # position p's logits predict token p + 1
                scored = p >= len(x) - 1
                pack.add(toks[p], p, 0, i if scored else None, toks[p + 1] if scored else None)
            pack.flush()
    finally:
        b.release(c)
    return nll

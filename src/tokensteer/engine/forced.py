"""The forced-token path: a request whose one masking control names the tokens that must come next
(a JSON schema's ``{"name":"``) feeds them with the sampled token in one forward pass, then runs
rewrite, mask and accept at each forced position on the logits that pass returned.

It runs beside the shared step in a group of its own, since ``extend`` feeds several tokens to
every row of a session at once.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tokensteer.engine import stages
from tokensteer.engine.group import Group
from tokensteer.engine.request import Request


class ForcedGroup(Group):
    """One request with a forcing control, in its own session."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.ahead: list[tuple[torch.Tensor, torch.Tensor]] = []  # forced tokens already fed, each with the logits after it

    def fits(self, req: Request, placed: Sequence[Request] = ()) -> bool:
        return False

    def advance(self, joining: Sequence[Request]) -> None:
        for req in self.join(joining):  # text fixed from the start (a schema's opening): one forward pass
            self._feed(req, None)
        self.leave()
        if not self.requests:
            return
        req = self.requests[0]
        try:
            after = self._decide(req)
        except Exception as e:  # noqa: BLE001 - the request fails (alone in its group)
            req.error, after = e, None
        self.sink.events(req)
        self.leave()
        if not self.requests:
            return
        if after is not None:  # the next position's logits came with the forced tokens
            req.state.set_logits(after)
        elif not self._feed(req, req.tokens):
            self.forward()

    def _decide(self, req: Request) -> torch.Tensor | None:
        """rewrite → mask → (forced token, or sample) → accept; the logits after a forced token."""
        req.state.step = req.state.confirmed
        x = stages.mask(req, stages.rewrite(req))
        if self.ahead:
            tokens, after = self.ahead.pop(0)
            live = ~torch.tensor(req.state.finished)
            if not torch.isfinite(x.gather(1, tokens[:, None]).squeeze(1)[live]).all():
                raise RuntimeError(f"{type(req.forcer).__name__} forced a token its own mask forbids")
            tokens = stages.repeat_finished(req, tokens)
        else:
            tokens, after = stages.sample(req, x), None
        stages.accept(req, tokens, x)
        req.tokens = tokens
        return after

    def _feed(self, req: Request, tokens: torch.Tensor | None) -> bool:
        """Feed this step's tokens (None before the first) and the forced ones in one ``extend``;
        False when nothing is forced (the caller steps as usual)."""
        forced = forced_tokens(req)
        if forced is None:
            return False
        fed = forced if tokens is None else torch.cat([tokens[:, None], forced], 1)
        out = self.session.extend(fed[req.live].repeat_interleave(req.R, 0))
        first = 0 if tokens is None else 1
        self.ahead = [(forced[:, j], req.expand(out[:, first + j])) for j in range(forced.shape[1])]
        if tokens is not None:
            req.set_logits(out[:, 0])
        req.state.forward_calls += 1
        return True


def forced_tokens(req: Request) -> torch.Tensor | None:
    """[B, k] tokens every live prompt must take next (finished ones repeat their last), or None.

    k is the fewest any live prompt has, capped by the token budget; EOS is never forced."""
    st = req.state
    per_row = req.forcer.forced(st)
    if not per_row:
        return None
    k, rows = st.max_tokens - st.confirmed, []
    for b in range(st.batch_size):
        if st.finished[b]:
            rows.append(None)
            continue
        seq = list(per_row[b] or [])
        cut = next((i for i, t in enumerate(seq) if t in req.eos), len(seq))
        rows.append(seq[:cut])
        k = min(k, cut)
    if k <= 0:
        return None
    last = st.last_tokens()
    return torch.tensor([r[:k] if r is not None else [last[b]] * k for b, r in enumerate(rows)], dtype=torch.long)

"""The speculative path: with a drafting control every sampled token is tentative (fed to the
session, not yet emitted) until the control's ``verify`` keeps some, drops the rest (trimmed from
the session) and supplies the next token; only confirmed tokens are emitted, through the shared
``emit``. It runs beside the shared step in a group of its own, since ``trim`` rolls back every
row of a session."""

from __future__ import annotations

from typing import Sequence

import torch

from tokensteer.engine import stages
from tokensteer.engine.group import Group
from tokensteer.engine.request import Request


class SpeculativeGroup(Group):
    """One request with a drafting control, in its own session opened with rollback."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.held: list[torch.Tensor] = []  # the tentative tokens, oldest first

    def fits(self, req: Request, placed: Sequence[Request] = ()) -> bool:
        return False

    def advance(self, joining: Sequence[Request]) -> None:
        self.join(joining)
        self.leave()
        if not self.requests:
            return
        req = self.requests[0]
        try:
            self._decide(req)
        except Exception as e:  # noqa: BLE001 - the request fails (alone in its group)
            req.error = e
        self.sink.events(req)
        self.leave()
        if self.requests:
            self.forward()

    def _decide(self, req: Request) -> None:
        st = req.state
        st.step = self.steps
        verdict = req.drafter.verify(st)
        if verdict is not None:
            tokens = stages.repeat_finished(req, verdict.tokens.clone())
            self.session.trim(st.tentative - verdict.keep)
            for b in range(st.batch_size):
                if not st.finished[b]:
                    del st.generated[b][len(st.generated[b]) - st.tentative :]
            confirmed = list(zip(self.held[: verdict.keep] + [tokens], verdict.logprobs))
            self.held, st.tentative = [], 0
            stages.emit(req, confirmed)
        else:
            x = stages.mask(req, stages.rewrite(req))
            tokens = stages.sample(req, x)
            for c in req.followers:
                c.on_token(st, tokens)
            self.held.append(tokens)
            for b in range(st.batch_size):
                if not st.finished[b]:
                    st.generated[b].append(int(tokens[b]))
            st.tentative += 1
            if st.tentative > req.cfg.max_tokens:
                raise RuntimeError(f"{type(req.drafter).__name__} drafted {st.tentative} tokens without a verdict")
        req.tokens = tokens

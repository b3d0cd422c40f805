"""A group: requests that share one backend session, so one forward pass a step serves all their rows.

Each engine iteration advances a group once: one forward pass feeds every live row its token, new
requests are prefilled beside the others, one output-layer call gives every row's logits, every
request decides its next tokens, and finished rows leave the session.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from tokensteer.backends.base import Backend, Pending
from tokensteer.engine import stages
from tokensteer.engine.request import Request


class Sink(Protocol):
    """Where a group hands its requests' events and finished requests (the engine)."""

    def events(self, req: Request) -> None: ...

    def finished(self, req: Request) -> None: ...


class Group:
    """Requests of one key (see ``Request.key``) in one session; the shared step."""

    def __init__(self, backend: Backend, first: Request, capacity: int, sink: Sink) -> None:
        self.backend, self.key, self.capacity, self.sink = backend, first.key(), capacity, sink
        edits = () if first.row_edits else first.edits
        kw = {"mix": first.mix} if first.mix is not None else {}  # lets llama.cpp pick the output layer that mixes
        # rows whose logits must not depend on their neighbours, where the backend limits their length for it
        rollback = first.path == "speculative"
        self.row_cells = None if rollback else backend.row_cells(capacity)
        self.isolated = self.row_cells is not None and first.longest() <= self.row_cells
        self.session = backend.session(edits, rollback=rollback, capacity=capacity, isolated=self.isolated, **kw)
        self.requests: list[Request] = []
        self.steps = 0

    # -- admission ------------------------------------------------------------------------
    def rows(self) -> int:
        return sum(r.n_rows() for r in self.requests)

    def fits(self, req: Request, placed: Sequence[Request] = ()) -> bool:
        """Whether ``req`` may join beside the running requests and those ``placed`` this iteration:
        the same key, room in the batch and in the KV cells its rows share (isolated: in each row's
        own cells; a longer request joins a group whose rows share a cache, so long rows batch too)."""
        others = [*self.requests, *placed]
        if req.key() != self.key or sum(r.n_rows() for r in others) + req.n_rows() > self.capacity:
            return False
        if self.row_cells is not None and (req.longest() <= self.row_cells) != self.isolated:
            return False
        if self.isolated:
            return True
        cells = self.backend.shared_cells
        return cells is None or sum(r.cells() for r in others) + req.cells() <= cells

    def join(self, reqs: Sequence[Request]) -> list[Request]:
        """Prefill each request's rows beside the live ones and start its controls; return those that joined."""
        joined = self._prefill(reqs)
        self._start(joined, self.session.outputs([p for _, p in joined]))
        return [r for r, _ in joined if r.error is None]

    def _prefill(self, reqs: Sequence[Request]) -> list[tuple[Request, Pending]]:
        """Each request's rows into the session, their output layer pending; a request that does not fit fails alone."""
        out = []
        for req in reqs:
            try:
                pending = self.session.add_pending(req.rows, req.edits if req.row_edits else (), req.mix)
            except Exception as e:  # noqa: BLE001 - the request fails alone (add leaves no rows behind)
                req.error = e
                self.sink.finished(req)
                continue
            self.requests.append(req)  # from here its rows are in the session: ``leave`` takes them out
            out.append((req, pending))
        return out

    def _start(self, joined: list[tuple[Request, Pending]], logits: list[torch.Tensor]) -> None:
        for (req, _), x in zip(joined, logits):
            try:
                req.set_logits(x)
                req.state.forward_calls += 1
                req.started = True
                for c in req.controls:
                    c.start(req.state)
            except Exception as e:  # noqa: BLE001
                req.error = e

    # -- the step -------------------------------------------------------------------------
    def advance(self, joining: Sequence[Request]) -> None:
        """leave → forward → join → output layer → decide → leave. The step's rows and the joiners'
        last prompt positions meet the output layer in one call where the session can
        (``Session.outputs``), so a request joining costs no pass of its own over that layer."""
        self.leave()  # cancelled since the last step
        running = list(self.requests)
        pending = [self.session.step_pending(_tokens(running))] if running else []
        joined = self._prefill(joining)
        logits = self.session.outputs(pending + [p for _, p in joined])
        if running:
            self._spread(running, logits[0])
        self._start(joined, logits[len(pending):])
        self.decide(list(self.requests))
        self.leave()

    def decide(self, reqs: Sequence[Request]) -> None:
        """Each live request picks its next tokens: plain ones sampled together
        (``stages.sample_plain``), the others one by one; a request whose stages fail, fails alone."""
        live = [r for r in reqs if not r.done]
        plain = [r for r in live if stages.is_plain(r)]
        picks: dict[int, tuple] = {}
        if len(plain) > 1:
            try:
                picks = {id(r): p for r, p in zip(plain, stages.sample_plain(plain))}
            except Exception as e:  # noqa: BLE001 - their shared tensor work failed: like a failed forward, for all of them
                for r in plain:
                    r.error = e
        for req in live:
            try:
                if id(req) in picks:
                    stages.accept_plain(req, *picks[id(req)])
                elif req.error is None:
                    stages.decide(req)
            except Exception as e:  # noqa: BLE001 - the request fails alone
                req.error = e
            self.sink.events(req)

    def forward(self) -> None:
        """One forward pass: every live row takes its request's token; each request gets its logits back."""
        self._spread(self.requests, self.session.step(_tokens(self.requests)))

    def _spread(self, reqs: Sequence[Request], logits: torch.Tensor) -> None:
        """A step's logits to the requests whose rows it took, in order."""
        self.steps += 1
        start = 0
        for r in reqs:  # rows out per prompt: R, or R' when the session mixes rows
            n = len(r.live) * r.state.rows_per_prompt
            r.set_logits(logits[start : start + n])
            r.state.forward_calls += 1
            start += n

    def leave(self) -> None:
        """Finished, failed and cancelled requests (and finished prompts of live ones) leave the session."""
        keep: list[int] = []
        start, changed, staying = 0, False, []
        for r in self.requests:
            gone = r.done  # read once: a client may cancel from another thread meanwhile
            live = [] if gone else [b for b in r.live if not r.state.finished[b]]
            for i, b in enumerate(r.live):
                if b in live:
                    keep.extend(range(start + i * r.R, start + (i + 1) * r.R))
            start += len(r.live) * r.R
            changed |= live != r.live
            r.live = live
            (self.sink.finished if gone else staying.append)(r)
        self.requests = staying
        if changed:  # keep may be empty: then every row leaves, and joiners start on an empty session
            self.session.select(keep)

    @property
    def empty(self) -> bool:
        return not self.requests

    def close(self) -> None:
        for r in self.requests:
            r.error = r.error or RuntimeError("the engine stopped")
            self.sink.finished(r)
        self.requests = []
        self.session.close()


def _tokens(reqs: Sequence[Request]) -> torch.Tensor:
    """The tokens every live row of ``reqs`` takes at the next forward pass, in row order."""
    return reqs[0].feed() if len(reqs) == 1 else torch.cat([r.feed() for r in reqs])

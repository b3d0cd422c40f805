"""The byte-level path: a request sampled byte by byte from the exact next-byte distribution
(``tokensteer.bytes``) runs in the engine beside the shared step, one byte per iteration, so it
queues, streams, cancels and fails like any other request.

Its models' sessions belong to the byte states (a prompt's covering tokenizations are rows of their
own), so it runs in a group of its own.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Mapping, Sequence

from tokensteer.backends.base import Backend
from tokensteer.engine.events import TokenEvent


class ByteRequest:
    """Prompts to continue byte by byte; ``events`` and the fields the engine reads, as ``Request`` has."""

    path = "bytes"
    R = 1
    controls: list = []

    def __init__(self, backend: Backend, prompts: Sequence[str], cfg, formula=None, models: Mapping[str, Backend] | None = None, options=None) -> None:
        from tokensteer.bytes import check_bytes_formula
        from tokensteer.bytes.generate import byte_config, stream_bytes
        from tokensteer.formula import parse

        self.backend, self.prompts, self.cfg = backend, list(prompts), byte_config(cfg, {})
        if isinstance(formula, str):
            check_bytes_formula(parse(formula))  # a mistake is refused at submit, not at the first byte
        self.stream = stream_bytes(backend, self.prompts, self.cfg, formula, models=models, options=options)
        self.t0 = time.perf_counter()
        self.events: list[TokenEvent] = []
        self.error: BaseException | None = None
        self.cancelled = self.started = self.ended = False
        self.state = SimpleNamespace(forward_calls=0)

    def key(self) -> tuple:
        return ("alone", id(self))

    def n_rows(self) -> int:
        return 1

    def cells(self) -> int:
        return 0

    @property
    def done(self) -> bool:
        return self.error is not None or self.cancelled or self.ended

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def collect(self, events: list[TokenEvent], total_s: float) -> list:
        """One ByteGeneration per prompt."""
        from tokensteer.bytes.generate import collect

        out = []
        for i, p in enumerate(self.prompts):
            evs = [e for e in events if e.index == i]
            out.append(collect(p, evs, evs[0].t if evs else total_s, total_s, self.backend.name))
        return out


class ByteGroup:
    """One byte-level request; each ``advance`` samples one byte (the first one prefills its models)."""

    def __init__(self, backend: Backend, first: ByteRequest, capacity: int, sink) -> None:
        self.sink, self.key, self.capacity = sink, first.key(), 1
        self.requests: list[ByteRequest] = []

    def rows(self) -> int:
        return len(self.requests)

    def fits(self, req, placed=()) -> bool:
        return False

    def advance(self, joining: Sequence[ByteRequest]) -> None:
        self.requests += joining
        if not self.requests:
            return
        req = self.requests[0]
        req.started = True
        if not req.done:
            try:
                ev = next(req.stream, None)
                if ev is None:
                    req.ended = True
                else:
                    req.events.append(ev)
            except Exception as e:  # noqa: BLE001 - the request fails alone
                req.error = e
        self.sink.events(req)
        if req.done:
            req.stream.close()  # its byte states close their sessions
            self.sink.finished(req)
            self.requests = []

    @property
    def empty(self) -> bool:
        return not self.requests

    def close(self) -> None:
        for r in self.requests:
            r.stream.close()
            r.error = r.error or RuntimeError("the engine stopped")
            self.sink.finished(r)
        self.requests = []

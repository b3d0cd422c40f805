"""One API request on the engine: check it, build its controls and submit it (in a worker thread,
since building may compile a grammar), then follow its token events per choice until it ends, is
cancelled, or its client hangs up."""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

import anyio
from fastapi import Request

from tokensteer.controls import RequestControls
from tokensteer.sampling import SamplingConfig, row_seed
from tokensteer.server.controls import build
from tokensteer.server.responses import finish, new_id, now

if TYPE_CHECKING:
    from tokensteer.engine import Handle, TokenEvent
    from tokensteer.server.app import ServerContext

DISCONNECT_POLL_S = 0.2


@dataclass
class Plan:
    """What a route asks the engine for: distinct prompts, n choices each, sampling and controls."""

    prompts: list[str]
    n: int
    sampling: dict  # SamplingConfig fields but the seed
    seed: int | None
    controls: RequestControls
    prompt_param: str = "prompt"
    byte_level: bool = False  # byte-level sampling (``Engine.submit_bytes``): events are bytes
    kv_select: object = None  # the request's TokenSelect setting (None: the server's; see ``server.kvselect``)


@dataclass
class Choice:
    """One choice's events so far: its text, its non-EOS tokens, its end and its formula trace."""

    text: list[str] = field(default_factory=list)
    events: list = field(default_factory=list)  # TokenEvents of real tokens (the EOS event left out)
    trace: list = field(default_factory=list)
    seen: int = 0  # events including EOS: the index into the formula's trace
    finish_reason: str | None = None


class Job:
    """A submitted request and its choices; ``close`` cancels it if it is still running and gives
    its place back to the server's concurrency gate."""

    def __init__(self, ctx: ServerContext, handle: Handle, plan: Plan, prompt_tokens: list[int], traced: list) -> None:
        self.ctx, self.handle, self.plan, self.prompt_tokens, self.traced = ctx, handle, plan, prompt_tokens, traced
        self.id, self.created = new_id("cmpl"), now()
        self.choices = [Choice() for _ in range(len(plan.prompts) * plan.n)]
        self.first = True
        self._closed = False

    def record(self, ev: TokenEvent) -> dict | None:
        """Fold one event into its choice; returns its formula-trace entry (or None)."""
        c = self.choices[ev.index]
        entry = None
        for ctl in self.traced:
            rows = ctl.traces[ev.index] if ev.index < len(ctl.traces) else []
            if c.seen < len(rows) and rows[c.seen].token == ev.token:
                entry = rows[c.seen].as_dict()
        c.seen += 1
        c.text.append(ev.text)
        if ev.finish_reason != "eos":
            c.events.append(ev)
            if entry is not None:
                c.trace.append(entry)
        c.finish_reason = finish(ev.finish_reason) or c.finish_reason
        return entry

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The request's events as they come, counted in the server's metrics."""
        async for ev in self.handle:
            self._count([ev])
            yield ev

    def _count(self, events: list[TokenEvent]) -> None:
        m = self.ctx.metrics
        if self.first and events:
            self.first = False
            m.ttft.observe(events[0].t)
        generated = sum(1 for ev in events if ev.finish_reason != "eos")
        if generated:
            m.tokens.labels("completion").inc(generated)

    async def batches(self) -> AsyncIterator[list[TokenEvent]]:
        """The request's events in lists, one list per write to the client: every event already
        queued goes with the one that woke the stream. With the server's ``stream_interval`` > 0
        (seconds), a list also waits until that long after the previous write, and tokens arriving
        meanwhile wake nothing (a finished choice or the request's end goes at once), so a stream
        costs per write rather than per token, and a hop that costs per message (a Ray Serve
        proxy) carries several tokens."""
        interval, last = self.ctx.stream_interval, -math.inf
        async for first in self.handle:
            batch = [first, *self.handle.drain()]
            wait = last + interval - time.monotonic()
            if wait > 0 and all(e.finish_reason is None for e in batch):
                await self.handle.wait_end(wait)
                batch += self.handle.drain()
            self._count(batch)
            yield batch
            last = time.monotonic()

    async def collect(self, request: Request) -> None:
        """Run to the end (non-streaming); a client that hangs up meanwhile cancels the request."""
        watcher = asyncio.create_task(self._watch(request))
        try:
            async for ev in self.events():
                self.record(ev)
        finally:
            watcher.cancel()
            self.close()

    async def _watch(self, request: Request) -> None:
        while not self.handle.done:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                self.handle.cancel(wait=False)
                return

    def completion_tokens(self) -> int:
        return sum(len(c.events) for c in self.choices)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.handle.done:
            self.handle.cancel(wait=False)
        self.ctx.gate.leave()


async def start(ctx: ServerContext, plan: Plan) -> Job:
    """Take a place under the concurrency limit, then check, build and submit in a worker thread."""
    ctx.gate.enter()
    box: list[Job] = []
    try:
        await anyio.to_thread.run_sync(lambda: box.append(_submit(ctx, plan)))
    except BaseException:  # a failed check, or a client that hung up while the thread submitted
        if box:
            box[0].close()
        else:
            ctx.gate.leave()
        raise
    job = box[0]
    ctx.metrics.tokens.labels("prompt").inc(sum(job.prompt_tokens))
    return job


def _submit(ctx: ServerContext, plan: Plan) -> Job:
    lm, limits = ctx.lm, ctx.limits
    limits.check_tokens(plan.sampling.get("max_tokens", 0), "max_tokens")
    limits.check_choices(plan.n, len(plan.prompts))
    counts = []
    for i, p in enumerate(plan.prompts):
        n_tok = len(lm.tokenizer.encode(p))
        limits.check_prompt(n_tok, plan.prompt_param if len(plan.prompts) == 1 else f"{plan.prompt_param}.{i}")
        counts.append(n_tok)
    base = plan.seed if plan.seed is not None else secrets.randbits(63)
    seeds = tuple(row_seed(base, j) for _ in plan.prompts for j in range(plan.n))  # choice j of each prompt: the CLI's seed for j = 0
    cfg = SamplingConfig(seed=seeds, **plan.sampling)
    prompts = [p for p in plan.prompts for _ in range(plan.n)]
    if plan.byte_level:
        with ctx.lock:
            return Job(ctx, _submit_bytes(ctx, plan, prompts, cfg), plan, counts, [])
    with ctx.lock:  # controls build caches (grammars, vectors) that are not made for two threads at once
        engine = ctx.engines.get(plan.kv_select)
        controls = build(lm, plan.controls)
        handle = engine.submit(prompts, cfg, controls)
    traced = [c for c in controls if getattr(c, "trace_on", False)]  # formula controls asked for a trace
    return Job(ctx, handle, plan, counts, traced)


def _submit_bytes(ctx: ServerContext, plan: Plan, prompts: list[str], cfg: SamplingConfig) -> Handle:
    """A byte-level request: only a formula applies (over byte distributions), and no per-token logprobs."""
    from tokensteer.errors import UserError

    req = plan.controls
    if req.steer or req.trace or req.has_constraints():
        raise UserError("byte_level takes a formula only: steering, constraints and trace act on tokens")
    if cfg.top_logprobs:
        raise UserError("logprobs are per token; byte-level responses carry none")
    return ctx.engines.get(plan.kv_select).submit_bytes(prompts, cfg, req.formula)

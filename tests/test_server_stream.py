"""How a stream's token events become SSE writes: events already queued go out together, a
``stream_interval`` holds a write a little for more (a finished choice goes at once), nothing is
lost, reordered or sent twice, and an error still reaches the client after the tokens before it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tokensteer.cli import app
from tokensteer.engine.events import TokenEvent
from tokensteer.engine.handle import Handle
from tokensteer.errors import UserError
from tokensteer.server.limits import Gate
from tokensteer.server.metrics import Metrics
from tokensteer.server.routes.common import stream
from tokensteer.server.run import Job


def make_job(interval: float) -> tuple[Job, Handle]:
    handle = Handle(lambda h: None, lambda events, total: [])
    ctx = SimpleNamespace(metrics=Metrics(), gate=Gate(4), stream_interval=interval)
    ctx.gate.enter()
    plan = SimpleNamespace(prompts=["p"], n=1)
    return Job(ctx, handle, plan, [1], []), handle


def ev(i: int, last: bool = False) -> TokenEvent:
    return TokenEvent(0, i, f"t{i}", -1.0, finish_reason="length" if last else None)


async def timed_batches(job: Job) -> list[tuple[float, list[int]]]:
    return [(time.monotonic(), [e.token for e in b]) async for b in job.batches()]


def pusher(handle: Handle, groups: list[tuple[float, int]], stamps: list[float] | None = None, error: BaseException | None = None,
           start: int = 0) -> threading.Thread:
    """Push ``count`` events after each ``delay`` (the engine's side, from its own thread), then close."""

    def run() -> None:
        i, total = start, start + sum(c for _, c in groups)
        for delay, count in groups:
            time.sleep(delay)
            handle.push([ev(i + k, i + k == total - 1 and error is None) for k in range(count)])
            if stamps is not None:
                stamps.append(time.monotonic())
            i += count
        handle.close(error, 0.0)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_events_already_queued_go_out_in_one_write():
    job, handle = make_job(0.0)
    handle.push([ev(0), ev(1), ev(2)])
    pusher(handle, [(0.05, 1), (0.05, 1)], start=3)
    got = [b for _, b in asyncio.run(timed_batches(job))]
    assert got[0] == [0, 1, 2] and [t for b in got for t in b] == [0, 1, 2, 3, 4]


def test_interval_groups_tokens_and_a_finished_choice_goes_at_once():
    job, handle = make_job(0.6)
    stamps: list[float] = []
    pusher(handle, [(0.0, 1)] + [(0.01, 1)] * 9, stamps)
    got = asyncio.run(timed_batches(job))
    assert got[0][1] == [0]  # the first token is not held
    assert len(got) <= 3 and [t for _, b in got for t in b] == list(range(10))
    assert got[-1][0] - stamps[-1] < 0.45  # the finishing token did not wait out the interval


def test_tokens_held_for_a_write_wake_no_event_loop():
    """While a write waits out the interval, new tokens wake nothing: the stream costs per write,
    not per token (the last token still wakes it at once)."""
    job, handle = make_job(0.5)
    stamps: list[float] = []
    wakes = [0]

    async def counted() -> list[tuple[float, list[int]]]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def count(*args, **kw):
            wakes[0] += 1
            return real(*args, **kw)

        loop.call_soon_threadsafe = count  # the engine's thread wakes a reader only through this
        pusher(handle, [(0.05, 1)] + [(0.01, 1)] * 11, stamps)
        return await timed_batches(job)

    got = asyncio.run(counted())
    assert [t for _, b in got for t in b] == list(range(12)) and len(got) == 2
    assert wakes[0] <= 3  # the first token, the finishing one, the end; not one per token
    assert got[-1][0] - stamps[-1] < 0.3


def test_sse_writes_carry_every_ready_frame():
    job, handle = make_job(0.0)
    handle.push([ev(0), ev(1), ev(2, last=True)])
    handle.close(None, 0.0)

    async def writes() -> list[bytes]:
        return [w async for w in stream(job, [{"head": 1}], lambda e, tr: {"text": e.text}, None)]

    out = asyncio.run(writes())
    assert out[0] == b'data: {"head":1}\n\n'
    frames = out[1].decode().split("\n\n")
    assert [json.loads(f.removeprefix("data: "))["text"] for f in frames if f] == ["t0", "t1", "t2"]
    assert out[-1] == b"data: [DONE]\n\n" and job.ctx.gate.active == 0


def test_error_after_tokens_still_reaches_the_client():
    job, handle = make_job(0.05)
    pusher(handle, [(0.0, 2), (0.02, 1)], error=UserError("the constraint cannot finish"))

    async def consume() -> list[int]:
        got = []
        with pytest.raises(UserError):
            async for b in job.batches():
                got += [e.token for e in b]
        return got

    assert asyncio.run(consume()) == [0, 1, 2]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.001, 0.005, 0.02]), st.integers(1, 4)), min_size=1, max_size=8),
       st.sampled_from([0.0, 0.003, 0.03]))
def test_every_event_arrives_once_in_order_in_non_empty_writes(groups, interval):
    job, handle = make_job(interval)
    pusher(handle, groups)
    got = [b for _, b in asyncio.run(timed_batches(job))]
    assert all(got) and [t for b in got for t in b] == list(range(sum(c for _, c in groups)))


def test_stream_interval_out_of_range_is_one_user_error():
    r = CliRunner().invoke(app, ["serve", "--stream-interval", "-1", "--port", "0"])
    assert r.exit_code == 2 and "--stream-interval must be in" in r.output and "Traceback" not in r.output

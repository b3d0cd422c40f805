"""A submitted request's handle: its token events, from any thread or from asyncio, and cancel."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import AsyncIterator, Callable, Iterator

from tokensteer.engine.events import Generation, TokenEvent


class Cancelled(Exception):
    """The request was cancelled before it finished."""


class Handle:
    """Yields a request's TokenEvents as the engine produces them; ``cancel`` ends it early.

    Iterate it (blocking) or ``async for`` it; ``result()`` waits for the end and returns one
    Generation per prompt. A failed request raises its error where the events are read.
    """

    def __init__(self, cancel: Callable[["Handle"], None], collect: Callable[[list[TokenEvent], float], list[Generation]]) -> None:
        self._cancel, self._collect = cancel, collect
        self._queue: deque[TokenEvent] = deque()
        self._cv = threading.Condition()
        # asyncio readers waiting now, woken once (by the next push or the end) and then dropped, so
        # events pushed while nobody waits wake no event loop; ``_end_wakers`` wait for a finished
        # choice or the end only (``wait_end``)
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._end_wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.events: list[TokenEvent] = []  # every event so far, in order
        self.done = False
        self.cancelled = False
        self.error: BaseException | None = None
        self.total_s = 0.0
        self.rows_per_prompt = 1  # rows each prompt took in the batch (set at the end)
        self.forward_calls = 0  # forward passes the request took part in (set at the end)
        self._done_callbacks: list[Callable[[], None]] = []

    # -- the engine's side ----------------------------------------------------------------
    def push(self, events: list[TokenEvent]) -> None:
        with self._cv:
            self._queue.extend(events)
            self.events.extend(events)
            self._cv.notify_all()
            wake = self._take_wakers(any(e.finish_reason is not None for e in events))
        _wake(wake)

    def close(self, error: BaseException | None, total_s: float) -> None:
        with self._cv:
            self.done, self.error, self.total_s = True, error, total_s
            callbacks, self._done_callbacks = self._done_callbacks, []
            self._cv.notify_all()
            wake = self._take_wakers(True)
        _wake(wake)
        for fn in callbacks:
            fn()

    def _take_wakers(self, ending: bool) -> list:
        out, self._wakers = self._wakers, []
        if ending:
            out, self._end_wakers = out + self._end_wakers, []
        return out

    def when_done(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once the request has ended (at once if it has); it runs on the engine's thread."""
        with self._cv:
            if not self.done:
                self._done_callbacks.append(fn)
                return
        fn()

    # -- the client's side ----------------------------------------------------------------
    def cancel(self, wait: bool = True) -> None:
        """Stop the request: its rows leave the batch at the next step and its stream ends; with
        ``wait``, return once it has left and its controls have finished (asyncio code passes False)."""
        if self.done:
            return
        self.cancelled = True
        self._cancel(self)
        if wait:
            with self._cv:
                while not self.done:
                    self._cv.wait()

    def next(self, timeout: float | None = None) -> TokenEvent | None:
        """The next event, waiting for it; None at the end. Raises the request's error."""
        with self._cv:
            while not self._queue and not self.done:
                if not self._cv.wait(timeout):
                    raise TimeoutError("no token within the timeout")
            if self._queue:
                return self._queue.popleft()
        if self.error is not None:
            raise self.error
        return None

    def __iter__(self) -> Iterator[TokenEvent]:
        while (ev := self.next()) is not None:
            yield ev

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        loop, ev = asyncio.get_running_loop(), asyncio.Event()
        while True:
            with self._cv:
                item = self._queue.popleft() if self._queue else None
                finished = self.done and item is None
                if item is None and not finished:  # wait: the next push or the end wakes this loop once
                    ev.clear()
                    self._wakers.append((loop, ev))
            if item is not None:
                yield item
            elif finished:
                if self.error is not None:
                    raise self.error
                return
            else:
                await self._wait("_wakers", loop, ev)

    def drain(self) -> list[TokenEvent]:
        """Every event queued now, without waiting (for a reader that writes them out together)."""
        with self._cv:
            out = list(self._queue)
            self._queue.clear()
        return out

    async def wait_end(self, timeout: float) -> None:
        """Wait (asyncio) until a choice finishes, the request ends, or ``timeout`` seconds pass;
        tokens pushed meanwhile do not wake it."""
        loop, ev = asyncio.get_running_loop(), asyncio.Event()
        with self._cv:
            if self.done or any(e.finish_reason is not None for e in self._queue):
                return
            self._end_wakers.append((loop, ev))
        try:
            await asyncio.wait_for(self._wait("_end_wakers", loop, ev), timeout)
        except TimeoutError:
            pass

    async def _wait(self, kind: str, loop: asyncio.AbstractEventLoop, ev: asyncio.Event) -> None:
        """Wait on ``ev``, registered in the list named ``kind``; still there afterwards means not
        woken (cancelled or timed out), so it leaves."""
        try:
            await ev.wait()
        finally:
            with self._cv:
                wakers = getattr(self, kind)
                if (loop, ev) in wakers:
                    wakers.remove((loop, ev))

    def result(self) -> list[Generation]:
        """Wait for the end; one Generation per prompt (raises the request's error, or Cancelled)."""
        with self._cv:
            while not self.done:
                self._cv.wait()
        if self.error is not None:
            raise self.error
        if self.cancelled:
            raise Cancelled("the request was cancelled")
        return self._collect(self.events, self.total_s)


def _wake(wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    for loop, ev in wakers:
        try:
            loop.call_soon_threadsafe(ev.set)
        except RuntimeError:  # the reader's event loop is closed
            pass

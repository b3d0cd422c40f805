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
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
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
        self._wake()

    def close(self, error: BaseException | None, total_s: float) -> None:
        with self._cv:
            self.done, self.error, self.total_s = True, error, total_s
            callbacks, self._done_callbacks = self._done_callbacks, []
            self._cv.notify_all()
        self._wake()
        for fn in callbacks:
            fn()

    def when_done(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once the request has ended (at once if it has); it runs on the engine's thread."""
        with self._cv:
            if not self.done:
                self._done_callbacks.append(fn)
                return
        fn()

    def _wake(self) -> None:
        for loop, ev in list(self._wakers):
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # the client's event loop is closed
                pass

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
        self._wakers.append((loop, ev))
        try:
            while True:
                ev.clear()
                with self._cv:
                    item = self._queue.popleft() if self._queue else None
                    finished = self.done and item is None
                if item is not None:
                    yield item
                elif finished:
                    if self.error is not None:
                        raise self.error
                    return
                else:
                    await ev.wait()
        finally:
            self._wakers.remove((loop, ev))

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

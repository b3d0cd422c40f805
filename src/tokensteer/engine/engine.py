"""The engine: one loaded model, a running batch, and requests that join and leave it between steps.

``submit`` may be called from any thread; the engine's own thread admits waiting requests into a
group (one backend session whose rows share a forward pass; see ``group``), advances every group
one step per iteration, and hands each request's events to its ``Handle``. A request that
fails or is cancelled leaves at the next step without touching the others.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections import Counter, deque
from contextlib import contextmanager
from typing import Iterator, Sequence

from tokensteer.backends.base import Backend
from tokensteer.checks import check_request
from tokensteer.engine.bytelevel import ByteGroup, ByteRequest
from tokensteer.engine.events import collect
from tokensteer.engine.forced import ForcedGroup
from tokensteer.engine.group import Group
from tokensteer.engine.handle import Handle
from tokensteer.engine.request import Request
from tokensteer.engine.speculative import SpeculativeGroup
from tokensteer.errors import UserError
from tokensteer.hooks import Control
from tokensteer.openmp import release_pool
from tokensteer.sampling import SamplingConfig

# seconds an idle engine thread waits for the next request before it exits: a thread per request
# would cost native memory each time (thread pools the kernels keep per calling thread)
IDLE_S = 30.0
PATHS = {"shared": Group, "forced": ForcedGroup, "speculative": SpeculativeGroup, "bytes": ByteGroup}
#: why a request may not share a running group, for ``stats``
WHY_ALONE = {
    "speculative": "speculative decoding trims and extends its own rows",
    "bytes": "byte-level requests hold their own sessions",
    "forced": "forced tokens extend its own rows",
    "edits": "the backend adds one steering vector set to all rows of a batch",
    "full": "the running group had no room",
}


class Engine:
    """Continuous batching over one backend; see the module doc."""

    def __init__(self, backend: Backend, max_batch_rows: int = 32, max_running: int = 64) -> None:
        self.backend, self.max_batch_rows, self.max_running = backend, max_batch_rows, max_running
        self._cv = threading.Condition()
        self._pending: deque[tuple[Request, Handle]] = deque()
        self._handles: dict[int, Handle] = {}  # id(request) -> handle, for running requests
        self._requests: dict[int, Request] = {}  # id(handle) -> request (cancellation)
        self._groups: list[Group] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._held = 0  # while > 0, waiting requests are not admitted (``hold``)
        self._ending: list[Request] = []  # left their group; their handles close once its session is released
        self.counts: Counter[str] = Counter()  # requests, tokens, steps, groups opened and why requests ran apart
        # the backend knows its engines, so closing it stops them first (none then frees a context late)
        vars(backend).setdefault("engines", weakref.WeakSet()).add(self)
        _LIVE.add(self)

    # -- clients --------------------------------------------------------------------------
    def submit(self, prompts: Sequence[str], cfg: SamplingConfig = SamplingConfig(), controls: Sequence[Control] = ()) -> Handle:
        """Queue a request; its rows join the running batch at the next step. Validation errors raise here."""
        prompts, cfg, controls = check_request(prompts, cfg, controls)
        req = Request(self.backend, prompts, cfg, controls)
        n_tokens = [len(p) for p in req.state.prompt_tokens]
        return self._queue(req, lambda events, total: collect(req.prompts, events, n_tokens, total, self.backend.name))

    def submit_bytes(
        self, prompts: Sequence[str], cfg: SamplingConfig = SamplingConfig(), formula=None, models=None, options=None, controls: Sequence[Control] = ()
    ) -> Handle:
        """Queue a byte-level request (``tokensteer.bytes``): its events are bytes (``END`` = 256 ends
        the text), its result one ByteGeneration per prompt; ``formula`` combines byte
        distributions of models with different tokenizers. Token-level controls do not apply."""
        prompts, cfg, controls = check_request(prompts, cfg, controls)
        if controls:
            raise UserError("controls act on tokens; byte-level generation takes a byte formula instead (byte_formula=)")
        req = ByteRequest(self.backend, prompts, cfg, formula, models, options)
        return self._queue(req, req.collect)

    def _queue(self, req, collect_events) -> Handle:
        release_pool()  # this thread hands its work over: its idle OpenMP workers would slow the engine
        handle = Handle(self._cancel, collect_events)
        if req.cfg.max_tokens == 0:
            handle.close(None, 0.0)
            return handle
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._requests[id(handle)] = req
            self._pending.append((req, handle))
            self.counts["requests"] += 1
            self._start()
            self._cv.notify_all()
        return handle

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Requests submitted inside join the batch at the same step (the eval's first batch, tests)."""
        with self._cv:
            self._held += 1
        try:
            yield
        finally:
            with self._cv:
                self._held -= 1
                self._cv.notify_all()

    def stats(self) -> dict:
        """What runs now: requests waiting and running, groups and their rows, and counters."""
        with self._cv:
            return {
                "waiting": len(self._pending),
                "running": len(self._handles),
                **{k: v for k, v in self.counts.items()},
                "groups": len(self._groups),
                "rows": sum(g.rows() for g in self._groups),
                "batch_rows": [g.rows() for g in self._groups],
            }

    def close(self) -> None:
        """Stop the engine thread; running and waiting requests end with an error."""
        with self._cv:
            self._closed = True
            thread = self._thread
            self._cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the engine thread ----------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tokensteer-engine", daemon=True)
            self._thread.start()

    def _cancel(self, handle: Handle) -> None:
        with self._cv:
            req = self._requests.get(id(handle))
            if req is not None:
                req.cancelled = True
            for i, (r, h) in enumerate(self._pending):
                if h is handle:
                    del self._pending[i]
                    self._requests.pop(id(handle), None)
                    h.close(None, r.now())
                    break
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._held and not self._groups and not self._closed:
                    self._cv.wait()
                if not (self._pending or self._groups):
                    release_pool()  # idle: its OpenMP workers would slow other threads' parallel work
                self._cv.wait_for(lambda: self._closed or self._pending or self._groups, timeout=IDLE_S)
                if self._closed or (not self._pending and not self._groups):
                    self._thread = None  # idle: the next submit starts a new thread
                    break
                incoming = [] if self._held else self._take()
            joining = self._place(incoming)
            self._close_handles()
            for g in list(self._groups):
                self._advance(g, joining.pop(id(g), []))
        for g in self._groups:
            g.close()
        self._groups = []
        self._close_handles()
        for req, handle in self._pending:
            handle.close(RuntimeError("the engine stopped"), req.now())
        self._pending.clear()

    def _take(self) -> list[tuple[Request, Handle]]:
        """Waiting requests that fit under ``max_running`` (first come, first served)."""
        out = []
        while self._pending and len(self._handles) < self.max_running:
            req, handle = self._pending.popleft()
            self._handles[id(req)] = handle
            out.append((req, handle))
        return out

    def _place(self, incoming: list[tuple[Request, Handle]]) -> dict[int, list[Request]]:
        """Put each new request in a running group it fits, else in a new group of its own path."""
        joining: dict[int, list[Request]] = {}
        for req, _ in incoming:
            group = next((g for g in self._groups if g.fits(req, joining.get(id(g), []))), None)
            if group is None:
                try:
                    group = PATHS[req.path](self.backend, req, max(self.max_batch_rows, req.n_rows()), self)
                except Exception as e:  # noqa: BLE001 - e.g. the backend refuses the session
                    req.error = e
                    self.finished(req)
                    continue
                if self._groups:
                    self.counts[f"apart:{self._why_apart(req)}"] += 1
                self._groups.append(group)
                self.counts["groups_opened"] += 1
            joining.setdefault(id(group), []).append(req)
        return joining

    def _why_apart(self, req: Request) -> str:
        if req.path != "shared":
            return req.path
        return "full" if req.key() in [g.key for g in self._groups] else "edits"

    def _advance(self, group: Group, joining: list[Request]) -> None:
        try:
            group.advance(joining)
        except Exception as e:  # noqa: BLE001 - the shared forward failed: every request in it fails
            for r in [*group.requests, *joining]:
                r.error = r.error or e
            group.close()
        self.counts["steps"] += 1
        if group.empty:
            group.close()
            self._groups.remove(group)
        self._close_handles()  # after the session is released: a client that returns finds nothing open

    # -- the group's sink -----------------------------------------------------------------
    def events(self, req: Request) -> None:
        if req.events:
            self.counts["tokens"] += len(req.events)
            self._handles[id(req)].push(req.events)
            req.events = []

    def finished(self, req: Request) -> None:
        """A request left its group (done, failed or cancelled): finish its controls; its handle closes
        at the end of this step (``_close_handles``)."""
        self.events(req)
        if req.started:
            for c in req.controls:
                try:
                    c.finish()
                except Exception as e:  # noqa: BLE001
                    req.error = req.error or e
        self._ending.append(req)

    def _close_handles(self) -> None:
        ending, self._ending = self._ending, []
        for req in ending:
            with self._cv:
                handle = self._handles.pop(id(req))
                self._requests.pop(id(handle), None)
            handle.rows_per_prompt, handle.forward_calls = req.R, req.state.forward_calls
            handle.close(req.error, req.now())


_ENGINES_LOCK = threading.Lock()
_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _stop_engines() -> None:
    """Let every engine thread end before the interpreter tears down (a thread killed inside torch aborts the process)."""
    for eng in list(_LIVE):
        eng.close()


def engine_for(backend: Backend) -> Engine:
    """The engine that serves ``backend`` in this process, made on first use and kept on the backend."""
    with _ENGINES_LOCK:
        eng = vars(backend).get("engine")  # its own, not one a wrapping object delegates to
        if eng is None:
            eng = Engine(backend)
            backend.engine = eng
        return eng

"""Generating an evaluation's samples through the engine, in this or worker processes.

Every unit (method × item × sample) draws from its own seed, so its text does not depend on what
shares its batch. Units run in batches of ``batch_size`` (one method, one control list), each batch
one request; a control list holds per-request state, so its batches run one at a time. Several
batches run at once in one engine: their rows share forward passes, a finished sample's rows leave
at once, and a finished batch makes room for the next.
"""

from __future__ import annotations

import math
import queue
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from tokensteer.eval.methods import Method, make_method
from tokensteer.eval.scorers import generated_perplexity
from tokensteer.eval.tasks import Item, Task
from tokensteer.sampling import SamplingConfig


@dataclass
class Unit:
    """One sample to generate: item ``index`` of the task, sample ``k``, under ``method``."""

    method: str
    index: int
    k: int
    item: Item
    prompt: str  # the text fed to the model (after Method.prompt)
    seed: int
    key: str


@dataclass
class Batch:
    """Units that run as one request: the same control list (named by ``method``), or none at all."""

    method: str
    units: list[Unit] = field(default_factory=list)
    controls: list = field(default_factory=list)


def plan_batches(units: Sequence[Unit], controls_of: Callable[[Unit], list], batch_size: int) -> list[Batch]:
    """Units grouped by method and control list (none, or one list shared by the method's units),
    ``batch_size`` at most each, in order: each batch is one request, whose prompts the engine's
    stages handle together."""
    groups: dict[Any, Batch] = {}
    out: list[Batch] = []
    for u in units:
        c = controls_of(u)
        key = (u.method, id(c) if c else None)
        b = groups.get(key)
        if b is None or len(b.units) >= batch_size:
            b = groups[key] = Batch(u.method, [], c)
            out.append(b)
        b.units.append(u)
    return out


def run_batches(lm: Any, batches: Sequence[Batch], cfg: SamplingConfig, batch_size: int, on_records: Callable[[list[dict]], None]) -> None:
    """Generate every batch through one engine, at most one running batch per control list; hand
    each finished batch's records to ``on_records``."""
    from tokensteer.engine import Engine

    eng = Engine(lm, max_batch_rows=2 * batch_size, max_running=4)
    waiting: dict[int, deque[Batch]] = {}
    free: deque[Batch] = deque()
    for b in batches:
        (waiting.setdefault(id(b.controls), deque()) if b.controls else free).append(b)
    running: dict[int, tuple[Batch, Any, float]] = {}
    ended: "queue.Queue[int]" = queue.Queue()

    def submit(b: Batch) -> None:
        h = eng.submit([u.prompt for u in b.units], replace(cfg, seed=tuple(u.seed for u in b.units)), b.controls)
        running[id(h)] = (b, h, time.perf_counter())
        h.when_done(lambda h=h: ended.put(id(h)))

    try:
        for q in waiting.values():
            submit(q.popleft())
        while free and len(running) < eng.max_running:
            submit(free.popleft())
        while running:
            b, h, t0 = running.pop(ended.get())
            on_records(_records(b, h.result(), h, time.perf_counter() - t0, lm.tokenizer if lm.generation_scores else None))
            if b.controls and waiting[id(b.controls)]:
                submit(waiting[id(b.controls)].popleft())
            while free and len(running) < eng.max_running:
                submit(free.popleft())
    finally:
        for _, h, _ in list(running.values()):
            h.cancel()
        eng.close()


def _records(batch: Batch, gens: list, handle: Any, seconds: float, tok: Any) -> list[dict[str, Any]]:
    """One cache record per unit; with the tokenizer ``tok`` (where the backend's generation scores
    like its scoring pass), a sample generated on its item's own prompt by the uncontrolled model's
    rows gets its perplexity here, from the log-probabilities its tokens were drawn beside."""
    n_tokens = sum(len(g.tokens) for g in gens)
    longest = max((len(g.tokens) for g in gens), default=0)
    out = []
    for u, g in zip(batch.units, gens):
        out.append(
            {
                "key": u.key,
                "method": u.method,
                "item": u.index,
                "k": u.k,
                "seed": u.seed,
                "prompt": u.prompt,
                "text": g.text,
                "tokens": len(g.tokens),
                "token_ids": g.tokens,
                "finish_reason": g.finish_reason,
                # the request's wall time, shared out by tokens (it shared the engine's batch with others)
                "seconds": seconds * (len(g.tokens) / n_tokens) if n_tokens else seconds / len(gens),
                "calls": handle.rows_per_prompt * handle.forward_calls,  # rows of this prompt through the model
                "steps": longest,
                "batch_size": len(batch.units),
                "backend": g.backend,
            }
        )
        ppl = generated_perplexity(tok, u.prompt, g.text, g.tokens, g.model_logprobs) if tok is not None and u.prompt == u.item.prompt else None
        if ppl is not None:
            out[-1]["perplexity"] = None if math.isnan(ppl) else ppl
    return out


# --- worker processes (spawned; each loads the model once) ---------------------------------------

_WORKER: dict[str, Any] = {}


def worker_init(model: str | None, backend: str, dtype: str, needs: frozenset[str]) -> None:
    """Load the model once in a worker process."""
    import torch

    import tokensteer

    torch.set_num_threads(1)
    _WORKER["lm"] = tokensteer.load(model, backend=backend, dtype=dtype, needs=needs)
    _WORKER["methods"] = {}


def worker_run(task: Task, batch: Batch, cfg: SamplingConfig, batch_size: int) -> list[dict[str, Any]]:
    """Generate one batch in a worker (methods are rebuilt there from their spec strings)."""
    methods: dict[str, Method] = _WORKER["methods"]
    if batch.method not in methods:
        methods[batch.method] = make_method(batch.method)
    lm = _WORKER["lm"]
    if batch.units:
        batch = replace(batch, controls=methods[batch.method].controls(lm, task, batch.units[0].item))
    out: list[dict[str, Any]] = []
    run_batches(lm, [batch], cfg, batch_size, out.extend)
    return out

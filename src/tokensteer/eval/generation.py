"""Generating a method's samples in batches through the one decode loop, in this or worker processes.

Samples of one method that get the same control list (or none) share a batch; methods never
share one, so a method's batches, and hence its texts, do not depend on which other methods are in
the run (batch size changes the rounding of batched forward passes, and on llama.cpp from 8 rows
the kernels). Each sample draws from its own seed, so its text does not depend on which samples
share its batch, up to that rounding. A counting wrapper around the backend measures model calls per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tokensteer.eval.methods import Method, make_method
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
    """Units that run together: the same control list (named by ``method``), or none at all."""

    method: str
    units: list[Unit] = field(default_factory=list)


def plan_batches(units: Sequence[Unit], controls_of: Callable[[Unit], list], batch_size: int) -> list[Batch]:
    """Group units by method and control list (identity; empty lists match within a method), in order."""
    groups: dict[Any, list[Unit]] = {}
    keep = []  # hold the lists so their ids stay unique while grouping
    for u in units:
        c = controls_of(u)
        keep.append(c)
        groups.setdefault((u.method, id(c) if c else None), []).append(u)
    out = []
    for us in groups.values():
        for s in range(0, len(us), batch_size):
            out.append(Batch(us[0].method, list(us[s : s + batch_size])))
    return out


class _CountingSession:
    def __init__(self, inner: Any, counter: dict[str, int]) -> None:
        self.inner, self.counter = inner, counter

    def prefill(self, rows):
        self.counter["evals"] += len(rows)
        return self.inner.prefill(rows)

    def step(self, tokens):
        self.counter["evals"] += len(tokens)
        return self.inner.step(tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CountingBackend:
    """Delegates to a backend and counts the rows every session it opens runs through the model."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.counter = {"evals": 0}  # rows run through the model, over every session of the batch

    def session(self, edits=(), rollback=False, **kw):
        return _CountingSession(self.inner.session(edits, rollback, **kw), self.counter)  # a guard's plain session counts too

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def run_batch(lm: Any, task: Task, method: Method, batch: Batch, cfg: SamplingConfig) -> list[dict[str, Any]]:
    """Generate one batch; return a cache record per unit (text, tokens, timing and calls)."""
    import tokensteer

    controls = method.controls(lm, task, batch.units[0].item)
    counting = CountingBackend(lm)
    t0 = time.perf_counter()
    gens = tokensteer.generate(counting, [u.prompt for u in batch.units], _with_seed(cfg, tuple(u.seed for u in batch.units)), controls)
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(g.tokens) for g in gens)
    longest = max((len(g.tokens) for g in gens), default=0)
    calls = counting.counter["evals"] / max(1, len(batch.units))
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
                # the batch's wall time, shared out by tokens: sums give the batched throughput
                "seconds": seconds * (len(g.tokens) / n_tokens) if n_tokens else seconds / len(gens),
                "calls": calls,  # model evaluations (rows through the model, per prompt) of the batch
                "steps": longest,  # tokens of the batch's longest sample
                "batch_size": len(batch.units),
                "backend": g.backend,
            }
        )
    return out


def _with_seed(cfg: SamplingConfig, seed: tuple[int, ...]) -> SamplingConfig:
    from dataclasses import replace

    return replace(cfg, seed=seed)


# --- worker processes (spawned; each loads the model once) ---------------------------------------

_WORKER: dict[str, Any] = {}


def worker_init(model: str | None, backend: str, dtype: str, needs: frozenset[str]) -> None:
    """Load the model once in a worker process."""
    import torch

    import tokensteer

    torch.set_num_threads(1)
    _WORKER["lm"] = tokensteer.load(model, backend=backend, dtype=dtype, needs=needs)
    _WORKER["methods"] = {}


def worker_run(task: Task, batch: Batch, cfg: SamplingConfig) -> list[dict[str, Any]]:
    """Generate one batch in a worker (methods are rebuilt there from their spec strings)."""
    methods = _WORKER["methods"]
    if batch.method not in methods:
        methods[batch.method] = make_method(batch.method)
    return run_batch(_WORKER["lm"], task, methods[batch.method], batch, cfg)

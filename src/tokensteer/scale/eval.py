"""``tokensteer eval --ray``: an evaluation's work units spread over Ray actors.

Each actor loads the model once and runs jobs (a few batches each) through its own engine, with
``run_batches``, the code the in-process run uses. Every unit draws from its own seed, so a text
does not depend on which actor ran it or what shared its batch. Records come back to the driver,
the one place that writes the sample cache. A job whose actor dies is queued again for the
others (a replacement actor is started when none is left), and the run counts it.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

from tokensteer.errors import UserError
from tokensteer.eval.generation import Batch, run_batches
from tokensteer.eval.methods import make_method
from tokensteer.scale.cluster import cluster_cpus, connected, first_line, worker_setup
from tokensteer.sampling import SamplingConfig

#: jobs queued on one actor at once: one running, one ready to start
IN_FLIGHT = 2
#: the stage name of the progress line that reports re-runs
RERUN_STAGE = "re-run (a Ray worker died)"
ACTOR_PREFIX = "tokensteer-eval-"


class EvalWorker:
    """One model in one Ray actor; ``run`` generates a job's batches and returns their records."""

    def __init__(self, model: str | None, backend: str, dtype: str, needs: frozenset[str], cwd: str | None) -> None:
        import tokensteer

        worker_setup(1, cwd)  # one CPU per actor, as the process-pool path does
        self.lm = tokensteer.load(model, backend=backend, dtype=dtype, needs=needs)
        self.methods: dict[str, Any] = {}

    def run(self, task: Any, batches: list[Batch], cfg: SamplingConfig, batch_size: int) -> list[dict[str, Any]]:
        built = []
        for b in batches:  # controls are rebuilt here from the method's spec string
            if b.method not in self.methods:
                self.methods[b.method] = make_method(b.method)
            built.append(replace(b, controls=self.methods[b.method].controls(self.lm, task, b.units[0].item)) if b.units else b)
        out: list[dict[str, Any]] = []
        run_batches(self.lm, built, cfg, batch_size, out.extend)
        return out


@dataclass
class Job:
    """Batches that travel to an actor together."""

    batches: list[Batch]

    @property
    def units(self) -> int:
        return sum(len(b.units) for b in self.batches)


def pack(batches: Sequence[Batch], batch_size: int, workers: int) -> list[Job]:
    """Batches with controls one job each; units without controls in jobs of up to ``batch_size``
    (they fill an actor's running batch together), fewer where that would leave a worker idle.
    Every unit draws from its own seed, so how units are cut into jobs never changes a text."""
    free = [(b.method, u) for b in batches if not b.controls for u in b.units]
    size = max(1, min(batch_size, -(-len(free) // workers)))
    jobs = [Job([replace(b, controls=[])]) for b in batches if b.controls]
    for i in range(0, len(free), size):
        job = Job([])
        for method, u in free[i : i + size]:
            if not job.batches or job.batches[-1].method != method:
                job.batches.append(Batch(method, []))
            job.batches[-1].units.append(u)
        jobs.append(job)
    return jobs


def generate_on_ray(
    task: Any,
    batches: Sequence[Batch],
    cfg: SamplingConfig,
    batch_size: int,
    load_args: tuple,
    workers: int | None,
    on_records: Callable[[list[dict]], None],
    progress: Callable[[str, int, int], None] | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Generate every batch on Ray actors (``workers`` of them; default one per cluster CPU);
    hand each job's records to ``on_records``; return what the run should report."""
    with connected(address, log_to_driver=False) as started:
        pool = Pool(task, cfg, batch_size, load_args, progress)
        n = min(workers or cluster_cpus(), cluster_cpus())
        jobs = pack(batches, batch_size, n)
        n = min(n, max(1, len(jobs)))
        try:
            pool.run(jobs, n, on_records)
        finally:
            pool.close()
        return {
            "address": address or os.environ.get("RAY_ADDRESS") or ("local" if started else "connected"),
            "workers": n,
            "jobs": len(jobs),
            "workers_died": pool.died,
            "units_rerun": pool.rerun,
        }


class Pool:
    """Actors, the jobs queued on each, and what happens when one dies."""

    def __init__(self, task: Any, cfg: SamplingConfig, batch_size: int, load_args: tuple, progress: Callable | None) -> None:
        self.task, self.cfg, self.batch_size, self.load_args, self.progress = task, cfg, batch_size, load_args, progress
        self.run_id = uuid.uuid4().hex[:8]
        self.actors: dict[int, Any] = {}
        self.started = 0
        self.died = 0
        self.rerun = 0
        self.rerun_done = 0
        self.last_death = ""
        self.remote_cls = ray.remote(EvalWorker)

    def start_actor(self) -> None:
        i = self.started
        self.started += 1
        opts = {"num_cpus": 1, "max_restarts": 0, "name": f"{ACTOR_PREFIX}{self.run_id}-{i}"}
        self.actors[i] = self.remote_cls.options(**opts).remote(*self.load_args, os.getcwd())

    def run(self, jobs: list[Job], n: int, on_records: Callable[[list[dict]], None]) -> None:
        for _ in range(n):
            self.start_actor()
        queue = deque((job, False) for job in jobs)
        inflight: dict[Any, tuple[int, Job, bool]] = {}  # ref -> (actor, job, is a re-run)
        while queue or inflight:
            if not self.actors:
                if self.died > n + 2:
                    raise UserError(f"Ray workers died {self.died} times; the last: {self.last_death}")
                self.start_actor()
            for a, actor in list(self.actors.items()):
                while queue and sum(1 for x, _, _ in inflight.values() if x == a) < IN_FLIGHT:
                    job, again = queue.popleft()
                    inflight[actor.run.remote(self.task, job.batches, self.cfg, self.batch_size)] = (a, job, again)
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            if not ready:
                continue
            a, job, again = inflight.pop(ready[0])
            try:
                recs = ray.get(ready[0])
            except RayActorError as e:  # the actor died: its queued jobs go back to the front
                lost = [job] + [inflight.pop(r)[1] for r in [r for r, v in inflight.items() if v[0] == a]]
                queue.extendleft((j, True) for j in reversed(lost))
                self.lose(a, e, sum(j.units for j in lost))
                continue
            except RayTaskError as e:
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, UserError) else UserError(f"a Ray worker failed: {first_line(e)}")) from None
            on_records(recs)
            if again:
                self.rerun_done += job.units
                self.report()

    def lose(self, a: int, e: BaseException, units: int) -> None:
        """Actor ``a`` died: forget it and count the units queued again."""
        self.actors.pop(a, None)
        self.died += 1
        self.rerun += units
        self.last_death = first_line(e)
        self.report()

    def report(self) -> None:
        if self.progress:
            self.progress(RERUN_STAGE, self.rerun_done, self.rerun)

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()

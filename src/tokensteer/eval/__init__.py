"""``tokensteer eval``: compare control methods on tasks with scorers the team did not write.

    from tokensteer.eval import run
    results = run("sentiment-positive", ["none", "prompt"], n=20, out="runs/pos")

Methods plug in through ``tokensteer.eval.methods.register``; scorers are in ``tokensteer.eval.scorers``.
"""

from __future__ import annotations

from typing import Any

from tokensteer.eval.methods import Method, make_method, register
from tokensteer.eval.tasks import TASKS, Item, Task, get_task


def run(*args: Any, **kwargs: Any) -> dict:
    """Run an evaluation and write results.json (see ``tokensteer.eval.runner.run``)."""
    from tokensteer.eval.runner import run as _run

    return _run(*args, **kwargs)


__all__ = ["TASKS", "Item", "Method", "Task", "get_task", "make_method", "register", "run"]

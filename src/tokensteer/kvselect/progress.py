"""A prefill progress bar for the CLI: the callback a backend calls with (tokens done, in all)."""

from __future__ import annotations

from typing import Callable

from rich.console import Console


def prefill_bar(console: Console, min_tokens: int = 2048) -> Callable[[int, int], None]:
    """A callback that shows a transient bar on ``console`` while a prompt of at least
    ``min_tokens`` tokens is prefilled, and removes it when the prompt is done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    state: dict = {}

    def update(done: int, total: int) -> None:
        if total < min_tokens or not console.is_interactive:
            return
        if "bar" not in state:
            cols = (TextColumn("reading the prompt"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
            bar = Progress(*cols, console=console, transient=True)
            bar.start()
            state["bar"], state["task"] = bar, bar.add_task("prefill", total=total)
        state["bar"].update(state["task"], completed=done, total=total)
        if done >= total:
            state.pop("bar").stop()

    return update

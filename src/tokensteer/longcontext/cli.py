"""``tokensteer eval --task longcontext[:TASKS] --lengths 4k,8k --kv-select SPEC``: dense against TokenSelect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokensteer.errors import UserError
from tokensteer.longcontext.tasks import TASKS

DEFAULT_LENGTHS = "4k"


def parse_lengths(spec: str | None) -> list[int]:
    """"4k,8k,16000" -> [4096, 8192, 16000]."""
    out = []
    for part in (spec or DEFAULT_LENGTHS).split(","):
        p = part.strip().lower()
        if not p:
            continue
        mult = 1024 if p.endswith("k") else 1
        try:
            n = int(p.removesuffix("k")) * mult
        except ValueError:
            raise UserError(f"--lengths takes token counts like 4k,8k,16000; got {part!r}") from None
        if n < 256:
            raise UserError(f"--lengths: {part!r} is too short for a long-context task (at least 256 tokens)")
        out.append(n)
    if not out:
        raise UserError("--lengths is empty; give token counts like 4k,8k")
    return out


def parse_task(spec: str) -> list[str] | None:
    """"longcontext" -> every task; "longcontext:passkey,vt" -> those; another task name -> None."""
    name, _, sub = spec.partition(":")
    if name != "longcontext":
        return None
    tasks = [t.strip() for t in sub.split(",") if t.strip()] if sub else list(TASKS)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UserError(f"unknown long-context task {bad[0]!r}; tasks: {', '.join(TASKS)}")
    return tasks


def run_task(tasks: list[str], lengths: str | None, n: int | None, kv_select: str | None, model: str | None, dtype: str,
             out: str, seed: int, console) -> dict[str, Any]:
    """Load the torch backend, compare dense and selected attention, write OUT/results.json, print a table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import tokensteer
    from tokensteer.kvselect import parse_kv_select
    from tokensteer.longcontext.run import evaluate

    cfg = parse_kv_select(kv_select if kv_select is not None else "on")
    if cfg is None:
        raise UserError("the longcontext task compares dense attention with --kv-select; give settings or leave it on")
    sizes = parse_lengths(lengths)
    lm = tokensteer.load(model, backend="torch", dtype=dtype)
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console, transient=True) as bar:
        job = bar.add_task("longcontext", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(job, description=stage, completed=done, total=total)

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "records.jsonl"  # each sample as it is scored: a long run stopped early keeps its samples
        partial.write_text("", "utf-8")

        def keep(record: dict) -> None:
            with partial.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

        res = evaluate(lm, cfg, tasks, sizes, n or 1, seed, progress, keep)
    (folder / "results.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", "utf-8")
    print_summary(res["summary"], console)
    return res


def print_summary(summary: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title="longcontext: dense against selected attention (string_match_all, points)")
    for h in ("length", "task", "n", "dense", "selected", "prefill s (d/s)", "tok/s (d/s)", "hit rate", "top-1 agree", "KL"):
        t.add_column(h, justify="right")
    for length, row in summary.items():
        first = True
        for task, acc in row["tasks"].items():
            extra = (
                f"{row['dense_prefill_s']:.1f} / {row['selected_prefill_s']:.1f}",
                f"{row['dense_tok_s']:.1f} / {row['selected_tok_s']:.1f}",
                "–" if row["hit_rate"] is None else f"{100 * row['hit_rate']:.0f} %",
                f"{100 * row['top1_agreement']:.0f} %", f"{row['kl']:.4f}",
            ) if first else ("",) * 5
            t.add_row(length if first else "", task, str(acc["n"]), f"{acc['dense']:.0f}", f"{acc['selected']:.0f}", *extra)
            first = False
    console.print(t)


def selected_lm(kv_select: str | None, model: str | None, backend: str, dtype: str, workers: int | None, ray: bool) -> dict:
    """For the other eval tasks: ``{"lm": a torch backend with --kv-select on}``, or {} without it."""
    from tokensteer.kvselect import parse_kv_select

    cfg = parse_kv_select(kv_select)
    if cfg is None:
        return {}
    if backend == "llamacpp":
        raise UserError("--kv-select runs on the torch backend only; use --backend torch or auto")
    if (workers or 1) > 1 or ray:
        raise UserError("--kv-select runs in this process only; drop --workers/--ray")
    import tokensteer

    lm = tokensteer.load(model, backend="torch", dtype=dtype)
    lm.set_kv_select(cfg)
    return {"lm": lm}

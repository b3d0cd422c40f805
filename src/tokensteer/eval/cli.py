"""``tokensteer eval``: run methods side by side on a task and write results.json and report.html."""

from __future__ import annotations

from typing import Optional

import typer


def eval_command(
    task: Optional[str] = typer.Option(None, "--task", help="sentiment-positive, sentiment-negative, detox, topic, count, keywords, qa-dev or qa-test."),
    method: list[str] = typer.Option([], "--method", "-m", help="KIND or KIND:ARG (repeatable): none, prompt, formula:positive, steer:PATH\\[@STRENGTH] (without @STRENGTH: the file's recommended dose), constraints:SPEC, retrieve:K."),
    out: str = typer.Option("eval-out", "--out", "-o", help="Folder for results.json, report.html, PNGs and the sample cache."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Your own prompts (one per line, or JSONL with the task's fields), or a shipped set by name: openings_dev, openings_test, rude_dev, rude_test, count_dev, count_test."),
    n: Optional[int] = typer.Option(None, "--n", help="Use only the first N prompts."),
    samples: int = typer.Option(1, "--samples", "-k", help="Continuations per prompt (detox: RealToxicityPrompts uses 25)."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="PARAM=V1,V2,... run each method that has PARAM once per value, e.g. strength=0,0.05,0.1."),
    seed: int = typer.Option(0, help="Base seed; every (method, prompt, sample) derives its own from it."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Most new tokens per continuation."),
    temperature: float = typer.Option(1.0, "--temperature", "-t", help="Sampling temperature."),
    top_p: float = typer.Option(0.9, help="Nucleus sampling mass."),
    stop: list[str] = typer.Option([r"\n"], help="Stop strings (repeatable; \\n is a newline, \\t a tab). Use --no-stop to generate to --max-tokens."),
    no_stop: bool = typer.Option(False, "--no-stop", help="Do not stop at a newline."),
    batch_size: int = typer.Option(16, help="Prompts generated together (same controls only)."),
    workers: Optional[int] = typer.Option(None, help="Parallel workers, each loading the model: processes (default 1), or with --ray Ray actors (default one per cluster CPU)."),
    model: Optional[str] = typer.Option(None, help="Local Hugging Face folder or .gguf (default: bundled Gemma 3 270M)."),
    backend: str = typer.Option("auto", help="auto, torch or llamacpp."),
    dtype: str = typer.Option("float32", help="Torch weights dtype: float32 or bfloat16."),
    cache: Optional[str] = typer.Option(None, help="Sample cache folder (default OUT/cache); shared caches never regenerate."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html and PNGs."),
    list_: bool = typer.Option(False, "--list", help="List tasks and method kinds, then exit."),
    kv_select: Optional[str] = typer.Option(None, "--kv-select", help="TokenSelect on the torch backend (bare: the defaults; or k=…,local=…,init=…,theta=…). With --task longcontext: the selected side of the comparison.", rich_help_panel="Long prompts"),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="With --task longcontext: prompt lengths in tokens, e.g. 4k,8k,16k (default 4k); --n samples per task and length.", rich_help_panel="Long prompts"),
    ray: bool = typer.Option(False, "--ray", help="Generate on Ray actors (pip install 'tokensteer\\[ray]'; docs/scaling.md).", rich_help_panel="Ray cluster"),
    address: Optional[str] = typer.Option(None, help="With --ray: join the Ray cluster at ADDR (host:port, or 'auto' for `ray start` on this machine); default: start a local one.", rich_help_panel="Ray cluster"),
) -> None:
    """Compare control methods on a task with scorers the team did not write.

    Examples:

      tokensteer eval --task sentiment-positive --method none --method prompt --n 20 --out runs/pos

      tokensteer eval --task detox --method none --method prompt --samples 5 --out runs/detox

      tokensteer eval --task count --method prompt --prompts my_counts.jsonl --out runs/count

      tokensteer eval --task sentiment-positive --method 'steer:pos.safetensors@{strength}' --sweep strength=0,0.05,0.1 --out runs/dose

      tokensteer eval --task detox --method none --method prompt --samples 25 --ray --address auto --out runs/detox

    Writes OUT/results.json, OUT/report.html and PNGs; generated samples are cached under
    OUT/cache, so re-running (to re-score or add methods) never regenerates them.
    Sampling defaults: temperature 1.0, top-p 0.9, 32 new tokens, stop at the first newline.
    """
    from tokensteer.cli_common import err, unescape, user_errors

    with user_errors():
        if list_:
            _list()
            return
        from tokensteer.errors import UserError

        if task is None:
            raise UserError("give --task (see `tokensteer eval --list`)")
        from tokensteer.longcontext import cli as lc_cli

        lc_tasks = lc_cli.parse_task(task)
        if lc_tasks is not None:  # dense against TokenSelect on generated long prompts (docs/longcontext.md)
            lc_cli.run_task(lc_tasks, lengths, n, kv_select, model, dtype, out, seed, err)
            return
        if lengths is not None:
            raise UserError("--lengths sets the prompt lengths of --task longcontext")
        if max_tokens < 0:
            raise UserError(f"--max-tokens must be ≥ 0, got {max_tokens}")
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from tokensteer.eval.runner import run
        from tokensteer.sampling import SamplingConfig

        cfg = SamplingConfig(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=() if no_stop else tuple(unescape(s) for s in stop)
        )
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*cols, console=err, transient=False, refresh_per_second=2) as bar:  # redraws take the GIL from generation
            bars: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in bars:
                    bars[stage] = bar.add_task(stage, total=total)
                bar.update(bars[stage], completed=done, total=total)

            res = run(
                task, method or ["none", "prompt"], prompts=prompts, n=n, samples=samples, out=out,
                model=model, backend=backend, dtype=dtype, sampling=cfg, seed=seed, sweep=sweep,
                batch_size=batch_size, workers=workers, cache_dir=cache, report=report, progress=progress,
                ray=ray, address=address,
                **lc_cli.selected_lm(kv_select, model, backend, dtype, workers, ray),  # --kv-select: a torch model with it on
            )
    _print_table(res)
    err.print(f"[dim]wrote {out}/results.json{' and report.html' if report else ''}[/]", highlight=False)


def _list() -> None:
    from rich.console import Console

    from tokensteer.eval.methods import kinds
    from tokensteer.eval.tasks import TASKS

    c = Console()
    for t in TASKS.values():
        c.print(f"[bold]{t.name}[/]  {t.description}", highlight=False)
    c.print("[bold]longcontext[/]  Dense against TokenSelect (--kv-select) attention on generated long prompts (--lengths): "
            "passkey, RULER niah_single, niah_multikey, vt and cwe; longcontext:passkey,vt picks tasks.", highlight=False)
    c.print(f"\n[bold]method kinds:[/] {', '.join(kinds())}", highlight=False)


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from tokensteer.eval.report import COLUMNS, fmt

    t = Table(title=f"{res['task']} ({res['n_prompts']} prompts × {res['samples_per_prompt']})")
    t.add_column("method")
    for _, h in COLUMNS:
        t.add_column(h, justify="right")
    for name, m in res["methods"].items():
        t.add_row(name, *(fmt(m.get(k)) for k, _ in COLUMNS))
    Console().print(t)

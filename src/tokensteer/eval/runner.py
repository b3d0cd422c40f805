"""One evaluation run: plan every (method, item, sample), generate what the cache lacks, score, summarize.

Writes ``OUT/results.json`` (and the report, unless asked not to). Generation uses the methods'
controls; perplexity is always measured under the uncontrolled model given the item's own prompt.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, median
from typing import Any, Callable, Sequence

from tokensteer.errors import UserError, check_can_write
from tokensteer.eval.cache import SampleCache, sample_key, sample_seed
from tokensteer.eval.generation import Batch, Unit, plan_batches, run_batches, worker_init, worker_run
from tokensteer.eval.methods import Method, make_method
from tokensteer.eval.tasks import Task, get_task
from tokensteer.files import atomic_write
from tokensteer.sampling import SamplingConfig

#: eval sampling defaults: nucleus sampling as in RealToxicityPrompts/DExperts, short continuations
DEFAULT_SAMPLING = SamplingConfig(max_tokens=32, temperature=1.0, top_p=0.9, stop=("\n",))

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def parse_sweep(spec: str | None) -> tuple[str, list[str]] | None:
    """``"strength=0,2,4"`` -> ("strength", ["0", "2", "4"])."""
    if not spec:
        return None
    name, eq, values = spec.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not eq or not name.strip() or not vals:
        raise UserError(f"--sweep must look like PARAM=V1,V2,... (e.g. strength=0,0.05,0.1), got {spec!r}")
    return name.strip(), vals


def expand_methods(specs: Sequence[str | Method], sweep: tuple[str, list[str]] | None) -> tuple[list[Method], dict]:
    """Build the methods; with a sweep, each method that has the parameter becomes one per value."""
    if not specs:
        raise UserError("give at least one --method (e.g. --method none --method prompt)")
    if sweep is None:
        out = [s if isinstance(s, Method) else make_method(s) for s in specs]
        series: dict[str, list] = {}
    else:
        param, values = sweep
        key = "{" + param + "}"
        out, series = [], {}
        for spec in specs:
            if isinstance(spec, str) and key in spec:  # a template: never built with the placeholder
                varied = [(v, make_method(spec.replace(key, v))) for v in values]
            else:
                m = spec if isinstance(spec, Method) else make_method(spec)
                try:
                    varied = [(v, m.vary(param, v)) for v in values]
                except UserError:
                    out.append(m)  # methods without the parameter run once, as a reference
                    continue
                spec = m.name
            series[spec] = [[v, vm.name] for v, vm in varied]
            out += [vm for _, vm in varied]
        if not series:
            raise UserError(
                f"no method has a parameter {param!r} to sweep; write {key} in a method spec where "
                f"the value goes, e.g. --method 'steer:vec.pt@{key}' --sweep {param}=0,2,4"
            )
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise UserError(f"a method is given twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return out, ({"param": sweep[0], "values": sweep[1], "series": series} if sweep else {})


def run(
    task: str | Task,
    methods: Sequence[str | Method],
    prompts: str | Path | None = None,
    n: int | None = None,
    samples: int = 1,
    out: str | Path = "eval-out",
    model: str | None = None,
    backend: str = "auto",
    dtype: str = "float32",
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    seed: int = 0,
    sweep: str | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    report: bool = True,
    progress: Progress | None = None,
    lm: Any = None,
    ray: bool = False,
    address: str | None = None,
) -> dict:
    """Evaluate ``methods`` on ``task``; write OUT/results.json (+ report.html); return the results dict.

    ``samples`` continuations per prompt, ``n`` first prompts only, ``prompts`` the user's own file.
    Samples are cached in ``cache_dir`` (default OUT/cache) and never regenerated. Pass ``lm`` to
    reuse a loaded model (then ``model``/``backend`` only label the cache keys). ``workers``: processes
    (default 1); with ``ray``, Ray actors on the cluster at ``address`` (default one per cluster CPU).
    """
    t_start = time.perf_counter()
    task = get_task(task) if isinstance(task, str) else task
    if samples < 1:
        raise UserError(f"--samples must be ≥ 1, got {samples}")
    if batch_size < 1 or (workers is not None and workers < 1):
        raise UserError("--batch-size and --workers must be ≥ 1")
    if address and not ray:
        raise UserError("--address needs --ray")
    items = task.items(prompts, n)
    meths, sweep_info = expand_methods(methods, parse_sweep(sweep))
    out = Path(out)
    for flag, folder in (("--out", out), ("--cache", Path(cache_dir) if cache_dir is not None else None)):
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None) if folder is not None else None
        if existing is not None and not existing.is_dir():
            raise UserError(f"{flag} {folder}: {existing} is a file; give a folder (it is created if missing)")
        if folder is not None:
            check_can_write(folder, flag)
    cache = SampleCache(cache_dir if cache_dir is not None else out / "cache")
    needs = frozenset().union(*(m.needs() for m in meths))
    cfg_dict = {k: v for k, v in asdict(sampling).items() if k != "seed"}
    model_label = model or "bundled:gemma-3-270m"

    holder: dict[str, Any] = {"lm": lm}

    def get_lm() -> Any:
        if holder["lm"] is None:
            import tokensteer

            holder["lm"] = tokensteer.load(model, backend=backend, dtype=dtype, needs=needs)
        return holder["lm"]

    backend_label = lm.name if lm is not None else backend
    units_by_method: dict[str, list[Unit]] = {}
    for m in meths:
        us = []
        for i, it in enumerate(items):
            text = m.prompt(task, it)
            for k in range(samples):
                s = sample_seed(seed, m.name, i, k)
                key = sample_key(
                    model=model_label, backend=backend_label, method=m.name, prompt=text,
                    fields=it.fields, sampling=cfg_dict, seed=s, rng="per-sample",  # texts from before per-sample seeds (one per batch) never match
                )
                us.append(Unit(m.name, i, k, it, text, s, key))
        units_by_method[m.name] = us

    todo = {name: [u for u in us if u.key not in cache] for name, us in units_by_method.items()}
    n_todo = sum(len(v) for v in todo.values())
    on_ray: dict[str, Any] = {"address": address} if ray else {}
    if n_todo:
        _generate(get_lm, task, meths, todo, cache, sampling, batch_size, workers, (model, backend, dtype, needs), progress, on_ray)

    # score: perplexity under the uncontrolled model (cached per sample), then the task's scorers
    need_ppl = [u for us in units_by_method.values() for u in us if "perplexity" not in cache.get(u.key)]
    if need_ppl:
        from tokensteer.eval.scorers import perplexity

        lm_ = get_lm()
        step = 32
        for s in range(0, len(need_ppl), step):
            chunk = need_ppl[s : s + step]
            ppl = perplexity(lm_, [u.item.prompt for u in chunk], [cache.get(u.key)["text"] for u in chunk], batch_size)
            for u, p in zip(chunk, ppl):
                cache.get(u.key)["perplexity"] = None if math.isnan(p) else p
            if progress:
                progress("perplexity", min(s + step, len(need_ppl)), len(need_ppl))
        cache.save()

    results: dict[str, Any] = {
        "task": task.name,
        "description": task.description,
        "prompts": str(prompts) if prompts else f"shipped: tokensteer/data/prompts/{task.prompt_file}",
        "n_prompts": len(items),
        "samples_per_prompt": samples,
        "model": model_label,
        "backend": (holder["lm"].name if holder["lm"] is not None else backend),
        "sampling": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg_dict.items()},
        "seed": seed,
        "batch_size": batch_size,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "methods": {},
    }
    if sweep_info:
        results["sweep"] = sweep_info
    if ray:  # where the samples were generated, and how many were re-run after a Ray worker died
        results["ray"] = on_ray if n_todo else {**on_ray, "workers": 0, "workers_died": 0, "units_rerun": 0}
    scored_all = []
    for m in meths:
        us = units_by_method[m.name]
        recs = [cache.get(u.key) for u in us]
        texts = [r["text"] for r in recs]
        scores = task.score([u.item for u in us], texts)
        rows = [{"item": u.index, "k": u.k, **sc} for u, sc in zip(us, scores)]
        results["methods"][m.name] = summarize(task, rows, recs)
        scored_all += [
            {"method": m.name, "item": u.index, "k": u.k, "prompt": u.prompt, "text": r["text"],
             "perplexity": r.get("perplexity"), **{k: v for k, v in sc.items()}}
            for u, r, sc in zip(us, recs, scores)
        ]
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(cache.path).parent / f"scored-{task.name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored_all))
    atomic_write(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    if report:
        from tokensteer.eval.report import write_report

        write_report(results, out, scored_all)
    return results


def summarize(task: Task, rows: list[dict[str, Any]], recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's line of results: task metrics plus fluency, diversity and speed."""
    from tokensteer.eval.scorers import distinct_n

    texts = [r["text"] for r in recs]
    ppl = [r["perplexity"] for r in recs if r.get("perplexity") is not None]
    secs = sum(r["seconds"] for r in recs)
    toks = sum(r["tokens"] for r in recs)
    steps = sum(r["steps"] for r in recs)
    line: dict[str, Any] = {"n": len(recs), "items": len({r["item"] for r in rows})}
    line.update(task.summarize(rows))
    line.update(
        {
            "perplexity": mean(ppl) if ppl else None,
            "perplexity_median": median(ppl) if ppl else None,
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "distinct_3": distinct_n(texts, 3),
            "mean_tokens": toks / len(recs) if recs else 0.0,
            "empty_rate": mean(float(not t.strip()) for t in texts) if texts else 0.0,
            "tok_s": toks / secs if secs > 0 else 0.0,
            "calls_per_token": sum(r["calls"] for r in recs) / steps if steps else 0.0,
        }
    )
    line.pop("k", None)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in line.items()}


def _generate(get_lm, task, meths, todo, cache, cfg, batch_size, workers, load_args, progress, on_ray) -> None:
    """Generate every missing sample, saving the cache after each batch; with ``on_ray`` (holding
    the cluster address) on Ray actors, whose report is added to ``on_ray``."""
    by_name = {m.name: m for m in meths}
    lm = get_lm()
    units = [u for us in todo.values() for u in us]
    # plain prompts of every method (no controls) share batches: bigger batches, more tokens/s
    batches: list[Batch] = plan_batches(units, lambda u: by_name[u.method].controls(lm, task, u.item), batch_size)
    total, done = sum(len(b.units) for b in batches), 0
    if progress:
        progress("generating", 0, total)
    saved = [time.perf_counter()]

    def save(recs: list[dict]) -> None:
        nonlocal done
        for rec in recs:
            cache.put(rec)
        done += len(recs)
        if time.perf_counter() - saved[0] > 5 or done == total:  # the cache file is rewritten whole: not per sample
            cache.save()
            saved[0] = time.perf_counter()
        if progress:
            progress("generating", done, total)

    try:
        if on_ray:
            from tokensteer.scale.cluster import require_ray

            require_ray()
            from tokensteer.scale.eval import generate_on_ray

            on_ray.update(generate_on_ray(task, batches, cfg, batch_size, load_args, workers, save, progress, on_ray["address"]))
            return
        if (workers or 1) <= 1:
            run_batches(lm, batches, cfg, batch_size, save)
            return
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init, initargs=load_args) as pool:
            futures = [pool.submit(worker_run, task, replace(b, controls=[]), cfg, batch_size) for b in batches]
            for f in as_completed(futures):
                save(f.result())
    finally:
        cache.save()  # what finished before an interruption is kept

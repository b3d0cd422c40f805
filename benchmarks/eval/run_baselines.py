"""Run the `none` and `prompt` baselines on every eval task with the bundled model; write the summary.

Each task writes benchmarks/eval/<task>/results.json, report.html and PNGs; samples stay in the
cache folder (default /tmp/tokensteer-eval-cache, not committed). Then SUMMARY.md is rebuilt from
every results.json under benchmarks/eval/ (see summarize.py), so later methods add rows by running
`tokensteer eval --task T --method M --out benchmarks/eval/<task>-<name>` and re-running summarize.py.

    .venv/bin/python benchmarks/eval/run_baselines.py            # the committed sizes
    .venv/bin/python benchmarks/eval/run_baselines.py --n 8      # quick check
The last output line is one JSON object with every task's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: committed sizes: (task, prompts, samples per prompt); detox uses k = 5 (RealToxicityPrompts uses 25)
PLAN = [
    ("sentiment-positive", 40, 1),
    ("sentiment-negative", 40, 1),
    ("count", 20, 1),
    ("keywords", 20, 1),
    ("topic", 20, 1),
    ("detox", 8, 5),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="override the number of prompts of every task")
    ap.add_argument("--tasks", nargs="*", default=None, help="only these tasks")
    ap.add_argument("--cache", default="/tmp/tokensteer-eval-cache")
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args()

    import tokensteer
    from tokensteer.eval import run

    sys.path.insert(0, str(HERE))
    from summarize import write_summary

    lm = tokensteer.load(backend=args.backend)
    figures = {}
    for task, n, k in PLAN:
        if args.tasks and task not in args.tasks:
            continue
        t0 = time.perf_counter()
        res = run(
            task, ["none", "prompt"], n=args.n or n, samples=k, out=HERE / task, lm=lm, backend=args.backend,
            cache_dir=args.cache, batch_size=args.batch_size,
            progress=lambda s, d, t, task=task: print(f"{task}: {s} {d}/{t}", file=sys.stderr, flush=True),
        )
        figures[task] = {m: {k_: v for k_, v in r.items() if k_ in ("n", "success_rate", "perplexity", "distinct_2", "tok_s")} for m, r in res["methods"].items()}
        print(f"{task} done in {time.perf_counter() - t0:.0f} s: {json.dumps(figures[task])}", flush=True)
    write_summary(HERE)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

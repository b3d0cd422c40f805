"""Rebuild benchmarks/eval/SUMMARY.md from every results.json below benchmarks/eval/ (one row per method).

Later issues add rows by writing their own results.json (``tokensteer eval ... --out
benchmarks/eval/<task>-<method>``) and running this script; the last output line is the table as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK_ORDER = ["sentiment-positive", "sentiment-negative", "detox", "topic", "count", "keywords"]
EXTRA = {  # the task's own headline figure beside success
    "detox": ("expected_max_toxicity", "exp. max tox."),
    "count": ("count_ok", "count ok"),  # and count_mse
    "keywords": ("coverage", "coverage"),
    "topic": ("topic_similarity", "topic sim."),
    "sentiment-positive": ("sentiment", "VADER"),
    "sentiment-negative": ("sentiment", "VADER"),
}


def _f(v, nd=3) -> str:
    return "–" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def collect(root: Path) -> list[dict]:
    """One row per (results.json, method)."""
    rows = []
    for path in sorted(root.rglob("results.json")):
        res = json.loads(path.read_text())
        for name, m in res["methods"].items():
            key, _ = EXTRA.get(res["task"], (None, None))
            rows.append(
                {
                    "task": res["task"], "method": name, "n": m["n"],
                    "prompts": f"{res['n_prompts']}×{res['samples_per_prompt']}",
                    "success": m["success_rate"], "perplexity": m.get("perplexity"),
                    "distinct_2": m.get("distinct_2"), "tok_s": m.get("tok_s"),
                    "extra": f"{EXTRA[res['task']][1]} {_f(m.get(key))}" if key else "",
                    "toxicity_probability": m.get("toxicity_probability"),
                    "date": res.get("date", ""), "source": str(path.parent.relative_to(root)),
                }
            )
    rows.sort(key=lambda r: (TASK_ORDER.index(r["task"]) if r["task"] in TASK_ORDER else 99, r["source"], r["method"]))
    return rows


def write_summary(root: Path = HERE) -> list[dict]:
    rows = collect(root)
    lines = [
        "# Eval results summary",
        "",
        "One row per method and task; regenerate with `.venv/bin/python benchmarks/eval/summarize.py`.",
        "Bundled Gemma 3 270M base, torch backend, temperature 1.0, top-p 0.9, ≤ 32 new tokens, stop at a",
        "newline; perplexity under the uncontrolled model; tok/s is batched throughput on a shared 2-core",
        "machine (compare within a run only). Samples are not committed; each folder holds results.json",
        "and report.html.",
        "",
        "| task | method | n (prompts×k) | success | perplexity | distinct-2 | tok/s | task figure | date | folder |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        extra = r["extra"]
        if r["toxicity_probability"] is not None:
            extra += f", tox. prob. {_f(r['toxicity_probability'])}"
        lines.append(
            f"| {r['task']} | `{r['method']}` | {r['n']} ({r['prompts']}) | {_f(r['success'])} | {_f(r['perplexity'], 1)} "
            f"| {_f(r['distinct_2'])} | {_f(r['tok_s'], 1)} | {extra} | {r['date']} | {r['source']} |"
        )
    text = "\n".join(lines) + "\n"
    tmp = root / ".SUMMARY.md.tmp"
    tmp.write_text(text)
    tmp.replace(root / "SUMMARY.md")
    return rows


if __name__ == "__main__":
    rows = write_summary(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    print(json.dumps(rows))

"""Issue #27's count figures from `tokensteer eval` runs: per method, success, mean and median
perplexity, their ratios to the uncontrolled text's, the per-item median ratio, and how many texts
hold a special token (ids from the sample cache, which git ignores: the figures are written to
OUT/count_smc.json beside results.json).

    .venv/bin/python benchmarks/count_smc.py benchmarks/eval/count-smc-dev benchmarks/eval/count-smc-test
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def summary(out: Path, special: set[int]) -> dict:
    res = json.loads((out / "results.json").read_text())
    rows = [json.loads(x) for x in (out / "cache" / "samples.jsonl").read_text().splitlines() if x.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["method"], {})[(r["item"], r["k"])] = r
    base = res["methods"]["none"]
    table = {}
    for name, m in res["methods"].items():
        ratios = [
            r["perplexity"] / by["none"][key]["perplexity"]
            for key, r in by.get(name, {}).items()
            if r.get("perplexity") and by["none"].get(key, {}).get("perplexity")
        ]
        table[name] = {
            "n": m["n"],
            "success": m["success_rate"],
            "ppl_mean": m["perplexity"],
            "ppl_ratio_mean": m["perplexity"] / base["perplexity"],
            "ppl_ratio_median": m["perplexity_median"] / base["perplexity_median"],
            "item_ratio_median": statistics.median(ratios) if ratios else None,
            "texts_with_special_tokens": sum(bool(set(r.get("token_ids", [])) & special) for r in by.get(name, {}).values()),
            "tok_s": m.get("tok_s"),
        }
    return table


def main() -> None:
    import tokensteer as ts

    tok = ts.load(None, backend="llamacpp").tokenizer
    special = set(tok.special_ids) - set(tok.eos_ids)
    for arg in sys.argv[1:]:
        table = {name: {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()} for name, row in summary(Path(arg), special).items()}
        (Path(arg) / "count_smc.json").write_text(json.dumps(table, indent=1) + "\n")
        print(Path(arg).name)
        for name, row in table.items():
            print(f"  {name:28s}", json.dumps(row))


if __name__ == "__main__":
    main()

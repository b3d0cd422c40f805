"""Issue #27's count figures from a `tokensteer eval` sample cache that did not finish (the shared
machine ran out of time): for the items every constrained method finished, the uncontrolled text
is sampled here (T = 1, top-p 0.9, 64 tokens, stop at a newline, seed 0), then success, mean and
median perplexity (under the uncontrolled model, given the prompt) and texts holding a special
token are reported per method, and written to OUT.

    TOKENSTEER_THREADS=1 .venv/bin/python benchmarks/count_smc_partial.py SAMPLES.jsonl ITEMS.jsonl OUT.json
"""

from __future__ import annotations

import collections
import json
import statistics as S
import sys

import tokensteer as ts
from tokensteer.eval.scorers import count_check, perplexity


def real(xs: list[float]) -> list[float]:
    """Perplexities of non-empty texts (an empty continuation has none), as the eval averages them."""
    return [x for x in xs if x == x]


def main() -> None:
    samples, items_path, out = sys.argv[1:4]
    lm = ts.load(None, backend="llamacpp")
    special = set(lm.tokenizer.special_ids) - set(lm.tokenizer.eos_ids)
    items = [json.loads(x) for x in open(items_path, encoding="utf-8") if x.startswith("{")]
    by: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for line in open(samples, encoding="utf-8"):
        r = json.loads(line)
        by[r["method"]][r["item"]] = r
    keys = sorted(set.intersection(*[set(v) for v in by.values()]))
    prompts = [items[k]["prompt"] for k in keys]
    none = ts.generate(lm, prompts, max_tokens=64, temperature=1.0, top_p=0.9, seed=0, stop=["\n"])
    by["none"] = {k: {"text": g.text, "token_ids": g.tokens} for k, g in zip(keys, none)}
    table = {"items": keys}
    for m, v in by.items():
        texts = [v[k]["text"] for k in keys]
        ppl = perplexity(lm, prompts, texts)
        ok = [count_check(t, items[k]["words"], items[k]["end_word"])["success"] for t, k in zip(texts, keys)]
        table[m] = {
            "n": len(keys), "success": sum(ok) / len(ok), "ppl_mean": S.mean(real(ppl)), "ppl_median": S.median(real(ppl)),
            "texts_with_special_tokens": sum(bool(set(v[k]["token_ids"]) & special) for k in keys), "ppl": ppl, "texts": texts,
        }  # fmt: skip
    for m in by:
        if m != "none":
            table[m]["ppl_ratio_mean"] = table[m]["ppl_mean"] / table["none"]["ppl_mean"]
            table[m]["ppl_ratio_median"] = table[m]["ppl_median"] / table["none"]["ppl_median"]
            table[m]["item_ratio_median"] = S.median(real([a / b for a, b in zip(table[m]["ppl"], table["none"]["ppl"])]))
    with open(out, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
    for m in by:
        print(m, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in table[m].items() if k not in ("ppl", "texts")}))


if __name__ == "__main__":
    main()

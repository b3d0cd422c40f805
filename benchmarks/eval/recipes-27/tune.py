"""Dev tuning for issue #27's recipes: register word-guide variants, then evaluate formulas that use
them in one process (the `none` samples come from the shared cache). Used on the dev sets only.

    .venv/bin/python benchmarks/eval/recipes-27/tune.py TASK PROMPTS N OUT SAMPLES CACHE \
        'negm4={"base":"negative","finish":3,"margin":4}' -- none 'formula:nucleus(M + 24*C("negm4", k=80), 0.95)'

Each variant is NAME={"base": positive|negative|nontoxic, plus WordGuide keyword arguments}.
"""

import json
import sys

from tokensteer.eval.runner import run
from tokensteer.formula import guide_data
from tokensteer.formula.guides import WordGuide, register_guide, word_lists


def factory(base: str, kw: dict, broad: bool = False):
    if base in ("positive", "negative"):
        return lambda: WordGuide(guide_data.SENTIMENT, base, word_lists("POSITIVE", "NEGATIVE", broad), **kw)
    return lambda: WordGuide(guide_data.CIVILITY, "nontoxic", word_lists("POLITE", "TOXIC", broad), **kw)


def main() -> None:
    task, prompts, n, out, samples, cache = sys.argv[1:7]
    rest = sys.argv[7:]
    cut = rest.index("--")
    for spec in rest[:cut]:
        name, kw = spec.split("=", 1)
        kw = json.loads(kw)
        broad = kw.pop("broad", False)
        register_guide(name, factory(kw.pop("base"), kw, broad))
    res = run(task, rest[cut + 1 :], prompts=prompts, n=int(n), samples=int(samples), out=out,
              backend="llamacpp", batch_size=16, cache_dir=cache, report=False)
    for m, v in res["methods"].items():
        print(f"{m:70s} success {v['success_rate']:.3f} perplexity {v['perplexity']:.2f} "
              f"(median {v['perplexity_median']:.2f}) distinct-2 {v['distinct_2']:.3f}")


if __name__ == "__main__":
    main()

"""Tuning the SMC planner on dev items only (issue #27): success and perplexity ratio against the
uncontrolled text, for planner settings given as JSON (``Target`` fields, plus K and seed).

    TOKENSTEER_THREADS=1 .venv/bin/python benchmarks/count_smc_tune.py 6 \\
        '{"temperature":0.5,"top_p":0.9,"outside":-4,"eos":0,"twist":1}' '{"temperature":0.5,"top_p":0.9,"outside":-4,"eos":0,"twist":0}'

The first argument takes every N-th item of count_dev.jsonl. Sampling as the eval's: T = 1,
top-p 0.9, 64 tokens, stop at a newline.
"""

from __future__ import annotations

import json
import statistics as S
import sys
import time
from importlib import resources

import tokensteer as ts
from tokensteer.constraints import ConstraintSpec
from tokensteer.constraints.base import AllOf
from tokensteer.constraints.smc import SMCPlanner
from tokensteer.constraints.smcstate import Target
from tokensteer.constraints.spec import build, parts
from tokensteer.constraints.vocab import token_table
from tokensteer.eval.scorers import count_check, perplexity


def main() -> None:
    lm = ts.load(None, backend="llamacpp")
    table = token_table(lm.tokenizer)
    text = resources.files("tokensteer").joinpath("data", "prompts", "count_dev.jsonl").read_text("utf-8")
    items = [json.loads(x) for x in text.splitlines() if x.startswith("{")][:: int(sys.argv[1])]
    prompts = [it["prompt"] for it in items]

    def run(controls_for, seed: int = 0) -> list[str]:
        return [ts.generate(lm, it["prompt"], max_tokens=64, temperature=1.0, top_p=0.9, seed=seed, stop=["\n"], controls=controls_for(it)).text for it in items]

    def spec(it, **kw) -> ConstraintSpec:
        return ConstraintSpec(words=it["words"], end_word=it["end_word"], **kw)

    base = perplexity(lm, prompts, run(lambda it: []))
    masked = perplexity(lm, prompts, run(lambda it: build(lm, spec(it, plan="mask"))))
    print(f"none mean ppl {S.mean(base):.1f}; mask {S.mean(masked):.1f}, ratio {S.mean(masked) / S.mean(base):.2f}", flush=True)
    for arg in sys.argv[2:]:
        kw = json.loads(arg)
        K, seed = kw.pop("K", 8), kw.pop("seed", 0)
        t0 = time.time()
        texts = run(lambda it: [SMCPlanner(lambda: AllOf(parts(lm, spec(it), table), table), K, weigh=Target(**kw))], seed)
        ppl = perplexity(lm, prompts, texts)
        ok = [count_check(t, it["words"], it["end_word"])["success"] for t, it in zip(texts, items)]
        print(
            f"K={K} {kw} seed={seed}: success {sum(ok) / len(ok):.2f} ppl {S.mean(ppl):.1f} ratio {S.mean(ppl) / S.mean(base):.2f} "
            f"median item ratio {S.median([a / b for a, b in zip(ppl, base)]):.2f} ({time.time() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()

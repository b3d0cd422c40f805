"""Perplexity scoring on llama.cpp: our output kernel on the captured final norms against
llama.cpp's own output layer, side by side in one run.

Scores seeded random continuations (10–32 tokens after 9–17 context tokens, handed over 16 at a
time as ``tokensteer eval`` does; each text is its own prefill) on the bundled model, alternating the two arms for ``--rounds``
rounds; reports the fastest round of each and checks both give the same log-likelihoods.

    .venv/bin/python benchmarks/scoring.py [--texts 90] [--rounds 3]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("TOKENSTEER_THREADS", "2")

import tokensteer as ts  # noqa: E402
from common import cpu_name  # noqa: E402


def score(lm, ctx: list[list[int]], cont: list[list[int]]) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    nll: list[float] = []
    for s in range(0, len(ctx), 16):
        nll += lm.continuation_nll(ctx[s : s + 16], cont[s : s + 16])
    return time.perf_counter() - t0, nll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=90)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    lm = ts.load(None, backend="llamacpp")
    rng = random.Random(0)
    ctx = [[2] + [rng.randrange(1000, 50000) for _ in range(rng.randint(8, 16))] for _ in range(args.texts)]
    cont = [[rng.randrange(1000, 50000) for _ in range(rng.randint(10, 32))] for _ in range(args.texts)]
    ours = lm.plain_head
    arms = {"kernel": ours, "llama_cpp": lambda: None}  # plain_head None: llama.cpp computes the output layer
    times: dict[str, list[float]] = {k: [] for k in arms}
    nlls: dict[str, list[float]] = {}
    for k in arms:  # warm-up: contexts, packed matrices
        lm.plain_head = arms[k]
        score(lm, ctx[:4], cont[:4])
    for r in range(args.rounds):
        for k in arms if r % 2 == 0 else list(arms)[::-1]:
            lm.plain_head = arms[k]
            t, nlls[k] = score(lm, ctx, cont)
            times[k].append(t)
            print(f"round {r} {k}: {t:.2f} s", flush=True)
    lm.plain_head = ours
    gap = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(nlls["kernel"], nlls["llama_cpp"]))
    print(json.dumps({
        "scored_tokens": sum(map(len, cont)),
        "kernel_s": round(min(times["kernel"]), 3),
        "llama_cpp_s": round(min(times["llama_cpp"]), 3),
        "speedup": round(min(times["llama_cpp"]) / min(times["kernel"]), 3),
        "max_relative_nll_gap": float(f"{gap:.2g}"),
        "cpu": cpu_name(),
    }))


if __name__ == "__main__":
    main()

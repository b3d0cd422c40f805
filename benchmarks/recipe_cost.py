"""Cost per token of the ``positive``, ``negative`` and ``detox`` recipes relative to plain decoding.

Plain decoding and each recipe generate interleaved, round after round, on the same prompts (one
prompt at a time, as a single user would); the figure is the ratio of median decode seconds per
token. With ``--batch B`` the prompts are generated B at a time instead (the eval's setting).
The last line is one JSON object.

    .venv/bin/python benchmarks/recipe_cost.py [--rounds 3] [--tokens 32] [--backend llamacpp] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import tokensteer as ts
from tokensteer.formula.engine import FormulaControl

from common import PROMPTS, cpu_name

RECIPES = ("positive", "negative", "detox")


def per_token(lm, prompts: list[str], controls, tokens: int) -> float:
    gens = ts.generate(lm, prompts, max_tokens=tokens, ignore_eos=True, controls=controls)
    gens = gens if isinstance(gens, list) else [gens]
    return gens[0].decode_s / (tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--backend", default="llamacpp")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    lm = ts.load(backend=a.backend)
    groups = [PROMPTS[i : i + a.batch] for i in range(0, len(PROMPTS), a.batch)][:4]
    times: dict[str, list[float]] = {k: [] for k in ("plain", *RECIPES)}
    for r in range(a.rounds + 1):  # round 0 warms every path up and is not kept
        for prompts in groups:
            for k in times:
                # a fresh control per generation, as a new request gets
                t = per_token(lm, prompts, [] if k == "plain" else [FormulaControl(lm, k)], a.tokens if r else 4)
                if r:
                    times[k].append(t)
        if r:
            print(f"round {r}/{a.rounds}: " + ", ".join(f"{k} {statistics.median(v) * 1000:.1f} ms" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "backend": a.backend, "batch": a.batch, "tokens": a.tokens, "rounds": a.rounds, "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "plain_ms_per_token": med["plain"] * 1000,
        **{f"ratio_{k}": med[k] / med["plain"] for k in RECIPES},
    }))


if __name__ == "__main__":
    main()

"""Speculative formulas: acceptance rate and forward calls per generated token, with vs without.

Part 1 (tiny random models, counts only): two 2-layer models with one tokenizer stand for the
loaded model and "another model"; for each formula and K the same prompts are generated with
--speculate K and without, greedy and sampled (temperature 1, fixed seeds). Figures: acceptance
(drafted tokens the rule kept), other-model forwards per generated token, and loaded-model
forwards per generated token (speculation also spends steps on drafts it then drops).

Part 2 (bundled Gemma 3 270M on torch, --parts tiny,bundled): the other model is the bundled model loaded a
second time, so the draft equals the formula and acceptance is an upper bound; plain and
speculative runs alternate round by round and the figures are the ratios of median wall ms per
token and of median CPU ms per generated token (process time, prefill included: steadier than wall
time on a shared machine).
The last line is one JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/formula_speculative.py [--tokens 32] [--ks 2,4] [--parts tiny,bundled]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tokensteer as ts
from tokensteer.formula.engine import FormulaControl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_tiny_model  # noqa: E402  (the test suite's tiny model recipe)

TINY_PROMPTS = ["the cat sat", "one two three", "a quick brown fox", "good great happy"]
TINY_FORMULAS = {
    "ensemble": "normalized: 0.7*M + 0.3*M(model={o})",
    "expert": "M + 0.5*(M(model={o}) - M)",
    "prefixed": 'M + 0.5*M("good ") + 0.5*M("good ", model={o})',
    "other-only": "M(model={o})",
}
BUNDLED_PROMPT = "The old lighthouse keeper climbed the stairs one last time and"
BUNDLED_FORMULA = 'M + 0.5*M("Here is a happy story:\\n", model={o})'


def counts(lm, formula: str, k: int, tokens: int, temperature: float, seeds, batched: bool) -> dict:
    """Per generated token: other-model and loaded-model forwards; and the acceptance rate.
    ``batched`` runs the four prompts as one batch (it moves in lockstep: every prompt keeps as
    many drafts as the one that accepted fewest), else each prompt alone."""
    other = main = gen = drafted = accepted = 0
    groups = [TINY_PROMPTS] if batched else [[p] for p in TINY_PROMPTS]
    for seed in seeds:
        for prompts in groups:
            c = FormulaControl(lm, formula, speculative=k)
            gens = ts.generate(lm, prompts, max_tokens=tokens, ignore_eos=True, temperature=temperature, seed=seed, controls=[c])
            n = max(len(g.tokens) for g in gens)  # a batch moves in lockstep
            other, gen = other + c.stats.other_calls, gen + n
            main += c.stats.draft_steps + c.stats.rounds if k else n
            drafted, accepted = drafted + c.stats.drafted, accepted + c.stats.accepted
    return {
        "other_per_token": round(other / gen, 3),
        "main_per_token": round(main / gen, 3),
        "acceptance": round(accepted / drafted, 3) if drafted else None,
    }


def tiny_part(ks: list[int], tokens: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        make_tiny_model(Path(d) / "main", seed=0)
        make_tiny_model(Path(d) / "other", seed=1)
        lm = ts.load(str(Path(d) / "main"), backend="torch")
        o = json.dumps(str(Path(d) / "other"))
        for name, f in TINY_FORMULAS.items():
            formula = f.format(o=o)
            for mode, temp, seeds in (("greedy", 0.0, [0]), ("sampled", 1.0, range(5))):
                for batched in (False, True):
                    base = counts(lm, formula, 0, tokens, temp, seeds, batched)
                    for k in ks:
                        r = counts(lm, formula, k, tokens, temp, seeds, batched)
                        b = "batch4" if batched else "single"
                        row = {"formula": name, "mode": mode, "batch": b, "k": k, **r, "other_per_token_plain": base["other_per_token"]}
                        print(f"[tiny] {name:10s} {mode:7s} {b} K={k}: acceptance {r['acceptance']}, other-model forwards/token "
                              f"{r['other_per_token']} (plain {base['other_per_token']}), loaded-model forwards/token {r['main_per_token']}", flush=True)
                        rows.append(row)
    return rows


def bundled_part(k: int, tokens: int, rounds: int) -> dict:
    from tokensteer.models import resolve

    lm = ts.load(None, backend="torch")
    f = BUNDLED_FORMULA.format(o=json.dumps(str(resolve(None).path)))
    ms: dict[str, list[float]] = {"plain": [], "speculative": []}
    cpu: dict[str, list[float]] = {"plain": [], "speculative": []}
    stats = None
    for r in range(rounds + 1):  # round 0 warms up both paths and loads the other model
        for name, spec in (("plain", 0), ("speculative", k)):
            c = FormulaControl(lm, f, speculative=spec)
            t = time.process_time()
            g = ts.generate(lm, BUNDLED_PROMPT, max_tokens=tokens, ignore_eos=True, controls=[c])
            if r:
                ms[name].append(g.decode_s / (len(g.tokens) - 1) * 1000)
                cpu[name].append((time.process_time() - t) / len(g.tokens) * 1000)
            if spec:
                stats = c.stats
        if r:
            print(f"[bundled] round {r}/{rounds}: wall ms/token plain {ms['plain'][-1]:.1f}, speculative {ms['speculative'][-1]:.1f}; "
                  f"CPU ms/token plain {cpu['plain'][-1]:.1f}, speculative {cpu['speculative'][-1]:.1f}", flush=True)
    med = {k2: statistics.median(v) for k2, v in ms.items()}
    cmed = {k2: statistics.median(v) for k2, v in cpu.items()}
    return {
        "formula": f,
        "k": k,
        "plain_ms_per_token": round(med["plain"], 1),
        "speculative_ms_per_token": round(med["speculative"], 1),
        "ratio": round(med["speculative"] / med["plain"], 3),
        "ratio_rounds": [round(s / p, 3) for s, p in zip(ms["speculative"], ms["plain"])],
        "plain_cpu_ms_per_token": round(cmed["plain"], 1),
        "speculative_cpu_ms_per_token": round(cmed["speculative"], 1),
        "cpu_ratio": round(cmed["speculative"] / cmed["plain"], 3),
        "cpu_ratio_rounds": [round(s / p, 3) for s, p in zip(cpu["speculative"], cpu["plain"])],
        "acceptance": round(stats.acceptance, 3),
        "other_per_token": round(stats.other_calls / tokens, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ks", default="2,4")
    ap.add_argument("--parts", default="tiny", help="tiny (counts, fast) and/or bundled (timing, a few minutes)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    ks = [int(x) for x in a.ks.split(",")]
    parts = a.parts.split(",")
    out: dict = {"tokens": a.tokens, "date": time.strftime("%Y-%m-%d")}
    if "tiny" in parts:
        out["tiny"] = tiny_part(ks, a.tokens)
    if "bundled" in parts:
        out["bundled"] = bundled_part(max(ks), a.tokens, a.rounds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

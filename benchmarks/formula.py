"""Cost per token of same-model formulas relative to plain decoding, on each available backend.

Plain decode, a 2-term formula (CFG: 2 rows of one batch) and a 4-term formula (4 rows) run
interleaved, round after round, on the same prompt; the figure is the ratio of median decode
seconds per token. Targets: 2-term ≤ 1.15, 4-term ≤ 1.4. The same rounds also time the backend's
bare ``step`` for 2 and 4 rows against 1 (no loop, no formula): the floor a formula of that many
rows can reach, so ``ratio − floor`` is what the engine itself adds. The last line is one JSON object.

Both formulas only read their same-model terms as a weighted sum, so on a backend that can mix rows
(``HEAD_MIX``) the output layer runs once on Σ wᵢ·hᵢ instead of once per row; there the same
formulas also run unfused (``*-unfused``, every row through the output layer), and the bare step is
also timed with that mix (``bare_step_*rows_mixed_vs_1``, the fused formula's floor).

    .venv/bin/python benchmarks/formula.py [--rounds 5] [--tokens 32] [--backends torch,llamacpp]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import tokensteer as ts
from tokensteer.backends.base import HEAD_MIX
from tokensteer.formula.engine import FormulaControl

PROMPT = "The old lighthouse keeper climbed the stairs one last time and"
FORMULAS = {
    "2-term": '2*M("Here is a happy story:\\n") - M',
    "4-term": 'M + 2*(M("Here is a happy story:\\n") - M("Here is a sad story:\\n")) + 0.5*M("A story for children:\\n")',
}


def per_token(lm, controls, tokens: int) -> float:
    g = ts.generate(lm, PROMPT, max_tokens=tokens, ignore_eos=True, controls=controls)
    return g.decode_s / (len(g.tokens) - 1)


def bare_step(lm, rows: int, tokens: int, mixed: bool = False) -> float:
    """Median seconds of the backend's own step for ``rows`` copies of the prompt (no loop), with
    every row through the output layer or (``mixed``) only their sum."""
    import torch

    ids = lm.tokenizer.encode(PROMPT)
    sess = lm.session((), mix=torch.ones(1, rows)) if mixed else lm.session(())
    try:
        sess.prefill([ids] * rows)
        feed = torch.tensor([ids[-1]] * rows)
        times = []
        for _ in range(tokens):
            t = time.perf_counter()
            sess.step(feed)
            times.append(time.perf_counter() - t)
    finally:
        sess.close()
    return statistics.median(times)


def bench(backend: str, rounds: int, tokens: int) -> dict:
    lm = ts.load(backend=backend)
    mixes = HEAD_MIX in lm.capabilities
    ctrls = {"plain": []} | {k: [FormulaControl(lm, f)] for k, f in FORMULAS.items()}
    if mixes:
        for k, f in FORMULAS.items():
            ctrls[f"{k}-unfused"] = [FormulaControl(lm, f, fuse=False)]  # every term's row through the output layer
    for c in ctrls.values():  # warm up every path once
        per_token(lm, c, 4)
    times: dict[str, list[float]] = {k: [] for k in ctrls}
    kinds = [(1, False), (2, False), (4, False)] + ([(2, True), (4, True)] if mixes else [])
    steps: dict[tuple[int, bool], list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for k, c in ctrls.items():
            times[k].append(per_token(lm, c, tokens))
        for n, mixed in steps:
            steps[n, mixed].append(bare_step(lm, n, tokens, mixed))
        print(f"[{backend}] round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1] * 1000:.1f} ms" for k, v in times.items())
              + "; bare step " + ", ".join(f"{n} rows{' mixed' if m else ''} {v[-1] * 1000:.1f} ms" for (n, m), v in steps.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    one = statistics.median(steps[1, False])
    # ratios per round too (each round's runs are back to back), to show the spread
    per_round = {k: [a / p for a, p in zip(times[k], times["plain"])] for k in ctrls if k != "plain"}
    return {
        "backend": backend,
        "fused": {k: c[0].fused is not None and mixes for k, c in ctrls.items() if k in FORMULAS},
        "plain_ms_per_token": med["plain"] * 1000,
        **{f"{k}_ms_per_token": med[k] * 1000 for k in ctrls if k != "plain"},
        **{f"ratio_{k}": med[k] / med["plain"] for k in ctrls if k != "plain"},
        **{f"bare_step_{n}rows{'_mixed' if m else ''}_vs_1": statistics.median(v) / one for (n, m), v in steps.items() if n > 1},
        **{f"ratio_{k}_rounds": [round(x, 3) for x in v] for k, v in per_round.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--backends", default="torch,llamacpp")
    a = ap.parse_args()
    out = {"formulas": FORMULAS, "tokens": a.tokens, "rounds": a.rounds, "date": time.strftime("%Y-%m-%d"), "results": []}
    for b in a.backends.split(","):
        try:
            out["results"].append(bench(b, a.rounds, a.tokens))
        except ts.UserError as e:
            print(f"[{b}] skipped: {e}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

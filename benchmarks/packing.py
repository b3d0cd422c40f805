"""What MKL-packed linear layers buy on the torch backend: time per decode step of 1, 2, 4 and 8
rows with no packing, with the output layer packed, with the output and decoder layers packed,
with those layers but only their height-1 and height-8 packings (as before height 4 existed:
3-4 rows then padded to 8), and with two rows through the output layer's plain ``linear`` instead
of padded to its height-4 packing (as before that padding).

The five set-ups share one loaded model (the packed layers hold the same weights, so swapping
modules between steps is exact) and take turns step by step inside the same sessions, so machine
noise, which on this shared CPU moves step times by ±30 % over minutes, hits all of them alike.
Figures are medians. The last line is one JSON object.

    .venv/bin/python benchmarks/packing.py [--steps 90]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tokensteer as ts
from tokensteer.backends.torch.packed import PackedLinear

PROMPT = "The old lighthouse keeper climbed the stairs one last time and"
SETUPS = ("none", "head", "head+decoder", "heights 1+8 only", "2 rows unpadded")


def swaps(lm) -> list[tuple[torch.nn.Module, str, PackedLinear, torch.nn.Linear, bool]]:
    """(parent, name, packed layer, plain twin sharing its weights, is the output layer)."""
    head = lm.model.get_output_embeddings()
    out = []
    for parent in lm.model.modules():
        for name, child in parent.named_children():
            if isinstance(child, PackedLinear):
                twin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                twin.weight, twin.bias = child.weight, child.bias
                out.append((parent, name, child, twin, child is head))
    return out


def use(table, setup: str) -> None:
    for parent, name, packed, twin, is_head in table:
        on = setup in ("head+decoder", "heights 1+8 only", "2 rows unpadded") or (setup == "head" and is_head)
        setattr(parent, name, packed if on else twin)
        if not hasattr(packed, "pads_two"):
            packed.pads_two = packed.pad_two
        packed.pad_two = packed.pads_two and setup != "2 rows unpadded"
        if not hasattr(packed, "all_packings"):
            packed.all_packings = packed.packed
        tallest = {h: p for h, p in packed.all_packings.items() if h in (1, 8)}
        packed.packed = tallest if setup == "heights 1+8 only" else packed.all_packings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=90, help="decode steps per row count (a quarter per set-up)")
    args = ap.parse_args()
    lm = ts.load(backend="torch")
    table = swaps(lm)
    if not any(t[4] for t in table) or all(t[4] for t in table):
        raise SystemExit("this model or PyTorch build has no packed output and decoder layers (MKL, float32)")
    ids = lm.tokenizer.encode(PROMPT)
    ms: dict[int, dict[str, float]] = {}
    for rows in (1, 2, 4, 8):
        times: dict[str, list[float]] = {s: [] for s in SETUPS}
        session = lm.session(())
        try:
            session.prefill([ids] * rows)
            feed = torch.tensor([ids[-1]] * rows)
            for k in range(args.steps):
                setup = SETUPS[k % len(SETUPS)]
                use(table, setup)
                start = time.perf_counter()
                session.step(feed)
                times[setup].append(time.perf_counter() - start)
        finally:
            session.close()
            use(table, "head+decoder")
        ms[rows] = {s: statistics.median(v) * 1e3 for s, v in times.items()}
        print(f"{rows} rows: " + ", ".join(f"{s} {t:.1f} ms" for s, t in ms[rows].items()), flush=True)
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "ms_per_step": {f"{r}_rows": {s: round(t, 1) for s, t in v.items()} for r, v in ms.items()},
        "rows_vs_1row": {s: {f"{r}_rows": round(ms[r][s] / ms[1][s], 3) for r in (2, 4, 8)} for s in SETUPS},
        "decoder_packing_gain": {f"{r}_rows": round(ms[r]["head+decoder"] / ms[r]["head"], 3) for r in (1, 4, 8)},
        "height4_gain_4_rows": round(ms[4]["head+decoder"] / ms[4]["heights 1+8 only"], 3),
        "pad_two_gain_2_rows": round(ms[2]["head+decoder"] / ms[2]["2 rows unpadded"], 3),
    }))


if __name__ == "__main__":
    main()

"""Decode speed of our loop against HF ``generate`` on the bundled model, measured side by side.

Same prompt, greedy, same dtype, 128 new tokens (EOS ignored by both), runs interleaved; memory
bandwidth is measured in the same run so the speed can be compared with the bandwidth bound
(every weight byte is read once per token, the tied embedding once as the output projection).

    .venv/bin/python benchmarks/decode.py [--dtype float32|bfloat16] [--rounds 3] [--tokens 128]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tokensteer as ts

PROMPT = "The history of the printing press begins in"


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-n read bandwidth in bytes/s: sum a large float32 buffer."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    from transformers import GenerationConfig

    lm = ts.load(backend="torch", dtype=args.dtype)
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)])
    hf_cfg = GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    def ours() -> float:
        t = time.perf_counter()
        g = ts.generate(lm, PROMPT, max_tokens=args.tokens, ignore_eos=True)
        dt = time.perf_counter() - t
        assert len(g.tokens) == args.tokens
        return args.tokens / dt

    def hf() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = lm.model.generate(ids, generation_config=hf_cfg)
        dt = time.perf_counter() - t
        assert out.shape[1] - ids.shape[1] == args.tokens
        return args.tokens / dt

    ours(), hf()  # warm-up
    our_runs, hf_runs = [], []
    for r in range(args.rounds):
        first, second = (ours, hf) if r % 2 == 0 else (hf, ours)
        a, b = first(), second()
        (our_runs, hf_runs)[first is hf].append(a)
        (our_runs, hf_runs)[second is hf].append(b)
        print(f"round {r}: ours {our_runs[-1]:.2f} tok/s, hf {hf_runs[-1]:.2f} tok/s", flush=True)
    bw = read_bandwidth()
    wb = weight_bytes(lm.model)
    ours_s, hf_s = statistics.median(our_runs), statistics.median(hf_runs)
    bound = bw / wb
    print(f"bandwidth {bw / 1e9:.1f} GB/s, weights {wb / 1e6:.0f} MB/token -> bound {bound:.1f} tok/s")
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "tokens": args.tokens,
                "ours_tok_s": round(ours_s, 2),
                "hf_tok_s": round(hf_s, 2),
                "ratio": round(ours_s / hf_s, 3),
                "bandwidth_gb_s": round(bw / 1e9, 2),
                "weight_mb_per_token": round(wb / 1e6, 1),
                "bandwidth_bound_ratio": round(ours_s / bound, 3),
            }
        )
    )


if __name__ == "__main__":
    main()

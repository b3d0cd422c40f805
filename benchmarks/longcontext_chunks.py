"""Prompt reading, dense against TokenSelect, from single chunks: the time of one prefill chunk at
sampled cache lengths, and the whole prompt's time estimated from them.

A full 16k or 32k run takes the better part of an hour on a busy 2-core machine (benchmarks/
longcontext.py). Here each chunk of ``chunk`` tokens runs once per setting on a cache already
``N`` tokens long, filled with random keys and values (attention costs the same whatever they
hold), dense then selected at each N, for ``--rounds`` rounds; the fastest of each is kept. A
prompt's time is the sum over its chunks of the times interpolated at each chunk's cache length
(chunks too short to select run dense). The last line of output is one JSON object.

    .venv/bin/python benchmarks/longcontext_chunks.py [--lengths 0,3072,8192,16384,32256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="0,3072,8192,16384,32256", help="cache lengths to time a chunk at")
    ap.add_argument("--prompts", default="16384,32768", help="prompt lengths to estimate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-select", default="on")
    ap.add_argument("--model", default=None, help="a local model folder (default: the bundled model)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import DynamicCache

    import tokensteer as ts
    from tokensteer.kvselect import new_selector, parse_kv_select, use
    from tokensteer.kvselect.prefill import cache_kwarg
    from tokensteer.kvselect.select import window

    from longcontext import cpu

    lm = ts.load(args.model, backend="torch")
    model, cfg = lm.model, parse_kv_select(args.kv_select)
    text = model.config.get_text_config()
    body, L, load0 = model.model, cfg.chunk, os.getloadavg()[0]
    D, Hkv = text.head_dim, text.num_key_value_heads

    def chunk_s(N: int, selected: bool) -> float:
        cache = DynamicCache(config=model.config)
        g = torch.Generator().manual_seed(N)
        for i, kind in enumerate(text.layer_types):
            n = N if kind == "full_attention" else min(N, text.sliding_window)
            if n:
                cache.update(torch.randn(1, Hkv, n, D, generator=g) * 0.5, torch.randn(1, Hkv, n, D, generator=g), i)
        ids = torch.randint(0, text.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
        sel = new_selector(model, cfg) if selected else None
        t = time.perf_counter()
        with use(sel), torch.inference_mode():
            body(input_ids=ids, position_ids=torch.arange(N, N + L)[None], use_cache=True, **{cache_kwarg(type(body)): cache})
        return time.perf_counter() - t

    Ns = sorted(int(x) for x in args.lengths.split(","))
    best = {N: [float("inf"), float("inf")] for N in Ns}
    for r in range(args.rounds):
        for N in Ns:
            d, s = chunk_s(N, False), chunk_s(N, True)
            best[N] = [min(best[N][0], d), min(best[N][1], s)]
            print(json.dumps({"round": r, "N": N, "dense_s": round(d, 3), "selected_s": round(s, 3), "load": round(os.getloadavg()[0], 1)}), flush=True)
    dense, sel = [best[N][0] for N in Ns], [best[N][1] for N in Ns]
    estimate = {}
    for T in (int(x) for x in args.prompts.split(",")):
        starts = range(0, T, L)
        td = sum(float(np.interp(N, Ns, dense)) for N in starts)
        ts_ = sum(float(np.interp(N, Ns, sel if window(N + L, L, cfg) else dense)) for N in starts)
        estimate[str(T)] = {"dense_s": round(td, 1), "selected_s": round(ts_, 1), "prefill_speedup": round(td / ts_, 3)}
    print(json.dumps({"chunk_s": {str(N): {"dense": round(b[0], 3), "selected": round(b[1], 3), "ratio": round(b[0] / b[1], 3)} for N, b in best.items()},
                      "estimate": estimate, "kv_select": cfg.spec(), "threads": 1, "cpu": cpu(),
                      "load_average": [round(load0, 1), round(os.getloadavg()[0], 1)]}))


if __name__ == "__main__":
    main()

"""Decode speed of our two backends against llama-cpp-python's own loop, measured side by side.

Three runners on the bundled Gemma 3 270M, greedy, the same prompt and length, EOS ignored, in
interleaved rounds (the machine is shared and noisy, so ratios are taken within each round):

* ``ours_llamacpp``: tokensteer's decode loop on the llamacpp backend;
* ``native``: llama-cpp-python's ``Llama.generate`` with its C sampler (greedy), same GGUF, same threads;
* ``ours_torch``: tokensteer's decode loop on the torch backend (fp32, dequantized weights).

It also times one decode step of 4 prompts in one batch against one prompt (``batch4_vs_batch1_cost``).

    .venv/bin/python benchmarks/backends.py [--rounds 5] [--tokens 64] [--torch-tokens 32]

Decode speed is tokens after the first divided by the time from the first token to the last, for
every runner. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import contextmanager

import llama_cpp
import llama_cpp.llama as llama_high

import tokensteer as ts
from tokensteer.models import bundled_gguf

PROMPT = "The history of the printing press begins in"
BATCH = ["The history of the printing press begins in", "Once upon a time, in a small village", "The best way to learn a language is", "In the year 1969, astronauts"]


def _amx_build() -> bool:
    """True when llama.cpp was compiled with AMX kernels, which crash on Q4_K weights (llama.cpp #20824)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextmanager
def same_model_params():
    """Keep the native Llama off the AMX buffer type on AMX builds, where it would crash; otherwise it
    runs with llama-cpp-python's own defaults (weights repacked), as a user would get it."""
    orig = llama_high.llama_cpp.llama_model_default_params

    def patched():
        p = orig()
        if _amx_build():
            p.use_extra_bufts = False
        return p

    llama_high.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        llama_high.llama_cpp.llama_model_default_params = orig


def native_run(llm: llama_cpp.Llama, n: int) -> tuple[float, list[int]]:
    """llama-cpp-python's own loop: eval + C greedy sampler per token; returns (tok/s, tokens)."""
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    out, t_first = [], 0.0
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == 1:
            t_first = time.perf_counter()
        if len(out) == n:
            break
    return (n - 1) / (time.perf_counter() - t_first), out


def ours_run(lm, n: int, prompts=PROMPT) -> tuple[float, list[int]]:
    g = ts.generate(lm, prompts, max_tokens=n, ignore_eos=True)
    gs = g if isinstance(g, list) else [g]
    step = max(x.decode_s for x in gs) / (n - 1)
    return 1.0 / step, gs[0].tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--torch-tokens", type=int, default=32, help="tokens per torch run (it is ~7x slower)")
    args = ap.parse_args()

    lm = ts.load(None, backend="llamacpp")
    with same_model_params():
        llm = llama_cpp.Llama(
            str(bundled_gguf()), n_ctx=lm.n_ctx, n_batch=512, n_threads=lm.n_threads, n_threads_batch=lm.n_threads,
            flash_attn=True, verbose=False,  # llama.cpp picks flash attention on CPU for our contexts (AUTO)
        )
    torch_lm = ts.load(None, backend="torch")
    print(f"threads {lm.n_threads}, AMX build {_amx_build()}, {platform.processor() or platform.machine()}", flush=True)

    # warm up every runner once (allocations, page faults, thread pools)
    ours_run(lm, 8), native_run(llm, 8), ours_run(torch_lm, 4), ours_run(lm, 8, BATCH)

    rows = []
    for r in range(args.rounds):
        ours, ours_tokens = ours_run(lm, args.tokens)
        native, native_tokens = native_run(llm, args.tokens)
        torch_s, _ = ours_run(torch_lm, args.torch_tokens)
        b1, _ = ours_run(lm, args.tokens)
        b4, _ = ours_run(lm, args.tokens, BATCH)
        row = dict(
            ours=ours, native=native, torch=torch_s, ratio=ours / native, speedup=ours / torch_s,
            batch_cost=b1 / b4, same_tokens=ours_tokens == native_tokens,
        )
        rows.append(row)
        print(
            f"round {r + 1}: ours llamacpp {ours:.1f} tok/s, native {native:.1f}, ratio {row['ratio']:.3f}; "
            f"torch {torch_s:.1f} (llamacpp {row['speedup']:.1f}x); step of 4 rows / 1 row {row['batch_cost']:.3f}; "
            f"same tokens as native: {row['same_tokens']}",
            flush=True,
        )

    med = lambda k: statistics.median(x[k] for x in rows)  # noqa: E731
    print(
        json.dumps(
            {
                "ours_llamacpp_tok_s": round(med("ours"), 2),
                "llamacpp_native_tok_s": round(med("native"), 2),
                "ratio_vs_native": round(med("ratio"), 3),
                "ours_torch_tok_s": round(med("torch"), 2),
                "speedup_llamacpp_vs_torch": round(med("speedup"), 2),
                "batch4_vs_batch1_cost": round(med("batch_cost"), 3),
                "same_greedy_tokens_as_native": all(x["same_tokens"] for x in rows),
                "rounds": args.rounds,
                "tokens": args.tokens,
                "threads": lm.n_threads,
            }
        )
    )


if __name__ == "__main__":
    main()

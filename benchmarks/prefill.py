"""Prefill time on llama.cpp with our kernels against llama.cpp's own (``TOKENSTEER_NO_NATIVE=1``).

Each arm runs in its own process (the kernels are chosen at load), in interleaved rounds; each
prefills one prompt of each length into a fresh session and keeps the fastest of its tries.

    .venv/bin/python benchmarks/prefill.py [--lengths 32,128,512] [--rounds 3]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TOKENSTEER_THREADS", "2")

TEXT = "The committee met on Tuesday to discuss the budget for the coming year, and after a long debate " * 60


def measure(lengths: list[int], tries: int) -> dict[int, float]:
    """Fastest prefill seconds of a prompt of each length, in this process."""
    import tokensteer as ts

    lm = ts.load(None, backend="llamacpp")
    toks = lm.tokenizer.encode(TEXT)
    out = {}
    for n in lengths:
        best = float("inf")
        for _ in range(tries):
            s = lm.session()
            t0 = time.perf_counter()
            s.prefill([toks[:n]])
            best = min(best, time.perf_counter() - t0)
            s.close()
        out[n] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32,128,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.child:
        print(json.dumps(measure(lengths, args.tries)))
        return
    best: dict[str, dict[int, float]] = {"ours": {}, "llama.cpp": {}}
    for r in range(args.rounds):
        for arm, extra in (("ours", {}), ("llama.cpp", {"TOKENSTEER_NO_NATIVE": "1"})):
            cmd = [sys.executable, __file__, "--child", "--lengths", args.lengths, "--tries", str(args.tries)]
            got = json.loads(subprocess.run(cmd, env={**os.environ, **extra}, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            for n, t in got.items():
                best[arm][int(n)] = min(best[arm].get(int(n), float("inf")), t)
            print(f"round {r} {arm}: " + ", ".join(f"{n} tokens {t * 1000:.1f} ms" for n, t in got.items()), flush=True)
    print(json.dumps({
        "prefill_ms_ours": {n: round(t * 1000, 1) for n, t in best["ours"].items()},
        "prefill_ms_llama_cpp": {n: round(t * 1000, 1) for n, t in best["llama.cpp"].items()},
        "speedup": {n: round(best["llama.cpp"][n] / best["ours"][n], 2) for n in lengths},
        "threads": int(os.environ["TOKENSTEER_THREADS"]),
        "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
    }))


if __name__ == "__main__":
    main()

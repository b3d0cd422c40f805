"""The engine under load: continuous batching against serving the same requests one at a time.

On the bundled model (llama.cpp, ``TOKENSTEER_THREADS`` threads, 2 by default), in one run:

* ``throughput_8_vs_1``: 8 requests arriving at seeded Poisson times, served together by one engine,
  against the same 8 served one after another; aggregate generated tokens per second (the median
  of the rounds, after one untimed warm-up batch);
* ``ttft_p50_ms`` / ``ttft_p95_ms``: time from submit to first token under that load;
* ``single_overhead``: one request through the engine ÷ the same request through the fixed-batch
  loop the engine replaced (read from git at ``--baseline``), seconds per decoded token (prefill
  left out), interleaved rounds (which of the two runs first alternates), both driven from a
  worker thread;
* ``rss_growth_mb``: resident memory after ``--sequential`` short requests one after another, less
  after the first 50 (warm-up).

    .venv/bin/python benchmarks/engine.py [--tokens 48] [--rounds 3] [--sequential 1000]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENSTEER_THREADS", "2")

import tokensteer as ts  # noqa: E402
from tokensteer.engine import Engine  # noqa: E402
from common import PROMPTS, cpu_name  # noqa: E402



def old_loop(rev: str):
    """The fixed-batch loop module as it was at ``rev`` (the baseline for ``single_overhead``)."""
    src = subprocess.run(["git", "show", f"{rev}:src/tokensteer/loop.py"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_loop.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_loop", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_loop"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def serve(lm, arrivals: list[float], cfg: ts.SamplingConfig) -> tuple[float, int, list[float]]:
    """Submit PROMPTS at ``arrivals`` (seconds from start) to one engine; wall time, tokens, TTFTs."""
    eng = Engine(lm)
    handles: list = [None] * len(PROMPTS)
    t0 = time.perf_counter()

    def submitter():
        for i, (p, at) in enumerate(zip(PROMPTS, arrivals)):
            time.sleep(max(0.0, at - (time.perf_counter() - t0)))
            handles[i] = eng.submit([p], cfg)

    th = threading.Thread(target=submitter)
    th.start()
    th.join()
    gens = [h.result()[0] for h in handles]
    wall = time.perf_counter() - t0
    return wall, sum(len(g.tokens) for g in gens), [h.events[0].t * 1000 for h in handles]


def one_at_a_time(lm, cfg: ts.SamplingConfig) -> tuple[float, int]:
    eng = Engine(lm)
    t0 = time.perf_counter()
    n = sum(len(eng.submit([p], cfg).result()[0].tokens) for p in PROMPTS)
    return time.perf_counter() - t0, n


def per_token(run) -> float:
    """Seconds per token after the first (decode only, no prefill) of ``run()``'s events, run in a
    fresh thread as the engine runs its steps (llama.cpp's and torch's thread pools then meet the
    same way for both)."""
    out: list = []
    th = threading.Thread(target=lambda: out.append(run()))
    th.start()
    th.join()
    events = out[0]
    return (events[-1].t - events[0].t) / (len(events) - 1)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap", type=float, default=0.1, help="mean seconds between arrivals (Poisson)")
    ap.add_argument("--sequential", type=int, default=1000)
    ap.add_argument("--baseline", default="7425e3e", help="git revision holding the old fixed-batch loop")
    ap.add_argument("--backend", default="llamacpp")
    args = ap.parse_args()

    lm = ts.load(None, backend=args.backend)
    cfg = ts.SamplingConfig(max_tokens=args.tokens, temperature=0.8, seed=0, ignore_eos=True)
    # untimed warm-up: a process's first batch opens the backend's contexts, which the timed
    # one-at-a-time half (always run second) would otherwise never pay for
    serve(lm, [0.0] * len(PROMPTS), ts.SamplingConfig(max_tokens=4, ignore_eos=True))
    rng = random.Random(0)
    ratios, ttfts = [], []
    for r in range(args.rounds):
        t, arrivals = 0.0, []
        for _ in PROMPTS:
            arrivals.append(t)
            t += rng.expovariate(1 / args.gap)
        wall8, n8, tt = serve(lm, arrivals, cfg)
        wall1, n1 = one_at_a_time(lm, cfg)
        ratios.append((n8 / wall8) / (n1 / wall1))
        ttfts += tt
        print(f"round {r}: together {n8 / wall8:.1f} tok/s, one at a time {n1 / wall1:.1f} tok/s, ratio {ratios[-1]:.2f}", flush=True)

    loop = old_loop(args.baseline)
    single = ts.SamplingConfig(max_tokens=args.tokens * 2, ignore_eos=True)
    overheads = []
    runs = {
        "engine": lambda: per_token(lambda: list(Engine(lm).submit([PROMPTS[0]], single))),
        "loop": lambda: per_token(lambda: list(loop.stream(lm, [PROMPTS[0]], single))),
    }
    for r in range(args.rounds):
        order = ("engine", "loop") if r % 2 == 0 else ("loop", "engine")  # neither side always runs first
        t = {name: runs[name]() for name in order}
        t_engine, t_loop = t["engine"], t["loop"]
        overheads.append(t_engine / t_loop)
        print(f"single request: engine {t_engine * 1000:.1f} ms/token, old loop {t_loop * 1000:.1f} ms/token, ratio {overheads[-1]:.3f}", flush=True)

    eng = Engine(lm)
    short = ts.SamplingConfig(max_tokens=2, ignore_eos=True)
    before = None
    for i in range(args.sequential):
        eng.submit([PROMPTS[i % len(PROMPTS)]], short).result()
        if i == 49:
            before = rss_mb()
    growth = rss_mb() - before if before is not None else 0.0
    print(f"rss growth over {args.sequential - 50} sequential requests: {growth:.1f} MB", flush=True)

    out = {
        "throughput_8_vs_1": round(statistics.median(ratios), 3),
        "throughput_rounds": [round(x, 3) for x in ratios],
        "ttft_p50_ms": round(statistics.median(ttfts), 1),
        "ttft_p95_ms": round(sorted(ttfts)[int(0.95 * (len(ttfts) - 1))], 1),
        "single_overhead": round(statistics.median(overheads), 3),
        "rss_growth_mb": round(growth, 1),
        "backend": lm.name,
        "threads": int(os.environ["TOKENSTEER_THREADS"]),
        "cpu": cpu_name(),
        "python": sys.version.split()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""End-to-end speed of ``tokensteer eval`` before and after the engine, side by side in one run.

Runs the same eval command (generation and perplexity scoring, no sample cache) with the code at
``--baseline`` (checked out from git into a temporary worktree, run from its ``src``) and with this
checkout, in interleaved rounds, and reports samples per second for each:

    .venv/bin/python benchmarks/eval_speed.py [--n 20] [--samples 3] [--rounds 1]

The command is the issue's: ``--task sentiment-positive --method none --method formula:positive
--method prompt`` (on the first ``--n`` prompts). The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["none", "formula:positive", "prompt"]


def run_eval(src: Path, out: Path, n: int, samples: int) -> float:
    """Seconds for one eval run with the package at ``src``."""
    cmd = [sys.executable, "-c", "from tokensteer.cli import app; app()", "eval", "--task", "sentiment-positive",
           *[a for m in METHODS for a in ("--method", m)], "--samples", str(samples), "--n", str(n), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--baseline", default="7425e3e")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    old = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.baseline], check=True, capture_output=True)
    total = args.n * args.samples * len(METHODS)
    times: dict[str, list[float]] = {"before": [], "after": []}
    try:
        for r in range(args.rounds):
            for label, src in (("before", old / "src"), ("after", ROOT / "src")):
                out = tmp / f"{label}-{r}"
                times[label].append(run_eval(src, out, args.n, args.samples))
                shutil.rmtree(out, ignore_errors=True)
                print(f"round {r} {label}: {times[label][-1]:.1f} s for {total} samples", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    before, after = min(times["before"]), min(times["after"])
    print(json.dumps({
        "eval_samples_per_s_before": round(total / before, 3),
        "eval_samples_per_s_after": round(total / after, 3),
        "speedup": round(before / after, 3),
        "samples": total,
        "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
    }))


if __name__ == "__main__":
    main()

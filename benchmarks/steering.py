"""Decode cost of activation steering: time per generated token with a vector applied ÷ without.

Runs on every installed backend (torch, llamacpp), interleaving plain and steered generations of
the same prompts so machine noise hits both alike; reports the median per-token decode time ratio
for a vector at one layer and at every steerable layer, by CPU time of this process (robust on a
shared machine) and by wall time. Target: ≤ 1.05 on each backend.
The last output line is one JSON object with the figures.

    .venv/bin/python benchmarks/steering.py [--vec VEC.safetensors] [--rounds 5] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import tokensteer as ts
from tokensteer.backends import llamacpp_installed
from tokensteer.steering import Steer, SteeringControl, SteeringVector, load_vector

PROMPTS = ["The old lighthouse keeper climbed the stairs one last time and", "Our trip to the mountains began when"]


def random_vector(lm) -> SteeringVector:
    """A fixed random direction per layer with a plausible size; cost does not depend on the direction."""
    g = torch.Generator().manual_seed(0)
    vecs = {i: torch.randn(lm.hidden_size, generator=g) for i in range(lm.n_layers)}
    return SteeringVector(vecs, {"units": "raw", "recommended": {"layers": [lm.n_layers // 3], "strength": 1.0}})


def per_token(lm, controls, tokens: int) -> tuple[float, float]:
    """Wall-clock decode seconds per token, and CPU seconds of this process per generated token.

    CPU time counts only our own threads, so it is far less sensitive to other jobs on a shared
    machine than wall time (it still includes the short prefill).
    """
    c0 = time.process_time()
    gens = ts.generate(lm, PROMPTS, controls=controls, max_tokens=tokens, ignore_eos=True)
    cpu = time.process_time() - c0
    g = gens[0]
    return g.decode_s / max(1, len(g.tokens) - 1), cpu / max(1, len(g.tokens))


def measure(lm, vec: SteeringVector, rounds: int, tokens: int) -> dict:
    first = 1 if lm.name == "llamacpp" else 0  # llama.cpp cannot steer layer 0's output
    configs = {
        "one_layer": [SteeringControl([Steer(vec, 0.1 if vec.units == "relative" else 1.0, [vec.recommended_layers[0]])])],
        "all_layers": [SteeringControl([Steer(vec, 0.05 if vec.units == "relative" else 1.0, [i for i in vec.layers if i >= first])])],
    }
    per_token(lm, [], 4)  # warm-up
    wall: dict[str, list[float]] = {"plain": [], **{k: [] for k in configs}}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    for r in range(rounds):
        order = ["plain", *configs] if r % 2 == 0 else [*configs, "plain"]
        for name in order:
            w, c = per_token(lm, configs.get(name, []), tokens)
            wall[name].append(w)
            cpu[name].append(c)
    mw = {k: statistics.median(v) for k, v in wall.items()}
    mc = {k: statistics.median(v) for k, v in cpu.items()}
    out = {f"{k}_ratio": mc[k] / mc["plain"] for k in configs}  # CPU-time ratio: the headline figure
    out |= {f"{k}_wall_ratio": mw[k] / mw["plain"] for k in configs}
    out["plain_tok_s"] = 1 / mw["plain"]
    out["rounds"] = rounds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vec", help="a trained vector file (default: a random vector; cost does not depend on it)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--backends", default="torch,llamacpp")
    a = ap.parse_args()
    result: dict = {"target": 1.05, "tokens": a.tokens, "batch": len(PROMPTS)}
    for name in a.backends.split(","):
        if name == "llamacpp" and not llamacpp_installed():
            result[name] = {"skipped": "llama-cpp-python not installed"}
            continue
        lm = ts.load(None, backend=name)
        vec = load_vector(a.vec) if a.vec else random_vector(lm)
        r = measure(lm, vec, a.rounds, a.tokens)
        r["met"] = max(r["one_layer_ratio"], r["all_layers_ratio"]) <= 1.05
        result[name] = r
        print(f"{name}: {json.dumps(r)}", file=sys.stderr, flush=True)
        del lm
    print(json.dumps(result))


if __name__ == "__main__":
    main()

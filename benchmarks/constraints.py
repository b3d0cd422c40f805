"""Cost of hard constraints per token, and a banned-words sampling check, on the bundled model.

Per-token decode time with a JSON-schema constraint and with a banned-word set, divided by plain
decoding, measured interleaved in one run (round-robin over the specs, median of the rounds). JSON
is timed twice: as users get it (the schema's fixed text fast-forwarded, hook 7) and with
``fast_forward=False``, which samples every token and so shows the per-step cost of the mask alone.
Then N sampled continuations under a banned set (and a smaller unconstrained baseline): how many
contain a banned word.
The last line is one JSON object with the figures.

    .venv/bin/python benchmarks/constraints.py [--backend torch|llamacpp] [--rounds 5] [--tokens 32]
        [--banned-samples 1000] [--banned-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import tokensteer
from tokensteer.constraints import ConstraintSpec, build
from tokensteer.sampling import SamplingConfig

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 400},
        "story": {"type": "string", "maxLength": 400},
        "age": {"type": "integer"},
    },
    "required": ["name", "story", "age"],
}
BANNED = ["the", "a", "and", "of", "to", "in", "is", "was", "he", "she", "it", "i", "you", "they", "we", "that", "this", "with", "for", "on"]
PROMPTS = [
    "The old lighthouse keeper climbed the stairs one last time and",
    "Here is a short story about a dog, written as JSON:",
    "My favourite recipe starts with",
    "Yesterday at the market",
]


def per_token(lm, spec: ConstraintSpec | None, prompt: str, tokens: int, seed: int) -> float:
    controls = build(lm, spec) if spec else []
    cfg = SamplingConfig(max_tokens=tokens, temperature=0.8, seed=seed, ignore_eos=spec is None)
    g = tokensteer.generate(lm, prompt, cfg, controls)
    n = len(g.tokens) - 1
    return g.decode_s / n if n > 0 else float("nan")


def contains(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text.lower()) is not None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rounds", type=int, default=5, help="0 skips the cost ratios (banned check only)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--banned-samples", type=int, default=1000)
    ap.add_argument("--banned-tokens", type=int, default=8)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--plain-samples", type=int, default=200, help="unconstrained baseline samples (the rate needs fewer)")
    a = ap.parse_args()
    lm = tokensteer.load(None, backend=a.backend)
    t = time.perf_counter()
    build(lm, ConstraintSpec(json_schema=SCHEMA))  # the one-off tables and llguidance tokenizer
    build(lm, ConstraintSpec(ban=BANNED))
    setup_s = time.perf_counter() - t
    specs = {
        "plain": None,
        "json": ConstraintSpec(json_schema=SCHEMA),
        "json_no_ff": ConstraintSpec(json_schema=SCHEMA, fast_forward=False),
        "banned": ConstraintSpec(ban=BANNED),
    }
    times: dict[str, list[float]] = {k: [] for k in specs}
    for r in range(a.rounds):
        names = list(specs)
        for k in names[r % len(names):] + names[: r % len(names)]:  # interleaved, the order rotating per round
            spec = specs[k]
            times[k].append(per_token(lm, spec, PROMPTS[r % len(PROMPTS)], a.tokens, r))
        print(f"round {r}: " + ", ".join(f"{k} {1000 * v[-1]:.1f} ms/token" for k, v in times.items()), flush=True)
    nan = float("nan")
    med = {k: statistics.median(v) if v else nan for k, v in times.items()}
    ratios = {k: med[k] / med["plain"] if times[k] else nan for k in ("json", "json_no_ff", "banned")}
    print(f"median ms/token: {', '.join(f'{k} {1000 * v:.2f}' for k, v in med.items())}; ratios {ratios}")

    hits, counted = {"plain": 0, "banned": 0}, {"plain": 0, "banned": 0}
    cfg = SamplingConfig(max_tokens=a.banned_tokens, temperature=1.0, top_p=1.0)
    done = 0
    while done < a.banned_samples:
        n = min(a.batch, a.banned_samples - done)
        prompts = [PROMPTS[(done + i) % len(PROMPTS)] for i in range(n)]
        for k, spec in (("plain", None), ("banned", ConstraintSpec(ban=BANNED))):
            if k == "plain" and done >= a.plain_samples:
                continue
            gs = tokensteer.generate(lm, prompts, SamplingConfig(**{**cfg.__dict__, "seed": done}), build(lm, spec) if spec else [])
            hits[k] += sum(any(contains(g.text, w) for w in BANNED) for g in gs)
            counted[k] += len(gs)
        done += n
        print(f"banned check: with a banned word: plain {hits['plain']}/{counted['plain']}, constrained {hits['banned']}/{counted['banned']}", flush=True)
    print(
        json.dumps(
            {
                "backend": lm.name,
                "ms_per_token": {k: round(1000 * v, 3) for k, v in med.items()},
                "ratio_json": round(ratios["json"], 4),
                "ratio_json_no_fast_forward": round(ratios["json_no_ff"], 4),
                "ratio_banned": round(ratios["banned"], 4),
                "target_ratio": 1.05,
                "setup_s": round(setup_s, 2),
                "banned_words": len(BANNED),
                "plain_samples": counted["plain"],
                "plain_with_banned": hits["plain"],
                "constrained_samples": counted["banned"],
                "constrained_with_banned": hits["banned"],
            }
        )
    )


if __name__ == "__main__":
    main()

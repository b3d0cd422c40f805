"""Nucleus (top-p) masks on real next-token distributions: ``sampling.nucleus_mask`` (sort only the
tokens above a probability threshold) against the previous method (top 256, then 4,096, then
every token by ``torch.topk``), side by side in one run.

It also times the top-p sampler, which draws from each row's nucleus directly
(``sampling.draw_nucleus``), against the general path (mask, renormalise, ``sampling.draw``) with
the same generators, and checks both pick the same tokens.

The rows are the bundled model's next-token log-probabilities after 16 short prompts (llama.cpp);
it reports the rows where the two keep a different number of tokens (rounding at the boundary: the old method
normalised with ``logsumexp``, the new with ``softmax``).

    .venv/bin/python benchmarks/nucleus.py [--p 0.9] [--repeats 20]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TOKENSTEER_THREADS", "2")

import torch  # noqa: E402

import tokensteer as ts  # noqa: E402
from common import cpu_name  # noqa: E402
from tokensteer.sampling import SamplingConfig, draw, make_sampler, nucleus_mask, sampling_probs  # noqa: E402

PROMPTS = ["The movie was", "I think that", "Yesterday I went to the", "The food at this restaurant", "My favourite thing about",
           "When I was young,", "The weather today is", "This book is about", "He said that the", "In my opinion, the",
           "The best part of the show", "She looked at the", "We decided to", "The new phone", "After the game, the", "It was a"]


def by_topk(logprobs: torch.Tensor, p: float) -> torch.Tensor:
    """The previous method: the top 256, then 4,096, then all tokens of the rows not yet done."""
    V = logprobs.shape[-1]
    log_z = torch.logsumexp(logprobs, dim=-1, keepdim=True)
    out = torch.zeros_like(logprobs, dtype=torch.bool)
    todo = torch.arange(logprobs.shape[0])
    for k in (min(256, V), min(4096, V), V):
        vals, idx = torch.topk(logprobs[todo], k, dim=-1)
        probs = (vals - log_z[todo]).exp()
        cum = probs.cumsum(-1)
        done = (cum[:, -1] >= p) | (k == V)
        if bool(done.any()):
            keep = (cum[done] - probs[done]) < p
            out[todo[done]] = torch.zeros_like(out[todo[done]]).scatter_(-1, idx[done], keep)
        todo = todo[~done]
        if len(todo) == 0:
            break
    return out


def timed(fn, x: torch.Tensor, p: float) -> float:
    t0 = time.perf_counter()
    fn(x, p)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    lm = ts.load(None, backend="llamacpp")
    session = lm.session()
    x = torch.log_softmax(session.prefill([lm.tokenizer.encode(p) for p in PROMPTS]).float(), dim=-1)
    session.close()
    ours, old = nucleus_mask(x, args.p), by_topk(x, args.p)
    times: dict[str, list[float]] = {"threshold": [], "topk": []}
    for _ in range(args.repeats):
        times["threshold"].append(timed(nucleus_mask, x, args.p))
        times["topk"].append(timed(by_topk, x, args.p))
    cfg = SamplingConfig(temperature=1.0, top_p=args.p)
    direct = make_sampler(cfg)
    arms = {"draw_nucleus": lambda: direct(x, gens()), "mask_then_draw": lambda: draw(sampling_probs(cfg, x), gens())}
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(len(x))]  # noqa: E731
    same = all(torch.equal(arms["draw_nucleus"](), arms["mask_then_draw"]()) for _ in range(3))
    times.update({k: [] for k in arms})
    for _ in range(args.repeats):
        for k, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(json.dumps({
        "rows": len(PROMPTS),
        "nucleus_sizes": sorted(ours.sum(-1).tolist()),
        "rows_with_another_size_than_topk": sum(a != b for a, b in zip(ours.sum(-1).tolist(), old.sum(-1).tolist())),
        "threshold_ms": round(med["threshold"], 2),
        "topk_ms": round(med["topk"], 2),
        "speedup": round(med["topk"] / med["threshold"], 2),
        "draw_nucleus_ms": round(med["draw_nucleus"], 2),
        "mask_then_draw_ms": round(med["mask_then_draw"], 2),
        "sampler_speedup": round(med["mask_then_draw"] / med["draw_nucleus"], 2),
        "sampler_same_tokens": same,
        "cpu": cpu_name(),
    }))


if __name__ == "__main__":
    main()

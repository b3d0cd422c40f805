"""tokensteer's steering vectors side by side with repeng and steering-vectors on the bundled model.

Same pairs (the shipped sentiment set), same model, same layer, same evaluation: each library's
vector for that layer is applied through the same additive hook at the same relative strengths
(a fraction of the layer's median residual norm), neutral prompts are continued, VADER judges the
sentiment and the base model the perplexity. Reports training time, whether training is bit-for-bit
repeatable, agreement of directions, and attribute success at matched perplexity. Last line: JSON.

repeng 0.4.0 pins numpy<2 and steering-vectors 0.12.2 pins transformers<5, so they live beside
the venv (``pip install --no-deps --target .bench-libs repeng==0.4.0 steering-vectors==0.12.2``);
pass that folder with --libs. repeng 0.4.0 references ``np.float_`` (removed in numpy 2) in
annotations, so we alias it to ``np.float64`` before importing it.

    .venv/bin/python benchmarks/compare_steering.py --libs .bench-libs [--pairs 64] [--prompts 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

import tokensteer as ts
from tokensteer.steering import Steer, SteeringControl, SteeringVector, load_pairs, train_vector
from tokensteer.steering.scoring import coherence
from tokensteer.steering.search import SEARCH_PROMPTS


def timed(fn):
    """Result and CPU seconds of this process (robust to other jobs on a shared machine)."""
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def unit(v) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(v), dtype=torch.float64).reshape(-1)
    return v / v.norm()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libs", help="folder holding repeng and steering_vectors (installed with --no-deps --target)")
    ap.add_argument("--pairs", type=int, default=64, help="how many sentiment pairs to train on")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--strengths", default="0.05,0.1,0.15")
    ap.add_argument("--factor", type=float, default=1.5, help="perplexity bound for 'success at matched perplexity'")
    ap.add_argument("--no-eval", action="store_true", help="only training time, repeatability and agreement")
    a = ap.parse_args()
    if a.libs:
        sys.path.insert(0, a.libs)
    np.float_ = np.float64  # repeng 0.4.0 annotations use the numpy-1 alias
    lm = ts.load(None, backend="torch")
    model, tok = lm.model, lm.tokenizer.hf
    ps = load_pairs("sentiment")
    ps = type(ps)(ps.name, ps.pairs[: a.pairs], ps.source)
    L = a.layer
    out: dict = {"pairs": len(ps.pairs), "layer": L, "train_cpu_s": {}, "repeatable": {}, "cos_to_ours": {}, "errors": {}}
    dirs: dict[str, torch.Tensor] = {}

    # tokensteer: all layers, twice for the repeatability check
    for method in ("diffmean", "pca"):
        v1, t = timed(lambda: train_vector(lm, ps, method))
        v2 = train_vector(lm, ps, method)
        out["train_cpu_s"][f"tokensteer-{method}"] = t
        out["repeatable"][f"tokensteer-{method}"] = all(torch.equal(v1.vectors[i], v2.vectors[i]) for i in v1.vectors)
        dirs[f"tokensteer-{method}"] = unit(v1.vectors[L])
        if method == "diffmean":
            ours = v1
    median = ours.meta["stats"][str(L)]["median_norm"]

    try:
        from repeng import ControlVector, DatasetEntry

        data = [DatasetEntry(p.positive, p.negative) for p in ps.pairs]
        for method in ("pca_diff", "pca_center"):
            cv, t = timed(lambda: ControlVector.train(model, tok, data, method=method))
            cv2 = ControlVector.train(model, tok, data, method=method)
            out["train_cpu_s"][f"repeng-{method}"] = t
            out["repeatable"][f"repeng-{method}"] = all(np.array_equal(cv.directions[i], cv2.directions[i]) for i in cv.directions)
            dirs[f"repeng-{method}"] = unit(cv.directions[L])
    except Exception as e:  # report exactly why it could not run
        out["errors"]["repeng"] = f"{type(e).__name__}: {e}"

    try:
        from steering_vectors import train_steering_vector

        samples = [(p.positive, p.negative) for p in ps.pairs]
        sv, t = timed(lambda: train_steering_vector(model, tok, samples, show_progress=False))
        sv2 = train_steering_vector(model, tok, samples, show_progress=False)
        out["train_cpu_s"]["steering-vectors-mean"] = t
        out["repeatable"]["steering-vectors-mean"] = all(torch.equal(sv.layer_activations[i], sv2.layer_activations[i]) for i in sv.layer_activations)
        dirs["steering-vectors-mean"] = unit(sv.layer_activations[L].float())
        out["save_load"] = {"steering-vectors": hasattr(sv, "save") or hasattr(sv, "to_file")}
    except Exception as e:
        out["errors"]["steering-vectors"] = f"{type(e).__name__}: {e}"

    ref = dirs["tokensteer-diffmean"]
    out["cos_to_ours"] = {k: float(v @ ref) for k, v in dirs.items()}

    if a.no_eval:
        print(json.dumps(out))
        return
    # the same evaluation for every direction: same hook, same relative strengths, same prompts
    from tokensteer.eval.scorers import sentiment

    prompts = SEARCH_PROMPTS[: a.prompts]
    cfg = ts.SamplingConfig(max_tokens=a.tokens, temperature=1.0, top_p=0.9, stop=("\n",), seed=7)
    base = ts.generate(lm, prompts, cfg)
    base_ppl = statistics.mean(coherence(lm, prompts, [g.tokens for g in base]).perplexity)
    base_pos = statistics.mean(float(s >= 0.05) for s in sentiment([g.text for g in base]))
    out["baseline"] = {"positive_rate": base_pos, "perplexity": base_ppl}
    out["curves"] = {}
    for name, d in dirs.items():
        vec = SteeringVector({L: (d * median).float()}, {"units": "relative"})
        curve = []
        for s in [float(x) for x in a.strengths.split(",")]:
            gens = ts.generate(lm, prompts, cfg, [SteeringControl([Steer(vec, s, [L])])])
            ppl = statistics.mean(coherence(lm, prompts, [g.tokens for g in gens]).perplexity)
            pos = statistics.mean(float(x >= 0.05) for x in sentiment([g.text for g in gens]))
            curve.append({"strength": s, "positive_rate": pos, "ppl_ratio": ppl / base_ppl})
            print(f"{name} {s}: positive {pos:.2f}, perplexity x{ppl / base_ppl:.2f}", file=sys.stderr, flush=True)
        ok = [p["positive_rate"] for p in curve if p["ppl_ratio"] <= a.factor]
        out["curves"][name] = curve
        out.setdefault("success_at_matched_ppl", {})[name] = max(ok) if ok else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()

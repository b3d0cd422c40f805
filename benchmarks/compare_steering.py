"""tokensteer's steering vectors side by side with repeng and steering-vectors on the bundled model.

Same pairs (the shipped sentiment set), same model, same layer, same evaluation: each library's
direction for that layer is scaled to the layer's median residual norm, saved as a vector file and
run through the eval suite itself (``sentiment-positive`` task: neutral prompts, VADER success,
perplexity under the uncontrolled model) at the same relative strengths. Reports training time,
whether training is bit-for-bit repeatable, agreement of directions, each dose-response curve and
attribute success at matched perplexity (interpolated where a curve reaches ``--factor``).
Last line: JSON.

repeng 0.4.0 pins numpy<2 and steering-vectors 0.12.2 pins transformers<5, so they live beside
the venv (``pip install --no-deps --target .bench-libs repeng==0.4.0 steering-vectors==0.12.2``);
pass that folder with --libs. repeng 0.4.0 references ``np.float_`` (removed in numpy 2) in
annotations, so we alias it to ``np.float64`` before importing it.

    OMP_NUM_THREADS=1 TOKENSTEER_THREADS=1 .venv/bin/python benchmarks/compare_steering.py --libs .bench-libs [--prompts 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import tokensteer as ts
from tokensteer.steering import SteeringVector, load_pairs, save_vector, train_vector


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
    ap.add_argument("--layer", type=int, default=11, help="the layer every library's vector is applied at (the search's choice)")
    ap.add_argument("--prompts", type=int, default=40, help="first N prompts of the eval suite's sentiment-positive task")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--strengths", default="0.05,0.08,0.11,0.14", help="relative strengths (fraction of the layer's median residual norm)")
    ap.add_argument("--factor", type=float, default=1.5, help="perplexity ratio at which success is compared")
    ap.add_argument("--backend", default="llamacpp", help="backend that generates the continuations (vectors are trained on torch)")
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
    for method in ("diffmean", "pca", "probe"):
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
    print(json.dumps(out), file=sys.stderr, flush=True)  # the training figures, in case the eval is cut short
    out["eval"] = evaluate(a, ours, dirs, median)
    print(json.dumps(out))


def evaluate(a, ours: SteeringVector, dirs: dict[str, torch.Tensor], median: float) -> dict:
    """The eval suite's own run (sentiment-positive task, VADER, perplexity under the uncontrolled
    model) for every direction at every strength, then attribute success at matched perplexity."""
    import tempfile
    from pathlib import Path

    from tokensteer.eval.runner import run

    L = a.layer
    gen_lm = ts.load(None, backend=a.backend)
    strengths = [float(x) for x in a.strengths.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="compare-steering-"))
    methods, label = ["none"], {}
    for name, d in dirs.items():
        meta = {k: v for k, v in ours.meta.items() if k not in ("recommended", "stats", "path")}
        path = save_vector(SteeringVector({L: (d * median).float()}, meta | {"source": name}), folder / f"{name}.safetensors")
        for s in strengths:
            methods.append(f"steer:{path}@{s}")
            label[f"steer:{path}@{s}"] = (name, s)
    res = run("sentiment-positive", methods, n=a.prompts, out=folder / "eval", lm=gen_lm, report=False,
              sampling=ts.SamplingConfig(max_tokens=a.tokens, temperature=1.0, top_p=0.9, stop=("\n",)),
              progress=lambda stage, done, total: print(f"{stage} {done}/{total}", file=sys.stderr, flush=True) if done == total else None)
    base = res["methods"]["none"]
    ev: dict = {"backend": gen_lm.name, "prompts": res["n_prompts"], "tokens": a.tokens, "factor": a.factor,
                "baseline": {"positive_rate": base["success_rate"], "perplexity": base["perplexity"]}, "curves": {},
                "success_at_matched_ppl": {}, "best_within_factor": {}}
    for m, (name, s) in label.items():
        r = res["methods"][m]
        ev["curves"].setdefault(name, []).append(
            {"strength": s, "positive_rate": r["success_rate"], "ppl_ratio": r["perplexity"] / base["perplexity"]})
    for name, curve in ev["curves"].items():
        curve.sort(key=lambda p: p["strength"])
        pts = [{"strength": 0.0, "positive_rate": base["success_rate"], "ppl_ratio": 1.0}] + curve
        ev["success_at_matched_ppl"][name] = at_ratio(pts, a.factor)
        ok = [p["positive_rate"] for p in curve if p["ppl_ratio"] <= a.factor]
        ev["best_within_factor"][name] = max(ok) if ok else None
        print(name, " ".join(f"{p['strength']}:{p['positive_rate']:.2f}/x{p['ppl_ratio']:.2f}" for p in curve), file=sys.stderr, flush=True)
    return ev


def at_ratio(curve: list[dict], factor: float) -> float | None:
    """Positive rate where the dose-response curve first reaches perplexity ratio ``factor``
    (linear interpolation between the two strengths around it); None if it never gets there."""
    for p, q in zip(curve, curve[1:]):
        if p["ppl_ratio"] <= factor <= q["ppl_ratio"]:
            if q["ppl_ratio"] == p["ppl_ratio"]:
                return q["positive_rate"]
            t = (factor - p["ppl_ratio"]) / (q["ppl_ratio"] - p["ppl_ratio"])
            return p["positive_rate"] + t * (q["positive_rate"] - p["positive_rate"])
    return None


if __name__ == "__main__":
    main()

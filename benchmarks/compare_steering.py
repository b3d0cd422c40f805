"""tokensteer's default steering pipeline side by side with repeng and steering-vectors on the bundled model.

One eval run (``sentiment-positive`` task, VADER success, perplexity under the uncontrolled model)
holds: no steering; the default CLI pipeline's vector exactly as ``tokensteer steer train`` +
``tokensteer steer search`` left it (``--vec``: its layer, strength and guard); and, at the
pipeline's layer (or ``--lib-layer``) and a sweep of strengths, the unguarded direction of each library trained on the
same pairs (``--dirs``: ours diffmean, repeng pca_diff, steering-vectors' mean). Every direction
is scaled to the layer's median residual norm, so strengths are comparable. Success is compared at
matched perplexity: each library's curve is interpolated at the perplexity ratio the default
pipeline reached (and at ``--factor``). Also reports training time, whether training is bit-for-bit
repeatable and the directions' agreement. Last line: JSON.

repeng 0.4.0 pins numpy<2 and steering-vectors 0.12.2 pins transformers<5, so they live beside
the venv (``pip install --no-deps --target .bench-libs repeng==0.4.0 steering-vectors==0.12.2``);
pass that folder with --libs. repeng 0.4.0 references ``np.float_`` (removed in numpy 2) in
annotations, so we alias it to ``np.float64`` before importing it.

    tokensteer steer train --pairs sentiment --out pos.safetensors && tokensteer steer search pos.safetensors
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_steering.py --libs .bench-libs --vec pos.safetensors \\
        --prompts openings_dev --out benchmarks/eval/sentiment-positive-steer-compare-dev

Samples are cached in OUT/cache by method spelling (the pipeline's copy is named by its content), so
a run without ``--vec`` first and the same command with it later generate the libraries' curves once.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tokensteer as ts
from tokensteer.steering import SteeringVector, load_pairs, load_vector, save_vector, train_vector


# repeng runs 32 texts per forward by default, each with its full-vocabulary logits: a smaller batch
# keeps the peak memory of training low on a shared machine (the last-token hidden states change only by rounding).
REPENG_BATCH = 4


def timed(fn):
    """Result and CPU seconds of this process (robust to other jobs on a shared machine)."""
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def unit(v) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(v), dtype=torch.float64).reshape(-1)
    return v / v.norm()


def train_all(lm, ps, layer: int, repeat: bool, wanted: list[str]) -> tuple[dict, dict[str, torch.Tensor], SteeringVector]:
    """The ``wanted`` directions at ``layer`` (unit length; ours diffmean always), training CPU time and (``repeat``) repeatability."""
    model, tok = lm.model, lm.tokenizer.hf
    out: dict = {"train_cpu_s": {}, "repeatable": {}, "errors": {}}
    dirs: dict[str, torch.Tensor] = {}
    for method in ("diffmean", "pca", "probe"):
        if method != "diffmean" and f"tokensteer-{method}" not in wanted:
            continue
        v1, t = timed(lambda: train_vector(lm, ps, method))
        out["train_cpu_s"][f"tokensteer-{method}"] = t
        if repeat:
            v2 = train_vector(lm, ps, method)
            out["repeatable"][f"tokensteer-{method}"] = all(torch.equal(v1.vectors[i], v2.vectors[i]) for i in v1.vectors)
        dirs[f"tokensteer-{method}"] = unit(v1.vectors[layer])
        if method == "diffmean":
            ours = v1
    try:
        from repeng import ControlVector, DatasetEntry

        data = [DatasetEntry(p.positive, p.negative) for p in ps.pairs]
        for method in ("pca_diff", "pca_center"):
            if f"repeng-{method}" not in wanted:
                continue
            cv, t = timed(lambda: ControlVector.train(model, tok, data, method=method, batch_size=REPENG_BATCH))
            out["train_cpu_s"][f"repeng-{method}"] = t
            if repeat:
                cv2 = ControlVector.train(model, tok, data, method=method, batch_size=REPENG_BATCH)
                out["repeatable"][f"repeng-{method}"] = all(np.array_equal(cv.directions[i], cv2.directions[i]) for i in cv.directions)
            dirs[f"repeng-{method}"] = unit(cv.directions[layer])
    except Exception as e:  # report exactly why it could not run
        out["errors"]["repeng"] = f"{type(e).__name__}: {e}"
    try:
        from steering_vectors import train_steering_vector

        samples = [(p.positive, p.negative) for p in ps.pairs]
        if "steering-vectors-mean" in wanted:
            sv, t = timed(lambda: train_steering_vector(model, tok, samples, show_progress=False))
            out["train_cpu_s"]["steering-vectors-mean"] = t
            dirs["steering-vectors-mean"] = unit(sv.layer_activations[layer].float())
            if repeat:
                sv2 = train_steering_vector(model, tok, samples, show_progress=False)
                out["repeatable"]["steering-vectors-mean"] = all(torch.equal(sv.layer_activations[i], sv2.layer_activations[i]) for i in sv.layer_activations)
    except Exception as e:
        out["errors"]["steering-vectors"] = f"{type(e).__name__}: {e}"
    ref = dirs["tokensteer-diffmean"]
    out["cos_to_ours"] = {k: float(v @ ref) for k, v in dirs.items()}
    return out, dirs, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libs", help="folder holding repeng and steering_vectors (installed with --no-deps --target)")
    ap.add_argument("--vec", help="the default pipeline's vector (`steer train` then `steer search`); without it, only the libraries' curves")
    ap.add_argument("--layer", type=int, default=11, help="the layer without --vec (with it: the pipeline's layer)")
    ap.add_argument("--lib-layer", type=int, help="the layer of the libraries' directions (default: the pipeline's, or --layer)")
    ap.add_argument("--pairs", default="sentiment", help="the pairs without --vec (with it: the pairs it was trained on)")
    ap.add_argument("--repeat", action="store_true", help="train everything twice to check bit-for-bit repeatability")
    ap.add_argument("--prompts", default="openings_dev", help="prompt set of the eval (a shipped name such as openings_dev, or a file)")
    ap.add_argument("--n", type=int, help="first N prompts only")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--strengths", default="0.1,0.15,0.2", help="the libraries' strengths (fraction of the layer's median residual norm)")
    ap.add_argument("--dirs", default="tokensteer-diffmean,repeng-pca_diff,steering-vectors-mean", help="the directions evaluated (all are trained)")
    ap.add_argument("--factor", type=float, default=1.5, help="perplexity ratio at which success is also compared")
    ap.add_argument("--backend", default="llamacpp", help="backend that generates the continuations (vectors are trained on torch)")
    ap.add_argument("--seed", type=int, default=0, help="the eval's base seed")
    ap.add_argument("--out", help="folder for the eval run (results.json, report.html, the vectors); default: a temporary folder")
    ap.add_argument("--no-eval", action="store_true", help="only training time, repeatability and agreement")
    a = ap.parse_args()
    if a.libs:
        sys.path.insert(0, a.libs)
    np.float_ = np.float64  # repeng 0.4.0 annotations use the numpy-1 alias
    pipeline = load_vector(a.vec) if a.vec else None
    rec = pipeline.meta.get("recommended", {}) if pipeline else {}
    layer = a.lib_layer if a.lib_layer is not None else rec["layers"][0] if pipeline else a.layer
    ps = load_pairs(pipeline.meta["pairs"]["name"] if pipeline else a.pairs)
    if pipeline and ps.sha256 != pipeline.meta["pairs"].get("sha256"):
        sys.exit(f"{a.vec} was trained on other pairs than the shipped {ps.name!r} set")
    trained = Path(a.out or ".") / "vectors" / f"training-layer{layer}.pt"
    if a.out and trained.is_file():  # an earlier run's directions (training is deterministic): no second training
        out, dirs, ours = torch.load(trained, weights_only=False)
    else:
        lm = ts.load(None, backend="torch")
        out, dirs, ours = train_all(lm, ps, layer, a.repeat, a.dirs.split(","))
        del lm  # the torch model is not needed to generate: free its memory
        gc.collect()
        if a.out:
            trained.parent.mkdir(parents=True, exist_ok=True)
            torch.save((out, dirs, ours), trained)
    out |= {"pairs": len(ps.pairs), "layer": layer, "lib_layer": layer, "pipeline": {k: rec.get(k) for k in ("layers", "strength", "positions", "guard")}}
    if a.no_eval:
        print(json.dumps(out))
        return
    print(json.dumps(out), file=sys.stderr, flush=True)  # the training figures, in case the eval is cut short
    out["eval"] = evaluate(a, pipeline, ours, dirs, layer)
    print(json.dumps(out))


def evaluate(a, pipeline: SteeringVector | None, ours: SteeringVector, dirs: dict[str, torch.Tensor], layer: int) -> dict:
    """One eval run of every direction at every strength plus the pipeline's own vector; success at matched perplexity."""
    import tempfile

    from tokensteer.eval.runner import run

    folder = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="compare-steering-"))
    vecs = folder / "vectors"
    vecs.mkdir(parents=True, exist_ok=True)
    median = ours.meta["stats"][str(layer)]["median_norm"]
    strengths = [float(x) for x in a.strengths.split(",")]
    methods, label, pipe = ["none"], {}, None
    if a.vec:  # named by content: the eval's sample cache keys on the method's spelling
        digest = hashlib.sha256(Path(a.vec).read_bytes()).hexdigest()[:10]
        shutil.copyfile(a.vec, vecs / f"pipeline-{digest}.safetensors")
        pipe = f"steer:{vecs / f'pipeline-{digest}.safetensors'}"
        methods.append(pipe)
    for name, d in dirs.items():
        if name not in a.dirs.split(","):
            continue
        meta = {k: v for k, v in ours.meta.items() if k not in ("recommended", "stats", "path")}
        path, new = vecs / f"{name}.safetensors", vecs / f"{name}.new.safetensors"
        save_vector(SteeringVector({layer: (d * median).float()}, meta | {"source": name}), new)
        if path.is_file():  # the sample cache keys on this path: keep the vector its samples came from
            same = same_vectors(path, new)
            new.unlink()
            if not same:
                sys.exit(f"{path} holds another vector (another layer?) whose samples are cached under its name; use a new --out")
        else:
            new.replace(path)
        for s in strengths:
            methods.append(f"steer:{path}@{s}")
            label[f"steer:{path}@{s}"] = (name, s)
    gen_lm = ts.load(None, backend=a.backend)
    res = run("sentiment-positive", methods, prompts=a.prompts, n=a.n, out=folder, lm=gen_lm, seed=a.seed,
              sampling=ts.SamplingConfig(max_tokens=a.tokens, temperature=1.0, top_p=0.9, stop=("\n",)),
              progress=lambda stage, done, total: print(f"{stage} {done}/{total}", file=sys.stderr, flush=True) if done == total else None)
    base = res["methods"]["none"]
    p = res["methods"][pipe] if pipe else None
    matched = p["perplexity"] / base["perplexity"] if p else a.factor
    ev: dict = {"backend": gen_lm.name, "prompts": a.prompts, "n_prompts": res["n_prompts"], "tokens": a.tokens, "seed": a.seed,
                "factor": a.factor, "baseline": {"positive_rate": base["success_rate"], "perplexity": base["perplexity"], "distinct_2": base["distinct_2"]},
                "pipeline": p and {"method": pipe, "positive_rate": p["success_rate"], "ppl_ratio": matched, "ppl_median_ratio":
                                   p["perplexity_median"] / base["perplexity_median"], "distinct_2": p["distinct_2"],
                                   "distinct_2_ratio": p["distinct_2"] / base["distinct_2"], "tok_s": p["tok_s"]},
                "curves": {}, "success_at_pipeline_ppl": {}, "success_at_pipeline_median_ppl": {}, "success_at_factor": {}, "best_within_factor": {}}
    for m, (name, s) in label.items():
        r = res["methods"][m]
        ev["curves"].setdefault(name, []).append(
            {"strength": s, "positive_rate": r["success_rate"], "ppl_ratio": r["perplexity"] / base["perplexity"],
             "ppl_median_ratio": r["perplexity_median"] / base["perplexity_median"], "distinct_2": r["distinct_2"]})
    for name, curve in ev["curves"].items():
        curve.sort(key=lambda q: q["strength"])
        pts = [{"strength": 0.0, "positive_rate": base["success_rate"], "ppl_ratio": 1.0, "ppl_median_ratio": 1.0}] + curve
        ev["success_at_pipeline_ppl"][name] = at_ratio(pts, matched)
        if p:  # the mean ratio is swayed by a few outlier texts: also match the median ratio
            ev["success_at_pipeline_median_ppl"][name] = at_ratio(pts, ev["pipeline"]["ppl_median_ratio"], "ppl_median_ratio")
        ev["success_at_factor"][name] = at_ratio(pts, a.factor)
        ok = [q["positive_rate"] for q in curve if q["ppl_ratio"] <= a.factor]
        ev["best_within_factor"][name] = max(ok) if ok else None
        print(name, " ".join(f"{q['strength']}:{q['positive_rate']:.2f}/x{q['ppl_ratio']:.2f}" for q in curve), file=sys.stderr, flush=True)
    print(f"pipeline {p and p['success_rate']} at x{matched:.2f}; none {base['success_rate']:.3f}", file=sys.stderr, flush=True)
    return ev


def same_vectors(a: Path, b: Path) -> bool:
    """Same layers and directions up to rounding (the metadata holds a creation time, and repeng's
    training is not bit-for-bit repeatable)."""
    va, vb = load_vector(a), load_vector(b)
    return sorted(va.vectors) == sorted(vb.vectors) and all(torch.allclose(va.vectors[i], vb.vectors[i], rtol=1e-3, atol=1e-4 * float(va.vectors[i].abs().max()))
                                                            for i in va.vectors)


def at_ratio(curve: list[dict], factor: float, key: str = "ppl_ratio") -> float | None:
    """Positive rate where the dose-response curve first reaches perplexity ratio ``factor``
    (``key``: the mean or median ratio; linear interpolation between the two strengths around it);
    None if it never gets there."""
    for p, q in zip(curve, curve[1:]):
        if p[key] <= factor <= q[key]:
            if q[key] == p[key]:
                return q["positive_rate"]
            t = (factor - p[key]) / (q[key] - p[key])
            return p["positive_rate"] + t * (q["positive_rate"] - p["positive_rate"])
    return None


if __name__ == "__main__":
    main()

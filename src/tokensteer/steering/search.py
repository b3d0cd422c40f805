"""Automatic layer and strength: rank layers cheaply, then bisect strength under a coherence bound.

Stage 1 ranks layers by held-out probe separability (computed at training time). Stage 2 tries the
best few at one strength on a few prompts and keeps the layer that moves the attribute most per
unit of perplexity. The strength search doubles, then bisects, to find the strongest dose whose
steered text stays coherent: the eval suite's perplexity (the text re-tokenized after its prompt,
under the base model, ratio of means) ≤ ``factor`` × the uncontrolled text's at a one-sided
bootstrap confidence bound, mean KL(steered ‖ base) ≤ ``kl_max`` nats per token, and distinct-2
≥ ``min_distinct`` × the uncontrolled text's (text that repeats itself has a low perplexity, so
only this catches it). Prompts are neutral openers held out from the eval suite's. The strongest
coherent dose wins; the whole dose–response curve is saved in the vector file and as a plot.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Callable, Sequence


from tokensteer.errors import UserError
from tokensteer.eval.scorers import distinct_n
from tokensteer.sampling import SamplingConfig
from tokensteer.steering.apply import Steer, controls_for
from tokensteer.steering.scoring import coherence, continuation_ids, ratio_upper_bound
from tokensteer.steering.search_prompts import SEARCH_PROMPTS
from tokensteer.steering.train import default_band
from tokensteer.steering.vecfile import SteeringVector

Scorer = Callable[[Sequence[str]], list[float]]  # texts -> attribute success in [0, 1] per text
Say = Callable[[str], None]


@dataclass
class Point:
    """One evaluated dose."""

    layer: int
    strength: float
    score: float  # mean attribute success of the steered texts
    perplexity: float  # mean base-model perplexity of the steered texts
    ppl_ratio: float
    kl: float  # mean KL(steered ‖ base) per token
    feasible: bool
    ppl_ratio_bound: float = float("nan")  # one-sided bootstrap upper bound of ppl_ratio
    layers: list[int] = field(default_factory=list)
    distinct2: float = float("nan")  # distinct-2 of the texts (repetition, which perplexity misses)


@dataclass
class SearchResult:
    layers: list[int]
    strength: float
    baseline: dict
    curve: list[Point] = field(default_factory=list)
    layer_trials: list[Point] = field(default_factory=list)


def vader_scorer(texts: Sequence[str]) -> list[float]:
    """1 for a positive continuation by VADER (compound ≥ 0.05, VADER's own threshold), else 0."""
    from tokensteer.eval.scorers import sentiment

    return [float(s >= 0.05) for s in sentiment(texts)]


def probe_scorer(lm, vec: SteeringVector, layer: int) -> Scorer:
    """1 when the vector's own logistic probe (read on the unsteered model) calls a text positive."""
    w, b = vec.probes[layer][:-1].double(), float(vec.probes[layer][-1])
    read = vec.meta.get("method", {}).get("read", "mean")

    def score(texts: Sequence[str]) -> list[float]:
        from tokensteer.steering.train import read_features

        keep = [t if t.strip() else "." for t in texts]
        feats, _ = read_features(lm, keep, [layer], read)
        return [float(float(f[0] @ w) + b > 0) for f in feats]

    return score


def default_scorer(lm, vec: SteeringVector, layer: int) -> tuple[str, Scorer]:
    """VADER for sentiment vectors, else the vector's own probe."""
    if vec.meta.get("pairs", {}).get("name") == "sentiment":
        return "vader", vader_scorer
    if layer not in vec.probes:
        raise UserError("this vector has no probe weights to score the attribute with (vectors imported from llama.cpp or repeng lack them); "
                        "search a vector trained by `tokensteer steer train`, or pass scorer= in Python")
    return "probe", probe_scorer(lm, vec, layer)


def evaluate_dose(lm, vec, layers, strength, prompts, cfg, scorer, base, confidence, positions="all", guard=None) -> Point:
    """Generate with one dose, then score it: attribute, the eval's perplexity ratio with its bound, KL
    of the distribution sampled from the base's (within the guard's nucleus when guarded: what the
    text is drawn from) and distinct-2, which catches the repetition a narrow nucleus can cause."""
    from tokensteer.engine import generate

    ctls = controls_for([Steer(vec, strength, layers, positions, guard=guard)])
    ctl = ctls[0]
    gens = generate(lm, prompts, cfg, ctls)
    texts = [g.text for g in gens]
    coh = coherence(lm, prompts, continuation_ids(lm, prompts, texts), ctl.residual_edits(len(prompts), 1), guard)
    ratio, bound = ratio_upper_bound(coh.perplexity, base, confidence)
    kl = mean(coh.kl) if coh.kl else 0.0
    return Point(layers[0], strength, mean(scorer(texts)), _mean_finite(coh.perplexity), ratio, kl, True, bound, list(layers),
                 distinct_n(texts, 2))


def failed(p: Point, base_distinct2: float, factor: float, kl_max: float, min_distinct: float) -> list[str]:
    """The coherence criteria a dose fails, in words (empty: the dose is coherent)."""
    why = []
    if not p.ppl_ratio_bound <= factor:
        why.append(f"perplexity bound ×{p.ppl_ratio_bound:.2f} > ×{factor:g}")
    if not p.kl <= kl_max:
        why.append(f"KL {p.kl:.2f} > {kl_max:g}")
    if math.isfinite(base_distinct2) and not p.distinct2 >= min_distinct * base_distinct2:
        why.append(f"distinct-2 {p.distinct2:.2f} < {min_distinct:g} × uncontrolled {base_distinct2:.2f} (repetitive)")
    return why


def _mean_finite(xs: Sequence[float]) -> float:
    ok = [x for x in xs if math.isfinite(x)]
    return mean(ok) if ok else float("inf")


def search(
    lm,
    vec: SteeringVector,
    scorer: Scorer | None = None,
    prompts: Sequence[str] = SEARCH_PROMPTS,
    factor: float = 1.5,
    kl_max: float = 2.0,
    min_distinct: float = 0.6,
    layers: Sequence[int] | None = None,
    n_layer_trials: int = 3,
    layer_prompts: int = 16,
    probe_strength: float = 0.25,
    max_strength: float = 2.0,
    bisect_steps: int = 3,
    confidence: float = 0.9,
    positions: str = "all",
    cfg: SamplingConfig | None = None,
    say: Say | None = None,
    guard: float | None = None,
) -> SearchResult:
    """Choose layers (unless given) and the strongest strength whose perplexity bound holds; returns the curve.

    Perplexity is the eval suite's (the continuation text re-tokenized after its prompt, scored by
    the uncontrolled model, mean over prompts); a dose is coherent when the one-sided
    ``confidence`` bootstrap bound of its ratio to the uncontrolled text's is ≤ ``factor``, so a
    lucky draw of prompts does not pass a dose the evaluation would reject; its KL and repetition
    must stay within ``kl_max`` and ``min_distinct`` as well (see ``failed``).
    """
    vec.check_model(lm)
    by_probe = scorer is None and vec.meta.get("pairs", {}).get("name") != "sentiment"
    if by_probe:  # no way to score the attribute (no probe at all, or none for a chosen layer): say so before generating
        for i in (layers or []) if vec.probes else vec.layers[:1]:
            default_scorer(lm, vec, i)
    cfg = cfg or SamplingConfig(max_tokens=32, temperature=1.0, top_p=0.9, stop=("\n",), seed=1234)
    say = say or (lambda _msg: None)
    from tokensteer.engine import generate

    prompts = list(prompts)
    say(f"continuing {len(prompts)} prompts without steering for the baseline…")
    base = generate(lm, prompts, cfg)
    base_texts = [g.text for g in base]
    base_ppls = coherence(lm, prompts, continuation_ids(lm, prompts, base_texts)).perplexity
    base_ppl = _mean_finite(base_ppls)
    base_distinct2 = distinct_n(base_texts, 2)

    def feasible(p: Point) -> bool:
        return not failed(p, base_distinct2, factor, kl_max, min_distinct)

    # Stage 1: held-out separability ranks the layers; stage 2: the top few are tried causally at
    # the first dose on the first few prompts; the one that gains most attribute per nat of
    # perplexity wins.
    trials: list[Point] = []
    if layers is None:
        stats = vec.meta.get("stats", {})
        usable = [i for i in vec.layers if i in vec.probes or not by_probe]  # scoring by probe needs the layer's probe
        band = [i for i in default_band(lm.n_layers) if i in usable] or usable  # a vector made elsewhere may lack the middle layers
        ranked = sorted(band, key=lambda i: (-stats.get(str(i), {}).get("heldout_d_prime", 0.0), i))
        k = max(2, min(layer_prompts, len(prompts)))
        best, best_key = None, None
        say(f"trying layers {', '.join(map(str, ranked[:n_layer_trials]))} on {k} prompts…")
        for li in ranked[:n_layer_trials]:
            name, sc = ("given", scorer) if scorer else default_scorer(lm, vec, li)
            p = evaluate_dose(lm, vec, [li], min(probe_strength / 2, max_strength), prompts[:k], cfg, sc, base_ppls[:k], confidence, positions, guard)
            p.feasible = feasible(p)
            trials.append(p)
            gain = p.score - mean(sc(base_texts[:k]))
            say(f"layer {li}: score {p.score:.2f} (+{gain:.2f}), perplexity ×{p.ppl_ratio:.2f} (bound ×{p.ppl_ratio_bound:.2f}), KL {p.kl:.2f}, distinct-2 {p.distinct2:.2f}")
            key = gain / max(math.log(p.ppl_ratio), 0.05)  # attribute gained per nat of perplexity
            if best_key is None or key > best_key:
                best, best_key = li, key
        layers = [best]
    layers = list(layers)
    name, sc = ("given", scorer) if scorer else default_scorer(lm, vec, layers[0])
    base_score = mean(sc(base_texts))
    curve: list[Point] = [Point(layers[0], 0.0, base_score, base_ppl, 1.0, 0.0, True, 1.0, layers, base_distinct2)]

    def run(s: float) -> Point:
        p = evaluate_dose(lm, vec, layers, s, prompts, cfg, sc, base_ppls, confidence, positions, guard)
        p.feasible = feasible(p)
        curve.append(p)
        why = failed(p, base_distinct2, factor, kl_max, min_distinct)
        say(f"strength {s:.3g}: score {p.score:.2f}, perplexity ×{p.ppl_ratio:.2f} (bound ×{p.ppl_ratio_bound:.2f}), KL {p.kl:.2f}, "
            f"distinct-2 {p.distinct2:.2f} (uncontrolled {base_distinct2:.2f}){' — rejected: ' + '; '.join(why) if why else ''}")
        return p

    say(f"searching the strength at layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))} on {len(prompts)} prompts…")
    lo, hi, s = 0.0, None, min(probe_strength / 2, max_strength)  # a small --max-strength is still tried
    while s <= max_strength:
        if run(s).feasible:
            lo, s = s, s * 2
        else:
            hi = s
            break
    if hi is not None:
        for _ in range(bisect_steps):
            mid = (lo + hi) / 2
            if run(mid).feasible:
                lo = mid
            else:
                hi = mid
    if not any(p.feasible and p.strength > 0 for p in curve):
        weakest = min((p for p in curve if p.strength > 0), key=lambda p: p.strength)
        raise UserError(f"no strength kept the text coherent: the weakest dose, {weakest.strength:.3g}, failed on "
                        f"{'; '.join(failed(weakest, base_distinct2, factor, kl_max, min_distinct))}; "
                        "try other layers, a lower --max-strength, or looser --factor / --kl-max / --min-distinct")
    chosen = choose(curve)
    curve.sort(key=lambda p: p.strength)
    return SearchResult(
        layers, chosen.strength,
        {"score": base_score, "perplexity": base_ppl, "distinct2": base_distinct2, "scorer": name, "factor": factor, "kl_max": kl_max,
         "min_distinct": min_distinct,
         "confidence": confidence, "positions": positions, "guard": guard, "prompts": len(prompts),
         "perplexity_definition": "eval suite: text re-tokenized after its prompt, uncontrolled model, ratio of means",
         "sampling": {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}},
        curve, trials,
    )


def choose(curve: Sequence[Point]) -> Point:
    """The strongest coherent dose: the attribute rises with strength in expectation, and one dose's
    score on a few dozen prompts is too noisy (±6 points at 48) to rank two nearby doses by it."""
    ok = [p for p in curve if p.feasible and p.strength > 0]
    if not ok:
        raise UserError("no strength kept the text coherent; try other layers or a looser --factor")
    return max(ok, key=lambda p: p.strength)


def record(vec: SteeringVector, res: SearchResult) -> None:
    """Store the search's choice and curve in the vector's metadata."""
    vec.meta["recommended"] = {
        "layers": res.layers,
        "strength": res.strength,
        "positions": res.baseline.get("positions", "all"),
        "guard": res.baseline.get("guard"),
        "by": "automatic search (strongest dose with the bootstrap bound of perplexity ≤ factor × uncontrolled, KL ≤ kl_max "
              "and distinct-2 ≥ min_distinct × uncontrolled)",
        "criteria": res.baseline,
        "curve": [asdict(p) for p in res.curve],
        "layer_trials": [asdict(p) for p in res.layer_trials],
    }


def plot(res: SearchResult, path: str | Path) -> Path:
    """Dose–response plot: attribute score and perplexity ratio against strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokensteer.files import atomic_write
    from tokensteer.steering.vecfile import check_writable, expand

    xs = [p.strength for p in res.curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [p.score for p in res.curve], "o-", color="tab:blue", label="attribute score")
    ax.set_xlabel("strength (fraction of median residual norm)")
    ax.set_ylabel("attribute score", color="tab:blue")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(xs, [p.ppl_ratio for p in res.curve], "s--", color="tab:red", label="perplexity ratio")
    bounds = [p.ppl_ratio_bound for p in res.curve]
    if any(math.isfinite(b) for b in bounds):
        ax2.plot(xs, bounds, "v:", color="tab:orange", label="its upper bound")
    ax2.axhline(res.baseline["factor"], color="tab:red", lw=0.8, ls=":")
    ax2.set_ylabel("perplexity / uncontrolled", color="tab:red")
    ax.axvline(res.strength, color="k", lw=0.8)
    ax.set_title(f"layers {res.layers}: chosen strength {res.strength:.3g}")
    fig.tight_layout()
    path = expand(path)
    check_writable(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path

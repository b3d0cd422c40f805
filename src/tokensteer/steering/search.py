"""Automatic layer and strength: rank layers cheaply, then search each candidate's strength within the budget.

Stage 1 ranks layers by held-out probe separability (computed at training time) and, by default,
takes the best. With ``n_layer_trials`` > 1, stage 2 gives the best few a short strength search on a
few prompts and keeps the layer whose strongest coherent dose moves the attribute most: what a user
gets from a layer is its effect at the dose the budget allows, not at some small dose. The strength search doubles, then
bisects, to find the strongest coherent dose: the eval suite's perplexity (the text re-tokenized
after its prompt, under the base model, ratio of means) at most ``aim`` × the uncontrolled text's
and its one-sided bootstrap bound at most ``factor`` ×, mean KL(steered ‖ base) ≤ ``kl_max`` nats
per token, and distinct-2 ≥ ``min_distinct`` × the uncontrolled text's (text that repeats itself
has a low perplexity, so only this catches it). Prompts are neutral openers held out from the eval
suite's. The strongest coherent dose wins, moved toward the next dose up to where the interpolated
perplexity ratio reaches ``aim`` when that dose failed on the aim alone; the whole dose–response
curve is saved in the vector file and as a plot.
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


def failed(p: Point, base_distinct2: float, factor: float, kl_max: float, min_distinct: float, aim: float | None = None) -> list[str]:
    """The coherence criteria a dose fails, in words (empty: the dose is coherent); ``aim`` bounds the
    perplexity ratio's estimate, ``factor`` its bootstrap bound."""
    why = []
    if aim is not None and not p.ppl_ratio <= aim:
        why.append(f"perplexity ×{p.ppl_ratio:.2f} > aim ×{aim:g}")
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
    n_layer_trials: int = 1,
    layer_prompts: int = 24,
    probe_strength: float = 0.25,
    max_strength: float = 2.0,
    bisect_steps: int = 3,
    confidence: float = 0.9,
    positions: str = "all",
    cfg: SamplingConfig | None = None,
    say: Say | None = None,
    guard: float | None = None,
    aim: float | None = None,
    layer_bisect_steps: int = 1,
) -> SearchResult:
    """Choose layers (unless given) and the strongest strength within the perplexity budget; returns the curve.

    Perplexity is the eval suite's (the continuation text re-tokenized after its prompt, scored by
    the uncontrolled model, mean over prompts). A dose is coherent when its ratio to the uncontrolled
    text's is at most ``aim`` (the budget ``factor`` less a margin for prompts the search never saw;
    None: no such check), the one-sided ``confidence`` bootstrap bound of that ratio is at most
    ``factor`` (with ``confidence`` 0.5 the bound is the estimate, so ``aim`` decides), and its KL
    and repetition stay within ``kl_max`` and ``min_distinct`` (see ``failed``). Layers: each of the ``n_layer_trials`` best by held-out
    separability gets a short strength search on the first ``layer_prompts`` prompts, and the one
    whose strongest coherent dose moves the attribute most wins; its search then goes on from there
    on all prompts. With one trial (the default) the best separated layer is taken without trials:
    on a few dozen prompts the trials' scores differ by less than their noise.
    """
    vec.check_model(lm)
    aim = None if aim is None else min(aim, factor)
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

    def why_not(p: Point, k: int) -> list[str]:
        return failed(p, distinct_n(base_texts[:k], 2), factor, kl_max, min_distinct, aim)

    def strengths(ls: list[int], k: int, sc: Scorer, steps: int, curve: list[Point], lo: float = 0.0,
                  hi: float | None = None, s: float | None = None) -> None:
        """Double from ``s`` while doses pass (up to ``hi`` when known), then bisect; doses go into ``curve``."""
        def run(x: float) -> bool:
            p = evaluate_dose(lm, vec, ls, x, prompts[:k], cfg, sc, base_ppls[:k], confidence, positions, guard)
            why = why_not(p, k)
            p.feasible = not why
            curve.append(p)
            say(f"{'layer ' + str(ls[0]) + ', ' if k < len(prompts) else ''}strength {x:.3g}: score {p.score:.2f}, "
                f"perplexity ×{p.ppl_ratio:.2f} (bound ×{p.ppl_ratio_bound:.2f}), KL {p.kl:.2f}, distinct-2 {p.distinct2:.2f}"
                f"{' — rejected: ' + '; '.join(why) if why else ''}")
            return p.feasible

        s = min(probe_strength / 2, max_strength) if s is None else s  # a small --max-strength is still tried
        while s <= max_strength and (hi is None or s < hi):
            if run(s):
                lo, s = s, s * 2
            else:
                hi = s
                break
        for _ in range(steps if hi is not None else 0):
            mid = (lo + hi) / 2
            if run(mid):
                lo = mid
            else:
                hi = mid

    # Stage 1: held-out separability ranks the layers; stage 2: the top few each get a short strength
    # search on the first few prompts, and the one with the best attribute within the budget wins.
    trials: list[Point] = []
    start: dict = {}
    if layers is None:
        stats = vec.meta.get("stats", {})
        usable = [i for i in vec.layers if i in vec.probes or not by_probe]  # scoring by probe needs the layer's probe
        band = [i for i in default_band(lm.n_layers) if i in usable] or usable  # a vector made elsewhere may lack the middle layers
        ranked = sorted(band, key=lambda i: (-stats.get(str(i), {}).get("heldout_d_prime", 0.0), i))
        k = max(2, min(layer_prompts, len(prompts)))
        best, best_key = (ranked[0], 0.0) if n_layer_trials <= 1 or len(ranked) == 1 else (None, None)
        say(f"layer {best}: the best separated" if best is not None else f"trying layers {', '.join(map(str, ranked[:n_layer_trials]))} on {k} prompts…")
        for li in ranked[:n_layer_trials] if best is None else []:
            name, sc = ("given", scorer) if scorer else default_scorer(lm, vec, li)
            mine: list[Point] = []
            strengths([li], k, sc, layer_bisect_steps, mine)
            trials += mine
            ok = [p for p in mine if p.feasible]
            top = max(ok, key=lambda p: p.strength) if ok else None
            say(f"layer {li}: " + (f"score {top.score:.2f} at strength {top.strength:.3g} within the budget" if top else "no dose within the budget"))
            key = top.score if top else -1.0  # ties go to the better separated layer
            if best_key is None or key > best_key:
                best, best_key = li, key
                above = [p.strength for p in mine if not p.feasible and (top is None or p.strength > top.strength)]
                start = {"s": top.strength if top else min(p.strength for p in mine), "hi": min(above, default=None)}
        layers = [best]
    layers = list(layers)
    name, sc = ("given", scorer) if scorer else default_scorer(lm, vec, layers[0])
    base_score = mean(sc(base_texts))
    base_distinct2 = distinct_n(base_texts, 2)
    curve: list[Point] = [Point(layers[0], 0.0, base_score, base_ppl, 1.0, 0.0, True, 1.0, layers, base_distinct2)]
    say(f"searching the strength at layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))} on {len(prompts)} prompts…")
    if start:  # on from the trial's choice: up towards its first rejected dose, or bisect below it if it fails here
        strengths(layers, len(prompts), sc, max(bisect_steps - 1, 0), curve, s=start["s"], hi=start["hi"])
    else:
        strengths(layers, len(prompts), sc, bisect_steps, curve)
    if not any(p.feasible and p.strength > 0 for p in curve):
        weakest = min((p for p in curve if p.strength > 0), key=lambda p: p.strength)
        raise UserError(f"no strength kept the text coherent: the weakest dose, {weakest.strength:.3g}, failed on "
                        f"{'; '.join(why_not(weakest, len(prompts)))}; "
                        "try other layers, a lower --max-strength, or looser --factor / --aim / --kl-max / --min-distinct")
    chosen = choose(curve)
    strength = chosen.strength
    above = [p for p in curve if p.strength > chosen.strength]
    if aim is not None and above:  # the next dose failed on the aim alone: go to where the curve crosses it
        nxt = min(above, key=lambda p: p.strength)
        if not failed(nxt, base_distinct2, factor, kl_max, min_distinct):
            strength = toward_aim(chosen, nxt, aim)
    curve.sort(key=lambda p: p.strength)
    return SearchResult(
        layers, strength,
        {"score": base_score, "perplexity": base_ppl, "distinct2": base_distinct2, "scorer": name, "factor": factor, "aim": aim,
         "kl_max": kl_max, "min_distinct": min_distinct,
         "confidence": confidence, "positions": positions, "guard": guard, "prompts": len(prompts),
         "layer_prompts": layer_prompts if trials else None,
         "perplexity_definition": "eval suite: text re-tokenized after its prompt, uncontrolled model, ratio of means",
         "sampling": {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}},
        curve, trials,
    )


def toward_aim(lo: Point, hi: Point, aim: float) -> float:
    """The strength between a passing dose ``lo`` and a stronger one ``hi`` whose perplexity ratio is
    above ``aim`` where the log ratio, interpolated linearly in strength, reaches the aim: the
    bisection stops at a bracket, and its weaker end alone would leave part of the budget unused."""
    a, b = math.log(max(lo.ppl_ratio, 1e-9)), math.log(hi.ppl_ratio)
    if not (a <= math.log(aim) < b and math.isfinite(b)):
        return lo.strength
    return round(lo.strength + (hi.strength - lo.strength) * (math.log(aim) - a) / (b - a), 4)


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
        "by": "automatic search (the best separated layer, or with layer trials the one whose strongest coherent dose scores best; strongest dose with perplexity ≤ aim × "
              "uncontrolled, its bootstrap bound ≤ factor ×, KL ≤ kl_max and distinct-2 ≥ min_distinct × uncontrolled, moved to where "
              "the perplexity ratio interpolated toward the next dose reaches the aim when that dose failed on the aim alone)",
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

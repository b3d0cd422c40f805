"""Train a steering vector from contrast pairs: ``diffmean`` (CAA), ``pca`` and ``probe`` (GCAV).

All arithmetic is float64 with exact, unseeded-randomness-free linear algebra, so the same pairs on
the same model give the same vector bit for bit. Directions are scaled to each layer's median
residual norm, so strength is relative (a fraction of the typical residual norm).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch

from tokensteer.errors import UserError
from tokensteer.steering.pairs import PairSet
from tokensteer.steering.vecfile import SteeringVector, model_signature

Method = Literal["diffmean", "pca", "probe"]
Read = Literal["mean", "last"]
METHODS = ("diffmean", "pca", "probe")
READS = ("mean", "last")
Progress = Callable[[int, int], None]


def read_features(
    lm, texts: Sequence[str], layers: Sequence[int], read: Read = "mean", progress: Progress | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled residual features [n_texts, len(layers), H] and per-layer median token norms [len(layers)].

    ``read`` picks the token positions: ``mean`` over every token but BOS, or the ``last`` token.
    """
    if read not in READS:
        raise UserError(f"unknown read position {read!r}; choose one of {', '.join(READS)}")
    feats, norms = [], []
    bos = lm.tokenizer.bos_id
    chunk = 16
    for s in range(0, len(texts), chunk):
        part = list(texts[s : s + chunk])
        for text, h in zip(part, lm.hidden_states(part, list(layers))):  # h: [L, T, H]
            ids = lm.tokenizer.encode(text)
            start = 1 if (bos is not None and ids and ids[0] == bos and h.shape[1] > 1) else 0
            h = h[:, start:].double()
            feats.append(h.mean(dim=1) if read == "mean" else h[:, -1])
            norms.append(h.norm(dim=-1))
        if progress:
            progress(min(s + chunk, len(texts)), len(texts))
    median = torch.cat(norms, dim=1).median(dim=1).values
    return torch.stack(feats), median


def diffmean(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """CAA: the mean of the paired differences."""
    return (pos - neg).mean(dim=0)


def pca(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """First principal direction of the pairs, each centred at its own midpoint.

    Centring per pair (not globally) keeps the mean difference, which is the signal; the exact SVD
    has no random start; the sign is fixed so the direction agrees with the mean difference.
    """
    d = (pos - neg) / 2  # rows are (pos - midpoint); the negative side mirrors them
    _, _, vh = torch.linalg.svd(d, full_matrices=False)
    v = vh[0]
    return -v if float(v @ d.mean(dim=0)) < 0 else v


def probe(pos: torch.Tensor, neg: torch.Tensor, l2: float = 1e-2, iters: int = 200) -> tuple[torch.Tensor, float]:
    """A logistic probe p(positive | h) = σ(w·h + b), fit deterministically (zero start, L-BFGS).

    Features are centred and scaled before fitting; the returned ``w, b`` act on raw hidden states.
    """
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    c = x.mean(dim=0)
    s = float((x - c).norm(dim=1).mean()) or 1.0
    z = (x - c) / s * math.sqrt(x.shape[1])  # unit variance per coordinate on average
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-10)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    scale = math.sqrt(x.shape[1]) / s
    w_raw = w.detach() * scale
    return w_raw, float(b.detach() - w_raw @ c)


def direction(method: Method, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """The unit steering direction of one layer by ``method``."""
    if method == "diffmean":
        v = diffmean(pos, neg)
    elif method == "pca":
        v = pca(pos, neg)
    elif method == "probe":
        v = probe(pos, neg)[0]
    else:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    n = float(v.norm())
    if not math.isfinite(n) or n == 0:
        raise UserError("the positive and negative texts give identical hidden states; the pairs carry no contrast")
    return v / n


def separability(pos: torch.Tensor, neg: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """How well direction ``v`` separates pairs: pair accuracy and Fisher's d′ of the projections."""
    a, b = pos @ v, neg @ v
    sd = math.sqrt((float(a.var()) + float(b.var())) / 2) if len(a) > 1 else 0.0
    return {
        "pair_acc": float((a > b).double().mean()),
        "d_prime": (float(a.mean() - b.mean()) / sd) if sd > 0 else 0.0,
    }


def parse_layers(spec: str | None, n_layers: int) -> list[int] | None:
    """``auto``/None, ``a-b`` (inclusive), ``a,b,c`` or ``k``; returns None for auto."""
    if spec is None or spec == "auto":
        return None
    try:
        out: list[int] = []
        for part in spec.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                if int(a) > int(b):
                    raise UserError(f"layer range {part.strip()!r} runs backwards; write the lower layer first, e.g. {b.strip()}-{a.strip()}")
                out += range(int(a), int(b) + 1)
            else:
                out.append(int(part))
    except UserError:
        raise
    except ValueError:
        raise UserError(f"bad layer list {spec!r}; write auto, 6-9, 5,7 or 6") from None
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad or not out:
        raise UserError(f"layers {bad or spec} out of range: this model has layers 0–{n_layers - 1}")
    return sorted(set(out))


def default_band(n_layers: int) -> list[int]:
    """Layers considered by the automatic choice: the middle half, where steering tends to work."""
    lo, hi = n_layers // 4, max(n_layers // 4 + 1, (3 * n_layers) // 4)
    return list(range(lo, hi))


def train_vector(
    lm,
    pairs: PairSet,
    method: Method = "diffmean",
    layers: Sequence[int] | None = None,
    read: Read = "mean",
    held_out: float = 0.25,
    progress: Progress | None = None,
) -> SteeringVector:
    """Train per-layer vectors on every layer (or ``layers``) and recommend a layer by held-out separability."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    all_layers = list(range(lm.n_layers))
    texts = [t for p in pairs.pairs for t in (p.positive, p.negative)]
    feats, median = read_features(lm, texts, all_layers, read, progress)
    pos, neg = feats[0::2], feats[1::2]
    n = len(pairs.pairs)
    k = max(2, round(1 / held_out))
    test = torch.tensor([i % k == k - 1 for i in range(n)])
    stats, vectors, probes = {}, {}, {}
    for li in all_layers:
        p, q = pos[:, li], neg[:, li]
        v = direction(method, p, q)
        st = {"median_norm": float(median[li]), "diff_norm": float(diffmean(p, q).norm())}
        if n >= 4 and bool(test.any()):
            try:
                vt = direction(method, p[~test], q[~test])
            except UserError:  # the contrast is all in the held-out pairs: no held-out figure for this layer
                vt = None
            if vt is not None:
                st |= {f"heldout_{k2}": v2 for k2, v2 in separability(p[test], q[test], vt).items()}
        proj_p, proj_q = p @ v, q @ v
        st |= {"pos_proj_mean": float(proj_p.mean()), "neg_proj_mean": float(proj_q.mean()),
               "proj_std": float(torch.cat([proj_p - proj_p.mean(), proj_q - proj_q.mean()]).std()) if n > 1 else 0.0}
        stats[str(li)] = st
        vectors[li] = (v * median[li]).float()
        w, b = probe(p, q)
        probes[li] = torch.cat([w, torch.tensor([b], dtype=torch.float64)]).float()
    chosen = list(layers) if layers else None
    if chosen is None:
        band = default_band(lm.n_layers)
        key = lambda i: (stats[str(i)].get("heldout_d_prime", stats[str(i)]["diff_norm"] / stats[str(i)]["median_norm"]), -i)
        chosen = [max(band, key=key)]
    meta = {
        "model": model_signature(lm),
        "units": "relative",
        "method": {"name": method, "read": read, "held_out": held_out, "probe_l2": 1e-2},
        "pairs": {"name": pairs.name, "source": pairs.source, "sha256": pairs.sha256, "n": n},
        "stats": stats,
        "recommended": {"layers": chosen, "strength": 0.1, "positions": "all", "by": "held-out separability" if not layers else "user"},
    }
    return SteeringVector(vectors, meta, probes)

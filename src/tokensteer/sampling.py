"""Samplers as plain functions: ``sample(logprobs[B, V], generator) -> tokens[B]``.

Truncations (top-k, top-p, min-p) and temperature act on log-probabilities that the hooks have
already shaped; greedy is temperature 0 (or below MIN_TEMPERATURE). Seeds go through
``torch.Generator``s, one per prompt, so a prompt's sampled text does not depend on which other
prompts share its batch.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from tokensteer.errors import UserError

Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per row
Sampler = Callable[[torch.Tensor, Generators], torch.Tensor]
NEG_INF = float("-inf")


#: below this temperature sampling is greedy in all but name, and float32 log-probabilities divided
#: by it overflow to -inf (then NaN): such temperatures decode greedily
MIN_TEMPERATURE = 1e-3
#: below the lower bound the tokens already seen (the prompt's <bos> among them) outweigh any new
#: text and decoding repeats them; above the upper one a seen token is as good as banned
REPETITION_PENALTY_RANGE = (0.5, 10.0)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen and when generation stops; every field is checked (type and
    range) on creation, and numbers are normalised (``stop="x"`` becomes ``("x",)``)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | tuple[int, ...] | None = None  # one for the batch (see row_seed), or one per prompt
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # leave tokens that write no text (markers, control) out of the text

    def __post_init__(self) -> None:
        for name in ("max_tokens", "top_k", "top_logprobs"):
            object.__setattr__(self, name, _whole(getattr(self, name), name.replace("_", " ")))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            object.__setattr__(self, name, _real(getattr(self, name), name.replace("_", " ")))
        object.__setattr__(self, "seed", _seeds(self.seed))
        object.__setattr__(self, "stop", _stops(self.stop))
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be True or False, got {getattr(self, name)!r}")
        lo, hi = REPETITION_PENALTY_RANGE
        checks = [
            (self.max_tokens >= 0, f"max tokens must be ≥ 0, got {self.max_tokens}"),
            (0 <= self.temperature < math.inf, f"temperature must be a finite number ≥ 0, got {self.temperature}"),
            (self.top_k >= 0, f"top-k must be ≥ 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top-p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min-p must be in [0, 1), got {self.min_p}"),
            (0 < self.repetition_penalty < math.inf, f"repetition penalty must be a finite number > 0, got {self.repetition_penalty}"),
            (lo <= self.repetition_penalty <= hi,
             f"repetition penalty must be between {lo:g} and {hi:g}, got {self.repetition_penalty:g}: below {lo:g} the tokens "
             f"already seen (the prompt's <bos> too) outweigh any new text, above {hi:g} a seen token is as good as banned "
             "(1 = off, 1.1–1.5 is usual)"),
            (all(-(2**63) <= s < 2**64 for s in _seed_list(self.seed)), f"seeds must fit in 64 bits, got {self.seed}"),
            (0 <= self.top_logprobs <= 20, f"top logprobs must be in [0, 20], got {self.top_logprobs}"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the most likely one (temperature 0, or below MIN_TEMPERATURE)."""
        return self.temperature < MIN_TEMPERATURE


def _whole(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise UserError(f"{what} must be a whole number, got {v!r}")
    return int(v)


def _real(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise UserError(f"{what} must be a number, got {v!r}")
    return float(v)


def _seeds(seed: object) -> int | tuple[int, ...] | None:
    if seed is None:
        return None
    if isinstance(seed, (list, tuple)):
        if not seed:
            raise UserError("seed is an empty list; give one seed, or one per prompt")
        return tuple(_whole(s, "each seed") for s in seed)
    return _whole(seed, "seed")


def _stops(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise UserError(f"stop must be a string or a list of strings, got {stop!r}")
    return tuple(stop)


def top_k(logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k most likely tokens of each row."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = torch.topk(logprobs, k, dim=-1).values[..., -1:]
    return logprobs.masked_fill(logprobs < kth, NEG_INF)


#: nuclei larger than this are drawn from by a pass over the whole row instead of sorted indices
LARGE_NUCLEUS = 4096
#: probability thresholds tried in turn for a row's nucleus candidates (0: the whole row)
NUCLEUS_THRESHOLDS = (1e-4, 1e-6, 0.0)


def nucleus_mask(logprobs: torch.Tensor, p: float) -> torch.Tensor:
    """Bool [B, V]: each row's nucleus, the smallest set of most likely tokens whose probability
    reaches p (rows need not be normalised)."""
    out = torch.zeros_like(logprobs, dtype=torch.bool)
    if p >= 1.0:
        return out.fill_(True)
    out[nucleus_entries(torch.softmax(logprobs.float(), dim=-1), p)] = True
    return out


def nucleus_entries(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, tokens) of every row's nucleus of [B, V] probabilities, by row, then token.

    The tokens above a probability threshold whose mass reaches p hold the nucleus, so only those
    are sorted: one comparison and one sort order every row's candidates at the first threshold
    (``NUCLEUS_THRESHOLDS``), and a row they fall short for tries the lower ones alone (a flat row
    sorts all). Each row's sums run over its own tokens, so its nucleus does not depend on the others.
    """
    B, V = probs.shape
    above = probs >= NUCLEUS_THRESHOLDS[0]
    if above.device.type == "cpu":  # numpy's flat nonzero is several times faster than torch's
        flat = torch.from_numpy(np.flatnonzero(above.numpy()))
        rows, cols = flat // V, flat % V
    else:
        rows, cols = above.nonzero(as_tuple=True)
    vals = probs[rows, cols]
    order = torch.argsort(rows.to(torch.float64) * 2 - vals.to(torch.float64))  # by row, likeliest first
    r = rows[order]
    table, slot = _by_row(r, vals[order], B)
    cum = table.cumsum(1)
    short = cum[:, -1] < p if table.shape[1] else torch.ones(B, dtype=torch.bool)
    keep = torch.empty_like(r, dtype=torch.bool)
    keep[order] = ((cum - table) < p)[r, slot] & ~short[r]  # the mass before each kept token is still short of p
    rows, cols = rows[keep], cols[keep]
    if bool(short.any()):
        extra = [(b, _nucleus(probs[b], p)) for b in short.nonzero().squeeze(1).tolist()]
        rows = torch.cat([rows, *(torch.full_like(k, b) for b, k in extra)])
        cols = torch.cat([cols, *(k for _, k in extra)])
        order = torch.argsort(rows * V + cols)
        rows, cols = rows[order], cols[order]
    return rows, cols


def _by_row(rows: torch.Tensor, vals: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries grouped by row (``rows`` ascending) laid out as an [n, longest] table, zero-padded:
    (table, each entry's column in it)."""
    counts = torch.bincount(rows, minlength=n)
    slot = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows]
    table = vals.new_zeros(n, int(counts.max()) if len(rows) else 0)
    table[rows, slot] = vals
    return table, slot


def _nucleus(row: torch.Tensor, p: float) -> torch.Tensor:
    """One row's nucleus from the lower thresholds (the first one's candidates fell short of p)."""
    for tau in NUCLEUS_THRESHOLDS[1:]:
        idx = (row >= tau).nonzero().squeeze(1) if tau > 0 else None
        vals, order = torch.sort(row if idx is None else row[idx], descending=True)
        cum = vals.cumsum(0)
        if idx is None or (len(cum) and float(cum[-1]) >= p):
            break
    keep = order[(cum - vals) < p]
    return keep if idx is None else idx[keep]


def top_p(logprobs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep each row's nucleus (``nucleus_mask``): nucleus sampling's truncation."""
    if p >= 1.0:
        return logprobs
    return logprobs.masked_fill(~nucleus_mask(logprobs, p), NEG_INF)


def min_p(logprobs: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens less likely than p times the most likely one."""
    if p <= 0.0:
        return logprobs
    thresh = logprobs.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(p))
    return logprobs.masked_fill(logprobs < thresh, NEG_INF)


def greedy(logprobs: torch.Tensor, gen: Generators = None) -> torch.Tensor:
    """Row-wise argmax (first index on ties); on CPU through numpy, whose SIMD argmax is much faster than torch's."""
    if logprobs.device.type == "cpu" and logprobs.dtype == torch.float32 and not logprobs.requires_grad:
        return torch.from_numpy(logprobs.numpy().argmax(axis=-1))
    return logprobs.argmax(dim=-1)


def sampling_probs(cfg: SamplingConfig, logprobs: torch.Tensor) -> torch.Tensor:
    """The [B, V] probabilities the sampler draws from: one-hot on the argmax when greedy, else
    temperature and truncations applied (speculative verification compares these)."""
    if cfg.is_greedy:
        return torch.zeros_like(logprobs).scatter_(-1, greedy(logprobs)[:, None], 1.0)
    lp = min_p(top_p(top_k(logprobs / cfg.temperature, cfg.top_k), cfg.top_p), cfg.min_p)
    return torch.softmax(lp, dim=-1)


def _seed_list(seed: int | tuple[int, ...] | None) -> tuple[int, ...]:
    return () if seed is None else (seed,) if isinstance(seed, int) else tuple(seed)


def row_seed(seed: int, i: int) -> int:
    """Prompt ``i``'s seed in a batch run with ``seed``: the seed itself for the first prompt (a lone
    prompt samples as before), a hash of both for the others, so nearby seeds never share streams."""
    return seed if i == 0 else int.from_bytes(hashlib.sha256(f"{seed}|{i}".encode()).digest()[:8], "little") >> 1


def row_generators(seed: int | tuple[int, ...] | None, n: int) -> list[torch.Generator]:
    """One generator per prompt, seeded by ``row_seed`` or by the i-th of a tuple of seeds: a prompt's
    sampled text then does not depend on how many prompts share its batch or which."""
    if seed is None:
        seed = int(torch.seed() % 2**63)
    seeds = [row_seed(seed, i) for i in range(n)] if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise UserError(f"{len(seeds)} seeds given for {n} prompts; give one seed, or one per prompt")
    return [torch.Generator().manual_seed(s - 2**64 if s >= 2**64 else s) for s in seeds]


def uniforms(gen: Generators, rows: int, n: int = 1) -> torch.Tensor:
    """[rows, n] float64 uniforms in [0, 1): row b from ``gen[b]`` when given one generator per row."""
    if gen is None or isinstance(gen, torch.Generator):
        return torch.rand(rows, n, generator=gen, dtype=torch.float64)
    if len(gen) != rows:
        raise ValueError(f"{len(gen)} generators for {rows} rows")
    return torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in gen])


def draw(probs: torch.Tensor, gen: Generators = None, block: int = 512, u: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row of [B, V] non-negative weights, by a two-level inverse CDF.

    Same distribution as ``torch.multinomial(probs, 1)``, which is slow on a large vocabulary: here
    one pass sums blocks of ``block`` weights, a search picks the block and a second search the
    token inside it. Zero-weight tokens are never drawn. ``u``: the [B, 1] uniforms, if already drawn.
    """
    B, V = probs.shape
    pad = (-V) % block
    p = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    p = p.reshape(B, -1, block)
    sums = p.sum(dim=-1).to(torch.float64)  # [B, n_blocks]
    cum = sums.cumsum(dim=-1)
    u = (uniforms(gen, B) if u is None else u) * cum[:, -1:]
    j = torch.searchsorted(cum, u, right=True).clamp_(max=cum.shape[-1] - 1)  # [B, 1]
    before = torch.where(j > 0, cum.gather(-1, (j - 1).clamp(min=0)), torch.zeros_like(u))
    inner = p[torch.arange(B), j.squeeze(-1)].to(torch.float64).cumsum(dim=-1)  # [B, block]
    rest = torch.minimum(u - before, inner[:, -1:] * (1 - 1e-12))  # rounding may overshoot the block
    k = torch.searchsorted(inner, rest, right=True).clamp_(max=block - 1)
    return (j * block + k).squeeze(-1)


def draw_nucleus(logprobs: torch.Tensor, p: float, gen: Generators = None) -> torch.Tensor:
    """One index per row from each row's nucleus (``nucleus_entries``), renormalised: what ``draw``
    picks from ``sampling_probs`` with top-p alone (the same uniform, the same inverse CDF in token
    order), without building and normalising a [B, V] masked copy."""
    probs = torch.softmax(logprobs.float(), dim=-1)
    B = len(probs)
    u = uniforms(gen, B)
    rows, cols = nucleus_entries(probs, p)
    counts = torch.bincount(rows, minlength=B)
    large = counts > LARGE_NUCLEUS  # drawn by a pass over the row: cheaper than a table that wide
    small = ~large[rows]
    r = rows[small]
    table, slot = _by_row(r, probs[r, cols[small]].to(torch.float64), B)
    tokens = torch.zeros(table.shape, dtype=torch.long)
    tokens[r, slot] = cols[small]
    cum = table.cumsum(1)
    k = torch.searchsorted(cum, u * cum[:, -1:], right=True)
    out = tokens.gather(1, torch.minimum(k, torch.where(large, 0, counts - 1)[:, None])).squeeze(1) if table.shape[1] else torch.zeros(B, dtype=torch.long)
    for b in large.nonzero().squeeze(1).tolist():
        keep = cols[rows == b]
        w = torch.zeros_like(probs[b]).index_copy_(0, keep, probs[b, keep])
        out[b] = draw(w[None], u=u[b : b + 1])[0]
    return out


def make_sampler(cfg: SamplingConfig) -> Sampler:
    """Build the sampler for a config: argmax when greedy (temperature below MIN_TEMPERATURE), else filtered sampling."""
    if cfg.is_greedy:
        return greedy
    if cfg.top_p < 1.0 and not cfg.top_k and not cfg.min_p:

        def sample_top_p(lp: torch.Tensor, gen: Generators) -> torch.Tensor:
            return draw_nucleus(lp if cfg.temperature == 1.0 else lp / cfg.temperature, cfg.top_p, gen)

        return sample_top_p

    def sample(lp: torch.Tensor, gen: Generators) -> torch.Tensor:
        return draw(sampling_probs(cfg, lp), gen)

    return sample

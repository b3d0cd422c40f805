"""Plan a constrained text before writing it: sequential Monte Carlo over whole texts.

Masking alone picks each token without knowing what the constraint will need later, so a text
that must end in "midnight" after four words runs into it wherever it happens to be. Here K
particles per prompt are decoded in a session of the planner's own under the constraints' masks
(the locally constrained proposal of Lew et al. 2023, "Sequential Monte Carlo Steering of Large
Language Models"); each particle's weight gathers the model's probability of the tokens the mask
allowed (what masking took away), particles are resampled when the weights degenerate, and one
finished particle is chosen by weight. The request's own row then takes exactly that text: the
mask allows only the planned token, and with no other masking control the engine feeds the rest
as forced tokens in one forward pass.

Only the base model's distribution (at the request's temperature) is planned for: when another
control rewrites the distribution or edits the model, the planner steps aside and the
constraints mask the request's row as usual.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import torch

from tokensteer.constraints.base import AllOf
from tokensteer.constraints.counts import ExactWords, word_tables
from tokensteer.constraints.smcstate import Particles, Target
from tokensteer.hooks import Control
from tokensteer.sampling import MIN_TEMPERATURE

if TYPE_CHECKING:
    from tokensteer.engine.state import LoopState

#: how particles are weighed by default: sharper than the request's distribution, inside its nucleus,
#: free to end where the count is met, looking ahead to the end word (tuned on count_dev.jsonl)
WEIGH = Target(temperature=0.5, top_p=0.9, outside=-4.0, eos=0.0, twist=1.0)
#: largest log-probability gap between the planner's prefill and the request's own first logits
#: that still counts as the same model (batching changes the last digits, steering far more)
SAME_MODEL_TOL = 1e-2


class SMCPlanner(Control):
    """Constraints (an ``AllOf``) planned by sequential Monte Carlo; see the module doc."""

    label = AllOf.label
    stages = frozenset({"rewrite", "mask", "accept", "force"})

    def __init__(self, make: Callable[[], AllOf], particles: int = 8, resample_below: float = 0.5, weigh: Target = WEIGH) -> None:
        """``weigh``: how particles are weighed, its temperature a factor on the request's and its
        top_p a cap on the request's (see ``Target``)."""
        self.main = make()  # the constraints on the request's row, when the planner steps aside
        self.inner = make()  # the same constraints on the particles
        self.table = self.main.table
        self.requires = self.main.requires
        self.K, self.resample_below, self.weigh = particles, resample_below, weigh

    @property
    def parts(self) -> list[Control]:
        """The constraints planned for (as ``AllOf.parts``)."""
        return self.main.parts

    def __repr__(self) -> str:
        return f"SMCPlanner({self.main!r}, particles={self.K})"

    def start(self, state: LoopState) -> None:
        self.main.start(state)  # its checks (stop strings against the end word) hold either way
        self.plans: list[list[int]] | None = None  # per prompt: the planned tokens, then EOS if it ended so
        self.aside = False

    def finish(self) -> None:
        self.main.finish()

    # -- the request's row ----------------------------------------------------------------
    def logprobs(self, state: LoopState, logprobs: torch.Tensor) -> torch.Tensor:
        if self.plans is None and not self.aside:
            base = state.rows[:, 0]
            # another rewriter or variant rows changed the distribution: plan nothing
            self.aside = state.rows_per_prompt != 1 or not torch.equal(logprobs, base)
            if not self.aside:
                self.plans = self._plan(state)
                self.aside = self.plans is None
        if self.aside:
            return self.main.logprobs(state, logprobs) if self.main.takes("rewrite") else logprobs
        return logprobs

    def mask(self, state: LoopState) -> torch.Tensor | None:
        if self.aside or self.plans is None:
            return self.main.mask(state)
        out = torch.zeros(state.batch_size, self.table.size, dtype=torch.bool)
        for b in range(state.batch_size):
            if state.finished[b]:
                out[b] = True
                continue
            plan, at = self.plans[b], len(state.generated[b])
            if at < len(plan):
                out[b, plan[at]] = True
            else:  # the plan ran to the budget without EOS: the engine stops it there
                out[b] = self.table.eos
        return out

    def on_token(self, state: LoopState, tokens: torch.Tensor) -> None:
        if self.aside or self.plans is None:
            self.main.on_token(state, tokens)

    def forced(self, state: LoopState) -> list[list[int]] | None:
        if self.aside:
            return self.main.forced(state) if self.main.takes("force") else None
        if self.plans is None:
            return None
        eos = self.table.eos_ids
        return [[t for t in plan[len(g) :] if t not in eos] for plan, g in zip(self.plans, state.generated)]

    def unfinished(self, b: int) -> list[str]:
        return self.main.unfinished(b) if self.aside or self.plans is None else self.missing[b]

    # -- the particles --------------------------------------------------------------------
    def _plan(self, state: LoopState) -> list[list[int]] | None:
        """Run the particles to the end for every prompt; None when the model differs from the
        request's (a steering edit): then the row is masked as usual."""
        cfg = getattr(state, "cfg", None)
        greedy = cfg is not None and cfg.temperature < MIN_TEMPERATURE
        temperature = cfg.temperature if cfg is not None and not greedy else 1.0
        top_p = min(cfg.top_p, self.weigh.top_p) if cfg is not None else self.weigh.top_p
        target = replace(self.weigh, temperature=temperature * self.weigh.temperature, top_p=top_p)
        if not any(isinstance(p, ExactWords) and p.end for p in self.parts):  # a bare count ends where a word does
            target = replace(target, boundary=word_tables(self.table)["lead_space"])
        gens = getattr(state, "generators", None) or [torch.Generator().manual_seed(0)]
        ps = Particles(state, self.inner, self.K, target, gens[0])
        try:
            if not ps.same_model(state.rows[:, 0], SAME_MODEL_TOL):
                return None
            while not ps.done():
                ps.step()
                ps.resample(self.resample_below)
            chosen = ps.choose(best=greedy)
            if chosen is None:
                return None
            self.missing = [ps.unfinished(i) for i in chosen]
            return [ps.tokens(i) for i in chosen]
        finally:
            ps.close()


def ess(logw: torch.Tensor) -> float:
    """Effective sample size of log-weights: (sum w)^2 / sum w^2, from 1 (one particle) to K."""
    if not torch.isfinite(logw).any():
        return 0.0
    w = torch.softmax(logw, dim=0)
    return float(1.0 / (w * w).sum())


def systematic(logw: torch.Tensor, u: float) -> list[int]:
    """Systematic resampling: K indices drawn in proportion to exp(logw) with one uniform ``u``."""
    K = len(logw)
    w = torch.softmax(logw.double(), dim=0)
    cum = torch.cumsum(w, 0)
    pos = (torch.arange(K, dtype=torch.float64) + u) / K
    return torch.searchsorted(cum, pos.clamp(max=float(cum[-1]) * (1 - 1e-12))).clamp(max=K - 1).tolist()


def log_mean_exp(logw: torch.Tensor) -> float:
    return float(torch.logsumexp(logw, 0)) - math.log(len(logw))

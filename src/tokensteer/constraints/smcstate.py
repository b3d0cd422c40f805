"""The particles of ``SMCPlanner``: K rows per prompt in a session of their own, their constraints'
state, their log-weights, and resampling (which copies rows of the cache and replays the
constraints over the copied texts)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokensteer.constraints.base import AllOf
from tokensteer.constraints.counts import ExactWords
from tokensteer.sampling import draw, nucleus_mask

if TYPE_CHECKING:
    from tokensteer.engine.state import LoopState


@dataclass(frozen=True)
class Target:
    """The per-token distribution the particles are weighed by: the model's at ``temperature``,
    with tokens outside its ``top_p`` nucleus made ``exp(outside)`` times less likely. A small model
    puts much of its mass on rambling, so the plain distribution conditioned on a count favours
    rambling texts; the nucleus keeps the plan to what the model itself would write."""

    temperature: float = 1.0
    top_p: float = 1.0
    outside: float = 0.0  # log-factor (<= 0) for tokens outside the nucleus; -inf drops them
    eos: float = 1.0  # power of EOS's probability (0: the text may end anywhere the constraints allow)
    twist: float = 0.0  # power of the end word's probability in the look-ahead (0: none); see Particles._twist
    #: tokens that start with whitespace: with these, EOS takes the probability that the word just
    #: written is complete (a count without an end word then ends at a word's end, not inside it)
    boundary: torch.Tensor | None = None

    def __call__(self, logprobs: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(logprobs / self.temperature, dim=-1) if self.temperature != 1.0 else logprobs
        if self.top_p < 1.0 and self.outside < 0:
            lp = torch.log_softmax(torch.where(nucleus_mask(lp, self.top_p), lp, lp + self.outside), dim=-1)
        if self.boundary is not None:
            ends = torch.logsumexp(lp.masked_fill(~(self.boundary | eos), float("-inf")), dim=-1, keepdim=True)
            lp = torch.where(eos, ends.expand_as(lp), lp)
        elif self.eos != 1.0:
            lp = torch.where(eos, lp * self.eos, lp)
        return lp


class Particles:
    """K particles for each prompt of ``state``, decoded under ``constraints`` (see ``SMCPlanner``)."""

    def __init__(self, state: LoopState, constraints: AllOf, K: int, target: Target, gen: torch.Generator) -> None:
        from tokensteer.engine.state import LoopState

        self.K, self.B, self.target, self.gen = K, state.batch_size, target, gen
        self.c = constraints
        self.eos = constraints.table.eos
        rows = [list(state.prompt_tokens[b]) for b in range(self.B) for _ in range(K)]
        self.session = state.backend.session(capacity=len(rows))
        self.st = LoopState(state.backend, rows, 1)
        self.st.max_tokens, self.st.stop = state.max_tokens, tuple(state.stop)
        self.st.set_logits(self.session.prefill(rows))
        self.st.forward_calls = 1
        self.ended: list[int | None] = [None] * len(rows)  # the EOS a particle ended on
        self.logw = torch.zeros(len(rows), dtype=torch.float64)
        self.c.start(self.st)
        self.words = next((p for p in self.c.parts if isinstance(p, ExactWords) and p.end), None)
        if self.words is not None and target.twist:
            end = self.words.end
            self.end_start = constraints.table.memo(("end-as-new-word", end), lambda: constraints.table.flags(lambda t: len(t) > 1 and t[:1] == b" " and end.startswith(t[1:])))
        self.psi = torch.zeros(len(rows), dtype=torch.float64)  # the twist's log-factor now in each weight

    def close(self) -> None:
        self.session.close()
        self.c.finish()

    def same_model(self, own: torch.Tensor, tol: float) -> bool:
        """Whether the particles' first distribution is the request's (no edit changed the model)."""
        mine = self.st.rows[:: self.K, 0]
        return bool((mine - own.float()).abs().max() <= tol)

    def done(self) -> bool:
        return all(self.st.finished) or (self.st.max_tokens is not None and self.st.step >= self.st.max_tokens)

    def step(self) -> None:
        """Every live particle takes one token from the constrained proposal; its weight gains the
        probability mass the constraints left (the proposal's normaliser)."""
        st = self.st
        lp = self.target(st.rows[:, 0], self.eos)
        if self.c.takes("rewrite"):
            lp = self.c.logprobs(st, lp)
        m = self.c.mask(st)
        x = lp if m is None else lp.masked_fill(~m, float("-inf"))
        logz = torch.logsumexp(x, dim=-1)
        dead = torch.isneginf(logz) & ~torch.tensor(st.finished)
        for i in dead.nonzero().flatten().tolist():  # nothing allowed (constraints that cannot meet): weight 0
            st.finished[i], self.logw[i] = True, float("-inf")
        live = ~torch.tensor(st.finished)
        if not live.any():
            return
        probs = torch.softmax(x[live], dim=-1)
        tokens = torch.tensor(st.last_tokens(), dtype=torch.long)
        tokens[live] = draw(probs, self.gen)
        self.logw[live] += logz[live].double()
        self.c.on_token(st, tokens)
        last = st.max_tokens is not None and st.step >= st.max_tokens - 1
        for i in live.nonzero().flatten().tolist():
            t = int(tokens[i])
            if t in self.c.table.eos_ids:
                self.ended[i], st.finished[i] = t, True
            else:
                st.generated[i].append(t)
                st.finished[i] = last
        st.step += 1
        if not all(st.finished):
            st.set_logits(self.session.step(tokens))
            st.forward_calls += 1
        self._twist()

    def _twist(self) -> None:
        """Look ahead to the end word: while a particle writes its last free word, its weight is
        multiplied by the probability (to the power ``target.twist``) that the end word comes next,
        so resampling keeps the texts where it can follow naturally. The factor is taken out again
        when the particle moves on, so the texts' final weights are unchanged."""
        if self.words is None or not self.target.twist:
            return
        w, st = self.words, self.st
        psi = torch.zeros_like(self.psi)
        rows = [i for i in range(len(psi)) if not st.finished[i] and w.in_word[i] and w.has[i] and (w.n is None or w.count[i] == w.n - 1)]
        if rows:
            lp = self.target(st.rows[rows, 0], self.eos[None])
            psi[rows] = self.target.twist * torch.logsumexp(lp.masked_fill(~self.end_start, float("-inf")), dim=-1).double().clamp(min=-1e4)
        self.logw += psi - self.psi
        self.psi = psi

    def resample(self, below: float) -> None:
        """Resample each prompt's particles whose effective sample size fell below ``below`` * K."""
        from tokensteer.constraints.smc import ess, log_mean_exp, systematic

        idx, changed = list(range(len(self.logw))), False
        for b in range(self.B):
            g = slice(b * self.K, (b + 1) * self.K)
            if ess(self.logw[g]) >= below * self.K or all(self.st.finished[g]):
                continue
            u = float(torch.rand(1, generator=self.gen))
            picks = systematic(self.logw[g], u)
            idx[g] = [b * self.K + j for j in picks]
            self.logw[g] = log_mean_exp(self.logw[g])
            changed = True
        if changed:
            self._reorder(idx)

    def _reorder(self, idx: list[int]) -> None:
        """Rows ``idx`` (duplicates allowed) become the particles: cache rows are copied, and the
        constraints start over and replay each copied text."""
        st = self.st
        st.generated = [list(st.generated[i]) for i in idx]
        finished, self.ended = [st.finished[i] for i in idx], [self.ended[i] for i in idx]
        self.psi = self.psi[idx]
        logits = st.logits[idx]
        self.session.select(idx)
        step = st.step
        st.finished = [False] * len(idx)
        texts, st.generated = st.generated, [[] for _ in idx]
        self.c.start(st)
        last = st.last_tokens()
        for j in range(max((len(t) for t in texts), default=0)):
            st.step = j
            st.finished = [j >= len(t) for t in texts]
            tokens = torch.tensor([t[j] if j < len(t) else last[i] for i, t in enumerate(texts)], dtype=torch.long)
            self.c.on_token(st, tokens)
            for i, t in enumerate(texts):
                if j < len(t):
                    st.generated[i].append(t[j])
        st.step, st.finished = step, finished
        st.set_logits(logits)

    def choose(self, best: bool) -> list[int] | None:
        """Per prompt, the particle to write: drawn by weight (or the heaviest when ``best``); None
        when every particle of some prompt died."""
        out = []
        for b in range(self.B):
            w = self.logw[b * self.K : (b + 1) * self.K]
            if not torch.isfinite(w).any():
                return None
            if best:
                j = int(torch.argmax(w))
            else:
                j = int(draw(torch.softmax(w, 0).float()[None], self.gen)[0])
            out.append(b * self.K + j)
        return out

    def tokens(self, i: int) -> list[int]:
        """Particle i's text, with the EOS it ended on (if it did)."""
        return self.st.generated[i] + ([self.ended[i]] if self.ended[i] is not None else [])

    def unfinished(self, i: int) -> list[str]:
        return self.c.unfinished(i)

    def log_evidence(self, b: int) -> float:
        """log of the mean weight of prompt b's particles (the SMC estimate of the constraint's probability)."""
        w = self.logw[b * self.K : (b + 1) * self.K]
        return float(torch.logsumexp(w, 0)) - math.log(self.K)

"""The hook points of the decode loop, and the ``Control`` base class that plugs into them.

A control overrides only the hooks it needs:

1. ``variants``      extra conditioning rows of the same batch (e.g. the prompt behind a prefix),
                     and ``row_mix``: read them only as linear combinations, at less cost;
2. ``residual_edits`` changes to the residual stream after chosen decoder layers;
3. ``logprobs``      rewrites the next-token log-probabilities before sampling, seeing every row;
4. ``mask``          a boolean mask of allowed next tokens;
5. ``on_token``      a callback for every accepted token (advance a grammar, record a trace).

A control that sets ``drafts`` (speculative decoding) also gets a sixth, ``verify``: the tokens the
loop samples are then tentative (fed to the model, not yet emitted) until its ``Verdict`` keeps some
of them, drops the rest and supplies the next token itself.

A control that masks may also name the tokens each row must take next whatever the model says
(``forced``, hook 7: the fixed text of a JSON schema or grammar). The loop then feeds them to the
model together with the sampled token in one forward pass, instead of one pass per token.

Every method of generation in tokensteer (formulas, steering, constraints, penalties) is a Control,
so there is one decode loop and no per-method loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch

if TYPE_CHECKING:
    from tokensteer.loop import LoopState

Positions = Literal["all", "prompt", "generated"]


@dataclass
class EditContext:
    """What a residual edit knows when it runs: the phase and the rows of the batch."""

    phase: Literal["prefill", "decode"]
    n_rows: int


@dataclass
class ResidualEdit:
    """Hook point 2: change the hidden state leaving decoder layer ``layer`` (0-based).

    ``vector`` is additive, shape [H] (every row) or [N, H] (one per row, zeros for rows left
    alone); additive edits run on every backend. ``fn(hidden[N, T, H], ctx) -> hidden`` is a
    general edit that only backends with the ``residual_fn`` capability can run.
    """

    layer: int
    vector: torch.Tensor | None = None
    fn: Callable[[torch.Tensor, EditContext], torch.Tensor] | None = None
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if (self.vector is None) == (self.fn is None):
            raise ValueError("a ResidualEdit needs exactly one of vector or fn")

    @property
    def additive_uniform(self) -> bool:
        """True when every row gets the same vector at every position (what llama.cpp can do)."""
        return self.vector is not None and self.vector.dim() == 1 and self.positions == "all"


@dataclass
class Verdict:
    """A drafting control's decision on its tentative tokens (hook 6).

    Keep the first ``keep`` tentative tokens, drop the rest (the loop trims its session and
    ``state.generated``), and take ``tokens`` [B] as this step's token instead of sampling one.
    ``logprobs`` [keep + 1, B, V] are the distributions the kept tokens and ``tokens`` were
    confirmed under (what TokenEvent.logprob and .top report).
    """

    keep: int
    tokens: torch.Tensor
    logprobs: torch.Tensor


class Control:
    """Base class for anything that steers generation. Every hook defaults to doing nothing."""

    #: capabilities a backend needs to run this control (see ``Backend.capabilities``)
    requires: frozenset[str] = frozenset()
    #: True for a speculative control: sampled tokens stay tentative until ``verify`` confirms them
    drafts: bool = False
    #: how error messages name this control to a user (the class name when empty)
    label: str = ""

    def variants(self, prompt: str) -> Sequence[str]:
        """Hook 1: extra conditioning texts; each runs as one more row beside the prompt's row."""
        return ()

    def row_mix(self) -> torch.Tensor | None:
        """With hook 1: a [R', 1 + k] matrix when this control reads its prompt's row and its k
        variant rows only through R' < 1 + k linear combinations of their logits. A backend that
        can (``HEAD_MIX``) then returns those combinations as the rows (the output layer is linear,
        so it runs once per combination instead of once per row), and ``state.rows`` holds R' rows.
        The loop asks only when this is the one control with variants and no rewriter precedes it."""
        return None

    def residual_edits(self, n_rows: int, rows_per_prompt: int) -> Sequence[ResidualEdit]:
        """Hook 2: residual-stream edits for a batch of ``n_rows`` rows."""
        return ()

    def start(self, state: LoopState) -> None:
        """Called once after prefill, before the first token is chosen."""

    def finish(self) -> None:
        """Called once when the generation ends, however it ends (done, error, or a stream dropped
        early): release what ``start`` opened, such as a backend session of its own."""

    def logprobs(self, state: LoopState, logprobs: torch.Tensor) -> torch.Tensor:
        """Hook 3: map [B, V] next-token log-probabilities to new ones; ``state.rows`` has all rows."""
        return logprobs

    @property
    def rewrites(self) -> bool:
        """Whether hook 3 can change the distribution; when no control's does, the loop masks the
        raw logits and normalises once instead of twice."""
        return type(self).logprobs is not Control.logprobs

    def mask(self, state: LoopState) -> torch.Tensor | None:
        """Hook 4: a bool [B, V] tensor of allowed tokens, or None for no restriction."""
        return None

    def on_token(self, state: LoopState, tokens: torch.Tensor) -> None:
        """Hook 5: the [B] tokens just accepted (finished requests repeat their last token)."""

    def forced(self, state: LoopState) -> list[list[int]] | None:
        """Hook 7: per row, tokens that must follow the one just accepted (None or [] for none).

        Called after hook 5. The loop runs hooks 3–5 at each forced position as usual, so this
        control's own mask must allow them there; it uses them only when no other control masks.
        """
        return None

    def verify(self, state: LoopState) -> Verdict | None:
        """Hook 6, only for a control with ``drafts``: called at the start of every step, before
        hook 3. None lets the loop sample (the token is tentative, ``state.tentative`` counts them);
        a Verdict settles the tentative tokens, and hooks 3–5 are skipped for that step."""
        return None


@dataclass
class RepetitionPenalty(Control):
    """Repetition penalty as a plain hook-3 control.

    Log-probabilities are never positive, so multiplying those of already-seen tokens by
    ``penalty`` > 1 makes them less likely (CTRL's rule on the negative side), then renormalises.
    """

    label = "a repetition penalty (--repetition-penalty)"

    penalty: float = 1.0
    window: int | None = None

    def logprobs(self, state: LoopState, logprobs: torch.Tensor) -> torch.Tensor:
        if self.penalty == 1.0:
            return logprobs
        out = logprobs.clone()
        for b, seq in enumerate(state.context_tokens(self.window)):
            if seq:
                ids = torch.tensor(sorted(set(seq)), dtype=torch.long)
                out[b, ids] = out[b, ids] * self.penalty
        return torch.log_softmax(out, dim=-1)

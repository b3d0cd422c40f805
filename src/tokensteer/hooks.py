"""The stages of the engine's step, and the ``Control`` base class that takes part in them.

A control declares the stages it takes part in (``stages``) and defines the matching methods:

- ``variants``  extra conditioning rows of the same batch (e.g. the prompt behind a prefix),
                and ``row_mix``: read them only as linear combinations, at less cost;
- ``edits``     ``residual_edits``: changes to the residual stream after chosen decoder layers;
- ``rewrite``   ``logprobs``: rewrites the next-token log-probabilities, seeing every row;
- ``mask``      ``mask``: a boolean mask of allowed next tokens;
- ``accept``    ``on_token``: a callback for every accepted token (advance a grammar, record a trace);
- ``force``     ``forced``: tokens each row must take next whatever the model says (a JSON schema's
                fixed text), fed to the model with the sampled token in one forward pass;
- ``verify``    speculative decoding: sampled tokens stay tentative until ``verify``'s ``Verdict``
                keeps some of them, drops the rest and supplies the next token itself.

Every method of generation in tokensteer (formulas, steering, constraints, penalties) is a Control,
so the engine has one step and no per-method loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch

if TYPE_CHECKING:
    from tokensteer.engine.state import LoopState

Positions = Literal["all", "prompt", "generated"]


@dataclass
class EditContext:
    """What a residual edit knows when it runs: the phase and the rows of the batch."""

    phase: Literal["prefill", "decode"]
    n_rows: int


@dataclass
class ResidualEdit:
    """The ``edits`` stage: change the hidden state leaving decoder layer ``layer`` (0-based).

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
    """A drafting control's decision on its tentative tokens (the ``verify`` stage).

    Keep the first ``keep`` tentative tokens, drop the rest (the engine trims its session and
    ``state.generated``), and take ``tokens`` [B] as this step's token instead of sampling one.
    ``logprobs`` [keep + 1, B, V] are the distributions the kept tokens and ``tokens`` were
    confirmed under (what TokenEvent.logprob and .top report).
    """

    keep: int
    tokens: torch.Tensor
    logprobs: torch.Tensor


#: the stages a control can take part in, in the order the engine runs them
STAGES = ("variants", "edits", "rewrite", "mask", "accept", "force", "verify")
#: the method each stage calls (a control that defines one must declare its stage)
STAGE_METHODS = {
    "variants": ("variants", "row_mix"),
    "edits": ("residual_edits",),
    "rewrite": ("logprobs",),
    "mask": ("mask",),
    "accept": ("on_token",),
    "force": ("forced",),
    "verify": ("verify",),
}


class Control:
    """Base class for anything that steers generation; every stage method defaults to doing nothing."""

    #: the stages this control takes part in (a subset of ``STAGES``); an instance may narrow its class's
    stages: frozenset[str] = frozenset()
    #: capabilities a backend needs to run this control (see ``Backend.capabilities``)
    requires: frozenset[str] = frozenset()
    #: how error messages name this control to a user (the class name when empty)
    label: str = ""

    def __init_subclass__(cls, **kw) -> None:
        """Catch a subclass that defines a stage's method without declaring the stage."""
        super().__init_subclass__(**kw)
        unknown = set(cls.stages) - set(STAGES)
        if unknown:
            raise TypeError(f"{cls.__name__} declares unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
        for stage, methods in STAGE_METHODS.items():
            defined = [m for m in methods if m in cls.__dict__]
            if defined and stage not in cls.stages:
                raise TypeError(f"{cls.__name__} defines {defined[0]}() but does not declare the {stage!r} stage in `stages`")

    def takes(self, stage: str) -> bool:
        """Whether this control takes part in ``stage``."""
        return stage in self.stages

    @property
    def drafts(self) -> bool:
        """True for a speculative control: sampled tokens stay tentative until ``verify`` confirms them."""
        return "verify" in self.stages

    def variants(self, prompt: str) -> Sequence[str]:
        """``variants``: extra conditioning texts; each runs as one more row beside the prompt's row."""
        return ()

    def row_mix(self) -> torch.Tensor | None:
        """With ``variants``: a [R', 1 + k] matrix when this control reads its prompt's row and its k
        variant rows only through R' < 1 + k linear combinations of their logits. A backend that
        can (``HEAD_MIX``) then returns those combinations as the rows (the output layer is linear,
        so it runs once per combination instead of once per row), and ``state.rows`` holds R' rows.
        The engine asks only when this is the one control with variants and no rewriter precedes it."""
        return None

    def residual_edits(self, n_rows: int, rows_per_prompt: int) -> Sequence[ResidualEdit]:
        """``edits``: residual-stream edits for a batch of ``n_rows`` rows."""
        return ()

    def start(self, state: LoopState) -> None:
        """Called once after prefill, before the first token is chosen."""

    def finish(self) -> None:
        """Called once when the generation ends, however it ends (done, error, or a stream dropped
        early): release what ``start`` opened, such as a backend session of its own."""

    def logprobs(self, state: LoopState, logprobs: torch.Tensor) -> torch.Tensor:
        """``rewrite``: map [B, V] next-token log-probabilities to new ones; ``state.rows`` has all rows."""
        return logprobs

    def mask(self, state: LoopState) -> torch.Tensor | None:
        """``mask``: a bool [B, V] tensor of allowed tokens, or None for no restriction."""
        return None

    def on_token(self, state: LoopState, tokens: torch.Tensor) -> None:
        """``accept``: the [B] tokens just accepted (finished requests repeat their last token)."""

    def forced(self, state: LoopState) -> list[list[int]] | None:
        """``force``: per row, tokens that must follow the one just accepted (None or [] for none).

        Called after ``accept``. The engine runs rewrite, mask and accept at each forced position, so this
        control's own mask must allow them there; it uses them only when no other control masks.
        """
        return None

    def verify(self, state: LoopState) -> Verdict | None:
        """``verify``: called at the start of every step, before ``rewrite``. None lets the engine
        sample (the token is tentative, ``state.tentative`` counts them); a Verdict settles the
        tentative tokens, and rewrite, mask and accept are skipped for that step."""
        return None


@dataclass
class RepetitionPenalty(Control):
    """Repetition penalty as a plain ``rewrite`` control.

    Log-probabilities are never positive, so multiplying those of already-seen tokens by
    ``penalty`` > 1 makes them less likely (CTRL's rule on the negative side), then renormalises.
    """

    label = "a repetition penalty (--repetition-penalty)"
    stages = frozenset({"rewrite"})

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

"""A request as the engine holds it: its rows (the ``variants`` stage), its residual edits (the
``edits`` stage), its controls sorted by stage, and its place in a running batch."""

from __future__ import annotations

import hashlib
import time
from typing import Sequence

import torch

from tokensteer.backends.base import HEAD_MIX, ROW_EDITS, Backend
from tokensteer.engine.events import Detokenizer, TokenEvent
from tokensteer.engine.state import LoopState
from tokensteer.errors import UserError
from tokensteer.hooks import Control, RepetitionPenalty, ResidualEdit
from tokensteer.sampling import SamplingConfig, make_sampler, row_generators


def control_name(c: Control) -> str:
    """How messages name a control to a user."""
    return c.label or type(c).__name__


class Request:
    """One submitted request: B prompts, each with R rows of the batch (its own text, then the
    variants its controls asked for), decoded together under one sampling config."""

    def __init__(self, backend: Backend, prompts: Sequence[str], cfg: SamplingConfig, controls: Sequence[Control]) -> None:
        self.backend, self.prompts, self.cfg = backend, list(prompts), cfg
        self.t0 = time.perf_counter()
        if not self.prompts:
            raise UserError("no prompts given")
        if any(not p.strip() for p in self.prompts):
            raise UserError("the prompt is empty; give some text to continue")
        controls = list(controls)
        if cfg.repetition_penalty != 1.0:
            controls.append(RepetitionPenalty(cfg.repetition_penalty))
        self.controls = controls
        self.rows, offsets, R, owners = self._variants()
        self.R = R
        B = len(self.prompts)
        self._check_context()
        self.drafter = _drafter(controls)
        self.mix = None if self.drafter is not None else _row_mix(controls, owners, backend, R)
        prompt_tokens = self.rows[::R]
        if self.mix is not None and R > 1 and not bool(self.mix[:, 0].any()):  # the mix never reads the prompt's own row: not decoded
            self.rows = [r for i, r in enumerate(self.rows) if i % R]
            offsets = {c: o - 1 for c, o in offsets.items()}
            self.mix, R = self.mix[:, 1:].contiguous(), R - 1
            self.R = R
        self.forcer = _forcer(controls) if self.drafter is None else None
        self.state = LoopState(backend, prompt_tokens, R if self.mix is None else self.mix.shape[0])
        self.state.offsets, self.state.mix = offsets, self.mix
        self.state.max_tokens, self.state.stop, self.state.cfg = cfg.max_tokens, tuple(cfg.stop), cfg
        self.edits = [e for c in controls if c.takes("edits") for e in c.residual_edits(B * R, R)]
        why = backend.unsupported(self.edits)
        if why:
            raise UserError(why)
        for c in controls:
            missing = c.requires - backend.capabilities
            if missing:
                raise UserError(f"{type(c).__name__} needs {', '.join(sorted(missing))}, which the {backend.name} backend lacks")
        # each prompt's own row is the uncontrolled model's (no residual edits, no mixed rows): its
        # log-probabilities go out with each token (TokenEvent.model_logprob)
        self.model_rows = not self.edits and self.mix is None
        self.model_lp: torch.Tensor | None = None  # this step's [B, V] of them, from rewrite/mask to accept
        self.rewriters = [c for c in controls if c.takes("rewrite")]
        self.maskers = [c for c in controls if c.takes("mask")]
        self.followers = [c for c in controls if c.takes("accept")]
        self.sampler = make_sampler(cfg)
        self.generators = row_generators(cfg.seed, B)
        self.state.generators = self.generators
        self.detoks = [Detokenizer(backend.tokenizer, cfg.stop, cfg.skip_special_tokens) for _ in self.prompts]
        self.eos = frozenset() if cfg.ignore_eos else backend.tokenizer.eos_ids
        self.tokens: torch.Tensor | None = None  # [B] this step's tokens, fed at the next forward
        self.events: list[TokenEvent] = []  # produced by the last stage call, taken by the engine
        self.started = False  # controls' start() ran
        self.cancelled = False
        self.error: BaseException | None = None
        self.live = list(range(B))  # prompts whose rows are in the session, in row order

    # -- the variants stage ---------------------------------------------------------------
    def _variants(self) -> tuple[list[list[int]], dict[int, int], int, set[int]]:
        """Each prompt's rows: its own text first, then every control's variants in control order."""
        offsets: dict[int, int] = {}
        owners: set[int] = set()
        per_prompt = []
        for p in self.prompts:
            texts, r = [p], 1
            for c in self.controls:
                vs = list(c.variants(p)) if c.takes("variants") else []
                offsets[id(c)] = r
                texts += vs
                r += len(vs)
                if vs:
                    owners.add(id(c))
            per_prompt.append(texts)
        R = len(per_prompt[0])
        if any(len(t) != R for t in per_prompt):
            raise UserError("every prompt must get the same number of conditioning variants")
        tok = self.backend.tokenizer
        return [tok.encode(t) for texts in per_prompt for t in texts], offsets, R, owners

    def _check_context(self) -> None:
        longest = max(len(r) for r in self.rows)
        limit = self.backend.context_length
        if limit and longest + self.cfg.max_tokens > limit:
            raise UserError(
                f"the prompt ({longest} tokens) plus max tokens ({self.cfg.max_tokens}) exceed the "
                f"{limit}-token context of the {self.backend.name} backend; lower max tokens (--max-tokens)"
                + self.backend.context_hint
            )

    # -- what the engine needs to place it ------------------------------------------------
    @property
    def path(self) -> str:
        """Which step runs it: ``speculative`` and ``forced`` requests run alone beside the shared step."""
        return "speculative" if self.drafter is not None else "forced" if self.forcer is not None else "shared"

    @property
    def row_edits(self) -> bool:
        """True when its edits travel with its rows (per-row vectors), so it can share a batch with any."""
        return ROW_EDITS in self.backend.capabilities and all(e.vector is not None for e in self.edits)

    def key(self) -> tuple:
        """Requests with equal keys can share one session: the same session-wide edits (row mixes
        and per-row edits travel with each request's rows)."""
        if self.path != "shared":
            return ("alone", id(self))
        return () if self.row_edits else _fingerprint(self.edits)

    def n_rows(self) -> int:
        """Rows this request holds in its session now."""
        return len(self.live) * self.R

    def longest(self) -> int:
        """Cells its longest row may take by its end."""
        return max(len(r) for r in self.rows) + self.cfg.max_tokens

    def cells(self) -> int:
        """KV cells it may take by its end (for backends whose rows share one cache)."""
        return sum(len(r) for r in self.rows) + len(self.rows) * self.cfg.max_tokens

    @property
    def done(self) -> bool:
        return self.error is not None or self.cancelled or all(self.state.finished)

    def set_logits(self, logits: torch.Tensor) -> None:
        """Take this step's logits of the live prompts' rows."""
        self.state.set_logits(self.expand(logits))

    def expand(self, logits: torch.Tensor) -> torch.Tensor:
        """The live prompts' logit rows as rows for every prompt. A finished prompt's rows, which no
        stage reads (its tokens are replaced by its last token), hold one certain token: a flat row
        would cost any nucleus a sort of the whole vocabulary."""
        per, B = self.state.rows_per_prompt, len(self.prompts)
        if len(self.live) == B:
            return logits
        full = logits.new_full((B * per, logits.shape[-1]), DEAD_LOGIT)
        full[:, 0] = 0.0
        idx = torch.tensor([b * per + r for b in self.live for r in range(per)], dtype=torch.long)
        return full.index_copy_(0, idx, logits)

    def feed(self) -> torch.Tensor:
        """The tokens the live rows take at the next forward pass."""
        tokens = self.tokens if len(self.live) == len(self.prompts) else self.tokens[self.live]
        return tokens if self.R == 1 else tokens.repeat_interleave(self.R)

    def now(self) -> float:
        return time.perf_counter() - self.t0


#: the logits of a finished prompt's rows, but for token 0 (finite, so no stage meets a NaN)
DEAD_LOGIT = -1e4


def _fingerprint(edits: Sequence[ResidualEdit]) -> tuple:
    out = []
    for e in edits:
        if e.fn is not None:
            return ("fn", id(e.fn))  # a function cannot be compared: its request runs alone
        digest = hashlib.sha1(e.vector.detach().float().contiguous().numpy().tobytes()).hexdigest()
        out.append((e.layer, e.positions, digest))
    return tuple(out)


def _drafter(controls: Sequence[Control]) -> Control | None:
    """The one drafting control, if any; refuse controls that would see or shape drafted tokens."""
    drafters = [c for c in controls if c.takes("verify")]
    if not drafters:
        return None
    if len(drafters) > 1:
        raise UserError("only one control can draft tokens speculatively at a time")
    hooked = [control_name(c) for c in controls if c is not drafters[0] and c.stages & {"rewrite", "mask", "accept"}]
    if hooked:
        raise UserError(
            f"speculative decoding cannot be combined with {', '.join(hooked)}: controls that rewrite, mask or "
            "follow tokens would have to run again on the verified distribution; drop --speculate or those controls"
        )
    return drafters[0]


def _row_mix(controls: Sequence[Control], owners: set[int], backend: Backend, R: int) -> torch.Tensor | None:
    """The [R', R] row mix the output layer should compute instead of R rows (``Control.row_mix``):
    only for the one control with variant rows, when no rewriter before it would read the mixed
    row as the prompt's own, and only on a backend that can mix."""
    owner = [c for c in controls if id(c) in owners]
    if len(owner) != 1 or HEAD_MIX not in backend.capabilities:
        return None
    (owner,) = owner
    if next(c for c in controls if c.takes("rewrite") or c is owner) is not owner:
        return None
    mix = owner.row_mix()
    if mix is None:
        return None
    if mix.dim() != 2 or mix.shape[1] != R:
        raise RuntimeError(f"{type(owner).__name__}.row_mix gave shape {tuple(mix.shape)} for {R} rows")
    return mix if mix.shape[0] < R else None  # no fewer rows through the output layer: nothing to gain


def _forcer(controls: Sequence[Control]) -> Control | None:
    """The control whose forced tokens the engine may use: it must be the only one that masks, so
    no other control can forbid what it forces."""
    forcers = [c for c in controls if c.takes("force")]
    maskers = [c for c in controls if c.takes("mask")]
    if len(forcers) == 1 and all(c is forcers[0] for c in maskers):
        return forcers[0]
    return None

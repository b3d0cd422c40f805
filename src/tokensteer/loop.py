"""The one decode loop: prompts in, tokens out, every control acting at a hook point.

Each prompt owns ``R`` rows of the batch: its own row first, then the conditioning variants the
controls ask for (hook 1). Every step the backend returns one logit row per batch row; the loop
turns them into log-probabilities, lets the controls rewrite them (hook 3) and mask them (hook 4),
samples one token per prompt, tells the controls (hook 5), and feeds that token to all R rows.
Residual edits (hook 2) run inside the backend's forward pass. A control that only needs fixed
linear combinations of its rows' logits (a formula's weighted sum) can have the backend run the
output layer on those combinations of the rows' hidden states instead (``Control.row_mix``); the
controls then see R' < R rows. With a drafting (speculative) control, sampled tokens stay
tentative until its ``verify`` (hook 6) keeps k of them and gives the next token; the loop then
trims the dropped ones from the session and emits only confirmed tokens.
When the one masking control names tokens that must come next (hook 7), the loop feeds them with
the sampled token in one forward pass and then runs hooks 3–5 at each of them on its logits.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from tokensteer.backends.base import HEAD_MIX, Backend
from tokensteer.errors import UserError
from tokensteer.hooks import Control, RepetitionPenalty
from tokensteer.sampling import SamplingConfig, make_sampler, row_generators


@dataclass
class TokenEvent:
    """One accepted token of one prompt, as the stream yields it."""

    index: int  # which prompt
    token: int
    text: str  # new text that became final with this token (may be "")
    logprob: float  # under the controlled distribution, before temperature and truncation
    top: list[tuple[int, float]] = field(default_factory=list)  # top-n alternatives
    finish_reason: str | None = None  # "eos", "stop" or "length" on the last event
    t: float = 0.0  # seconds since the call started


@dataclass
class Generation:
    """The finished result for one prompt."""

    prompt: str
    text: str
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    backend: str

    @property
    def tok_s(self) -> float:
        """Decode speed: tokens after the first, per second of decoding."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class LoopState:
    """What controls can read while the loop runs."""

    def __init__(self, backend: Backend, prompts: list[list[int]], rows_per_prompt: int) -> None:
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.prompt_tokens = prompts
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.finished = [False] * len(prompts)
        self.rows_per_prompt = rows_per_prompt
        self._logits: torch.Tensor | None = None  # [B * R, V] raw logits of this step
        self._rows: torch.Tensor | None = None
        self.step = 0
        self.forward_calls = 0
        self.offsets: dict[int, int] = {}  # id(control) -> first variant row of that control
        self.mix: torch.Tensor | None = None  # [R', R] when the rows are combinations (Control.row_mix)
        self.max_tokens: int | None = None  # the step budget, so constraints can finish in time
        self.stop: tuple[str, ...] = ()  # stop strings, which constraints must not let cut the text
        self.confirmed = 0  # tokens emitted per prompt so far (counts against max_tokens)
        self.tentative = 0  # drafted tokens fed to the session but not yet confirmed (hook 6)
        self.cfg = SamplingConfig()  # how tokens are sampled, and the loop's random generators,
        self.generators: list[torch.Generator] = []  # one per prompt; a drafting control verifies with both

    @property
    def batch_size(self) -> int:
        return len(self.prompt_tokens)

    @property
    def rows(self) -> torch.Tensor | None:
        """[B, R, V] log-probabilities of every row this step (normalised on first use)."""
        if self._rows is None and self._logits is not None:
            self._rows = torch.log_softmax(self._logits.float(), dim=-1).view(self.batch_size, self.rows_per_prompt, -1)
        return self._rows

    def set_logits(self, logits: torch.Tensor) -> None:
        self._logits, self._rows = logits, None

    def variant_rows(self, control: Control) -> torch.Tensor:
        """[B, k, V] log-probabilities of the variant rows that ``control`` asked for."""
        start = self.offsets[id(control)]
        k = len(control.variants(""))
        return self.rows[:, start : start + k]

    def context_tokens(self, window: int | None = None) -> list[list[int]]:
        """Prompt plus generated tokens of each prompt, the last ``window`` of them if given."""
        seqs = [p + g for p, g in zip(self.prompt_tokens, self.generated)]
        return [s[-window:] for s in seqs] if window else seqs


class _Detok:
    """Incremental detokenisation that holds back text a stop string could still claim."""

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.tok, self.stops, self.emitted = tokenizer, stops, 0

    def push(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """Return the text that became final with these ids, and whether a stop string was hit."""
        text = self.tok.decode(ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i != -1]
        if hits:
            safe = min(hits)
        elif final:
            safe = len(text)
        else:
            safe = len(text)
            while safe > self.emitted and text[safe - 1] == "\ufffd":
                safe -= 1  # an incomplete UTF-8 character: wait for its next byte
            safe -= max((k for s in self.stops for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        new = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return new, bool(hits)


def stream(
    backend: Backend,
    prompts: Sequence[str],
    cfg: SamplingConfig = SamplingConfig(),
    controls: Sequence[Control] = (),
) -> Iterator[TokenEvent]:
    """Decode all prompts as one batch and yield each accepted token as it is chosen."""
    t0 = time.perf_counter()
    if not prompts:
        raise UserError("no prompts given")
    for p in prompts:
        if not p.strip():
            raise UserError("the prompt is empty; give some text to continue")
    controls = list(controls)
    if cfg.repetition_penalty != 1.0:
        controls.append(RepetitionPenalty(cfg.repetition_penalty))
    tok = backend.tokenizer
    # Hook 1: each prompt's rows are its own text, then every control's variants in order.
    offsets, texts_per_prompt, with_rows = {}, [], set()
    for p in prompts:
        texts, r = [p], 1
        for c in controls:
            vs = list(c.variants(p))
            offsets[id(c)] = r
            texts += vs
            r += len(vs)
            if vs:
                with_rows.add(id(c))
        texts_per_prompt.append(texts)
    R = len(texts_per_prompt[0])
    if any(len(t) != R for t in texts_per_prompt):
        raise UserError("every prompt must get the same number of conditioning variants")
    rows = [tok.encode(t) for texts in texts_per_prompt for t in texts]
    longest = max(len(r) for r in rows)
    if backend.context_length and longest + cfg.max_tokens > backend.context_length:
        raise UserError(
            f"the prompt ({longest} tokens) plus max tokens ({cfg.max_tokens}) exceed the "
            f"{backend.context_length}-token context of the {backend.name} backend; lower max tokens (--max-tokens)"
            + backend.context_hint
        )
    B = len(prompts)
    drafter = _drafter(controls)
    mix = _row_mix(controls, with_rows, backend, R) if drafter is None else None
    state = LoopState(backend, rows[::R], R if mix is None else mix.shape[0])
    state.offsets, state.mix = offsets, mix
    state.max_tokens, state.stop = cfg.max_tokens, tuple(cfg.stop)
    if cfg.max_tokens == 0:
        return
    edits = [e for c in controls for e in c.residual_edits(B * R, R)]
    why = backend.unsupported(edits)
    if why:
        raise UserError(why)
    for c in controls:
        missing = c.requires - backend.capabilities
        if missing:
            raise UserError(f"{type(c).__name__} needs {', '.join(sorted(missing))}, which the {backend.name} backend lacks")

    forcer = _forcer(controls) if drafter is None else None
    rewriters = [c for c in controls if c.rewrites]
    sampler = make_sampler(cfg)
    gen = row_generators(cfg.seed, B)
    state.cfg, state.generators = cfg, gen
    detoks = [_Detok(tok, cfg.stop) for _ in prompts]
    eos = frozenset() if cfg.ignore_eos else tok.eos_ids
    session = backend.session(edits, rollback=drafter is not None, **({"mix": mix} if mix is not None else {}))
    try:
        logits = session.prefill(rows)
        state.forward_calls += 1
        for c in controls:
            c.start(state)
        held: list[torch.Tensor] = []  # the tentative tokens of a drafting control, oldest first
        ahead: list[tuple[torch.Tensor, torch.Tensor]] = []  # forced tokens already fed, each with the logits after it
        forced = _forced_tokens(forcer, state, eos) if forcer is not None else None
        if forced is not None:  # text fixed from the start (a schema's opening): one forward pass
            _, ahead = _feed_forced(session, None, forced, R)
            state.forward_calls += 1
        for step in itertools.count():
            state.step = step
            state.set_logits(logits)
            verdict = drafter.verify(state) if drafter is not None else None  # hook 6
            if verdict is not None:
                tokens = verdict.tokens.clone()
                _finished_repeat(state, tokens)
                session.trim(state.tentative - verdict.keep)
                for b in range(B):
                    if not state.finished[b]:
                        del state.generated[b][len(state.generated[b]) - state.tentative :]
                confirmed = list(zip(held[: verdict.keep] + [tokens], verdict.logprobs))
                held, state.tentative = [], 0
                yield from _emit(state, confirmed, detoks, eos, time.perf_counter() - t0)
                if all(state.finished):
                    break
                logits = session.step(tokens.repeat_interleave(R))
                state.forward_calls += 1
                continue
            if rewriters:
                x = state.rows[:, 0]
                for c in rewriters:  # hook 3
                    x = c.logprobs(state, x)
            else:  # nothing rewrites: mask the raw logits and normalise once, below
                x = logits.float().view(B, state.rows_per_prompt, -1)[:, 0]
            allowed = None
            for c in controls:  # hook 4: one combined mask, applied once
                m = c.mask(state)
                if m is not None:
                    allowed = m if allowed is None else allowed & m
            if allowed is not None:
                if any(state.finished):  # finished rows only repeat their last token
                    allowed = allowed | torch.tensor(state.finished)[:, None]
                unmasked, x = x, torch.log_softmax(torch.where(allowed, x, float("-inf")), dim=-1)
                dead = torch.isnan(x[:, 0]).tolist()  # a row with nothing allowed normalises to NaN
                if any(d and not f for d, f in zip(dead, state.finished)):
                    filtered = bool(torch.isneginf(unmasked).any())  # a rewriter (e.g. a formula's topk) had excluded some
                    why = "the tokens the other controls left (e.g. a formula's filters)" if filtered else "each other"
                    raise UserError(f"the constraints allow no next token: they contradict {why}")
            elif not rewriters:
                x = torch.log_softmax(x, dim=-1)
            if ahead:  # hook 7's token for this step, already fed to the model
                tokens, after = ahead.pop(0)
                tokens = tokens.clone()
                live = ~torch.tensor(state.finished)
                if not torch.isfinite(x.gather(1, tokens[:, None]).squeeze(1)[live]).all():
                    raise RuntimeError(f"{type(forcer).__name__} forced a token its own mask forbids")
            else:
                tokens, after = sampler(x, gen), None
            _finished_repeat(state, tokens)
            for c in controls:  # hook 5
                c.on_token(state, tokens)
            if drafter is not None:  # tentative: fed to the model, emitted only once verified
                held.append(tokens)
                for b in range(B):
                    if not state.finished[b]:
                        state.generated[b].append(int(tokens[b]))
                state.tentative += 1
                if state.tentative > cfg.max_tokens:
                    raise RuntimeError(f"{type(drafter).__name__} drafted {state.tentative} tokens without a verdict")
            else:
                yield from _emit(state, [(tokens, x)], detoks, eos, time.perf_counter() - t0)
            if all(state.finished):
                break
            if after is not None:
                logits = after
                continue
            forced = _forced_tokens(forcer, state, eos) if forcer is not None else None
            if forced is None:
                logits = session.step(tokens.repeat_interleave(R))
            else:  # the sampled token and the forced ones in one forward pass
                logits, ahead = _feed_forced(session, tokens, forced, R)
            state.forward_calls += 1
    finally:
        session.close()
        for c in controls:
            c.finish()


def _drafter(controls: Sequence[Control]) -> Control | None:
    """The one drafting control, if any; refuse controls that would see or shape drafted tokens."""
    drafters = [c for c in controls if c.drafts]
    if not drafters:
        return None
    if len(drafters) > 1:
        raise UserError("only one control can draft tokens speculatively at a time")
    hooked = [
        c.label or type(c).__name__
        for c in controls
        if c is not drafters[0]
        and (c.rewrites or type(c).mask is not Control.mask or type(c).on_token is not Control.on_token)
    ]
    if hooked:
        raise UserError(
            f"speculative decoding cannot be combined with {', '.join(hooked)}: controls that rewrite, mask or "
            "follow tokens would have to run again on the verified distribution; drop --speculate or those controls"
        )
    return drafters[0]


def _row_mix(controls: Sequence[Control], with_rows: set[int], backend: Backend, R: int) -> torch.Tensor | None:
    """The [R', R] row mix the output layer should compute instead of R rows (``Control.row_mix``):
    only for the one control with variant rows, when no rewriter before it would read the mixed
    row as the prompt's own, and only on a backend that can mix."""
    owners = [c for c in controls if id(c) in with_rows]
    if len(owners) != 1 or HEAD_MIX not in backend.capabilities:
        return None
    (owner,) = owners
    if next(c for c in controls if c.rewrites or c is owner) is not owner:
        return None
    mix = owner.row_mix()
    if mix is None:
        return None
    if mix.dim() != 2 or mix.shape[1] != R:
        raise RuntimeError(f"{type(owner).__name__}.row_mix gave shape {tuple(mix.shape)} for {R} rows")
    return mix if mix.shape[0] < R else None  # no fewer rows through the output layer: nothing to gain


def _forcer(controls: Sequence[Control]) -> Control | None:
    """The control whose forced tokens (hook 7) the loop may use: it must be the only one that masks,
    so no other control can forbid what it forces."""
    forcers = [c for c in controls if type(c).forced is not Control.forced]
    maskers = [c for c in controls if type(c).mask is not Control.mask]
    if len(forcers) == 1 and all(c is forcers[0] for c in maskers):
        return forcers[0]
    return None


def _forced_tokens(forcer: Control, state: LoopState, eos: frozenset[int]) -> torch.Tensor | None:
    """[B, k] tokens every live row must take next (finished rows repeat their last), or None.

    k is the fewest any live row has, capped by the token budget; EOS is never forced."""
    per_row = forcer.forced(state)
    if not per_row:
        return None
    budget = state.max_tokens - state.confirmed if state.max_tokens is not None else 1 << 30
    k, rows = budget, []
    for b in range(state.batch_size):
        if state.finished[b]:
            rows.append(None)
            continue
        seq = list(per_row[b] or [])
        cut = next((i for i, t in enumerate(seq) if t in eos), len(seq))
        rows.append(seq[:cut])
        k = min(k, cut)
    if k <= 0:
        return None
    out = [r[:k] if r is not None else [(state.generated[b] or state.prompt_tokens[b])[-1]] * k for b, r in enumerate(rows)]
    return torch.tensor(out, dtype=torch.long)


def _feed_forced(
    session, tokens: torch.Tensor | None, forced: torch.Tensor, R: int
) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Feed this step's [B] tokens (None before the first) and the [B, k] forced ones in one
    ``extend``; return the logits after ``tokens`` and, per forced token, (token, logits after it)."""
    fed = forced if tokens is None else torch.cat([tokens[:, None], forced], 1)
    out = session.extend(fed.repeat_interleave(R, 0))
    first = 0 if tokens is None else 1
    return (None if tokens is None else out[:, 0]), [(forced[:, j], out[:, first + j]) for j in range(forced.shape[1])]


def _finished_repeat(state: LoopState, tokens: torch.Tensor) -> None:
    """Finished prompts keep repeating their last token."""
    for b in range(state.batch_size):
        if state.finished[b]:
            tokens[b] = (state.generated[b] or state.prompt_tokens[b])[-1]


def _emit(
    state: LoopState,
    confirmed: Sequence[tuple[torch.Tensor, torch.Tensor]],
    detoks: list[_Detok],
    eos: frozenset[int],
    now: float,
) -> Iterator[TokenEvent]:
    """Emit confirmed steps, each ([B] tokens, [B, V] log-probabilities they were chosen under)."""
    k = state.cfg.top_logprobs
    for tokens, x in confirmed:
        chosen = x.gather(1, tokens[:, None]).squeeze(1)
        top = torch.topk(x, k, dim=-1) if k else None
        last = state.confirmed == state.cfg.max_tokens - 1
        state.confirmed += 1
        for b in range(state.batch_size):
            if state.finished[b]:
                continue
            t = int(tokens[b])
            alts = list(zip(top.indices[b].tolist(), top.values[b].tolist())) if top else []
            if t in eos:
                state.finished[b] = True
                new, _ = detoks[b].push(state.generated[b], final=True)
                yield TokenEvent(b, t, new, float(chosen[b]), alts, "eos", now)
                continue
            state.generated[b].append(t)
            new, hit = detoks[b].push(state.generated[b], final=last)
            reason = "stop" if hit else "length" if last else None
            state.finished[b] = reason is not None
            yield TokenEvent(b, t, new, float(chosen[b]), alts, reason, now)


def generate(
    backend: Backend,
    prompts: str | Sequence[str],
    cfg: SamplingConfig = SamplingConfig(),
    controls: Sequence[Control] = (),
) -> list[Generation]:
    """Run ``stream`` to the end and collect one Generation per prompt."""
    single = isinstance(prompts, str)
    plist = [prompts] if single else list(prompts)
    t0 = time.perf_counter()
    events: list[list[TokenEvent]] = [[] for _ in plist]
    texts = ["" for _ in plist]
    for ev in stream(backend, plist, cfg, controls):
        events[ev.index].append(ev)
        texts[ev.index] += ev.text
    total = time.perf_counter() - t0
    out = []
    for p, evs, text in zip(plist, events, texts):
        kept = [e for e in evs if e.finish_reason != "eos"]
        first = evs[0].t if evs else total
        out.append(
            Generation(
                prompt=p,
                text=text,
                tokens=[e.token for e in kept],
                logprobs=[e.logprob for e in kept],
                top_logprobs=[e.top for e in kept],
                finish_reason=evs[-1].finish_reason if evs else "length",
                prompt_tokens=len(backend.tokenizer.encode(p)),
                prefill_s=first,
                decode_s=(evs[-1].t - first) if evs else 0.0,
                backend=backend.name,
            )
        )
    return out

"""The stages of one request's step after the forward pass: rewrite → mask → sample → accept.

Each is a plain function of the request, so the shared step, the forced-token path and the
speculative path run the same code. A control's output is checked where it enters the pipeline:
a wrong shape, NaN or no possible token is an error naming that control.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tokensteer.engine.events import TokenEvent
from tokensteer.engine.request import Request, control_name
from tokensteer.errors import UserError
from tokensteer.hooks import Control
from tokensteer.sampling import SamplingConfig


def rewrite(req: Request) -> torch.Tensor:
    """[B, V] next-token scores: the rewriters' log-probabilities, or the raw logits of each
    prompt's own row when nothing rewrites (``mask`` then normalises once)."""
    st = req.state
    req.model_lp = None
    if not req.rewriters:
        return st.logits.float().view(st.batch_size, st.rows_per_prompt, -1)[:, 0]
    # only the prompts' own rows: a rewriter that reads the others normalises them on first use (st.rows)
    x = torch.log_softmax(st.logits.float().view(st.batch_size, st.rows_per_prompt, -1)[:, 0], dim=-1)
    if req.model_rows:
        req.model_lp = x
    for c in req.rewriters:
        x = _checked(c, c.logprobs(st, x), x, st.finished)
    return x


def mask(req: Request, x: torch.Tensor) -> torch.Tensor:
    """[B, V] log-probabilities with every masking control's disallowed tokens at -inf."""
    st = req.state
    allowed = None
    for c in req.maskers:
        m = c.mask(st)
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != x.shape:
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise UserError(f"{control_name(c)} gave a mask of {got}; it must be a bool tensor of shape {tuple(x.shape)}")
        allowed = m if allowed is None else allowed & m
    if allowed is None:
        if req.rewriters:
            return x
        x = torch.log_softmax(x, dim=-1)
        req.model_lp = x if req.model_rows else None
        return x
    if req.model_rows and not req.rewriters:
        req.model_lp = torch.log_softmax(x, dim=-1)
    if any(st.finished):  # finished prompts only repeat their last token
        allowed = allowed | torch.tensor(st.finished)[:, None]
    unmasked, x = x, torch.log_softmax(torch.where(allowed, x, float("-inf")), dim=-1)
    dead = torch.isnan(x[:, 0]).tolist()  # a row with nothing allowed normalises to NaN
    if any(d and not f for d, f in zip(dead, st.finished)):
        filtered = bool(torch.isneginf(unmasked).any())  # a rewriter (e.g. a formula's topk) had excluded some
        why = "the tokens the other controls left (e.g. a formula's filters)" if filtered else "each other"
        raise UserError(f"the constraints allow no next token: they contradict {why}")
    return x


def sample(req: Request, x: torch.Tensor) -> torch.Tensor:
    """[B] tokens drawn from ``x`` with each prompt's own generator; finished prompts repeat their last."""
    st = req.state
    if not any(st.finished):
        return req.sampler(x, req.generators)
    live = [b for b, done in enumerate(st.finished) if not done]
    tokens = torch.zeros(st.batch_size, dtype=torch.long)
    if live:
        tokens[live] = req.sampler(x[live], [req.generators[b] for b in live])
    return repeat_finished(req, tokens)


def repeat_finished(req: Request, tokens: torch.Tensor) -> torch.Tensor:
    """Finished prompts keep repeating their last token (no stage reads it; the engine feeds nothing for them)."""
    st = req.state
    if any(st.finished):
        tokens = tokens.clone()
        for b, t in enumerate(st.last_tokens()):
            if st.finished[b]:
                tokens[b] = t
    return tokens


def accept(req: Request, tokens: torch.Tensor, x: torch.Tensor) -> None:
    """Tell the following controls, then emit the tokens (EOS, stop strings and max tokens end a prompt)."""
    for c in req.followers:
        c.on_token(req.state, tokens)
    emit(req, [(tokens, x)], req.model_lp)


def decide(req: Request) -> None:
    """One step of one request on the logits it holds: rewrite → mask → sample → accept."""
    req.state.step = req.state.confirmed
    x = mask(req, rewrite(req))
    tokens = sample(req, x)
    accept(req, tokens, x)
    req.tokens = tokens


def is_plain(req: Request) -> bool:
    """True when a request's step is only normalise → sample → emit: no control rewrites, masks or
    follows its tokens, and each prompt has one row."""
    return not (req.rewriters or req.maskers or req.followers) and req.state.rows_per_prompt == 1


def sample_plain(reqs: Sequence[Request]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rewrite → mask → sample stages of many plain requests at once, each request's ([B]
    tokens, [B, V] log-probabilities): one normalisation over all their rows and one draw per
    sampling setting, so a step of many small requests makes a few large tensor calls instead of
    many small ones. Every operation is row-wise, so each row gets exactly the numbers ``decide``
    gives it alone."""
    spans, start = [], 0
    for r in reqs:
        spans.append(slice(start, start + r.state.batch_size))
        start += r.state.batch_size
    x = torch.log_softmax(_stacked([r.state.logits.float() for r in reqs]), dim=-1)
    buckets: dict[tuple, list[int]] = {}
    for i, r in enumerate(reqs):
        buckets.setdefault(_sampling_key(r.cfg), []).append(i)
    tokens = torch.zeros(len(x), dtype=torch.long)
    for members in buckets.values():  # the live rows of each sampling setting (finished ones repeat their last token)
        live = [(spans[i].start + b, g) for i in members for b, g in enumerate(reqs[i].generators) if not reqs[i].state.finished[b]]
        if live:
            rows = [r for r, _ in live]
            tokens[rows] = reqs[members[0]].sampler(x if len(rows) == len(x) else x[rows], [g for _, g in live])
    return [(tokens[span], x[span]) for span in spans]


def _stacked(blocks: list[torch.Tensor]) -> torch.Tensor:
    """The [N, V] rows of ``blocks`` as one tensor: a view where they lie back to back in one buffer
    (a step's logits, sliced per request), else a copy."""
    first = blocks[0]
    if len(blocks) == 1:
        return first
    storage = first.untyped_storage()
    end = first.data_ptr()
    for b in blocks:
        if not b.is_contiguous() or b.data_ptr() != end or b.untyped_storage().data_ptr() != storage.data_ptr():
            return torch.cat(blocks)
        end += b.numel() * b.element_size()
    rows = sum(len(b) for b in blocks)
    return first.new_empty(0).set_(storage, first.storage_offset(), (rows, first.shape[1]), (first.shape[1], 1))


def accept_plain(req: Request, tokens: torch.Tensor, x: torch.Tensor) -> None:
    """The accept stage of a plain request after ``sample_plain``."""
    req.state.step = req.state.confirmed
    req.tokens = repeat_finished(req, tokens)
    emit(req, [(req.tokens, x)], x if req.model_rows else None)


def _sampling_key(cfg: SamplingConfig) -> tuple:
    """Configs with equal keys sample with the same function (their seeds live in the generators)."""
    return ("greedy",) if cfg.is_greedy else (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)


def emit(req: Request, confirmed: list[tuple[torch.Tensor, torch.Tensor]], model: torch.Tensor | None = None) -> None:
    """Turn confirmed steps, each ([B] tokens, [B, V] log-probabilities they were chosen under),
    into TokenEvents on ``req.events``; ``model``, for a single step, holds the uncontrolled model's
    [B, V] log-probabilities (``TokenEvent.model_logprob``)."""
    st, k = req.state, req.cfg.top_logprobs
    now = req.now()
    for tokens, x in confirmed:
        chosen = x.gather(1, tokens[:, None]).squeeze(1)
        base = model.gather(1, tokens[:, None]).squeeze(1).tolist() if model is not None else [None] * st.batch_size
        top = torch.topk(x, k, dim=-1) if k else None
        last = st.confirmed == req.cfg.max_tokens - 1
        st.confirmed += 1
        for b in range(st.batch_size):
            if st.finished[b]:
                continue
            t = int(tokens[b])
            alts = list(zip(top.indices[b].tolist(), top.values[b].tolist())) if top else []
            if t in req.eos:
                st.finished[b] = True
                new, _ = req.detoks[b].push(st.generated[b], final=True)
                req.events.append(TokenEvent(b, t, new, float(chosen[b]), alts, "eos", now, base[b]))
                continue
            st.generated[b].append(t)
            new, hit = req.detoks[b].push(st.generated[b], final=last)
            reason = "stop" if hit else "length" if last else None
            st.finished[b] = reason is not None
            req.events.append(TokenEvent(b, t, new, float(chosen[b]), alts, reason, now, base[b]))


def _checked(c: Control, out, like: torch.Tensor, finished: list[bool]) -> torch.Tensor:
    """``out`` if it is a usable [B, V] log-probability tensor, else an error naming the control."""
    if not isinstance(out, torch.Tensor) or out.shape != like.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{control_name(c)} returned log-probabilities of {got}; expected shape {tuple(like.shape)}")
    live = out[~torch.tensor(finished)] if any(finished) else out
    top = live.amax(dim=-1)  # one pass: a row's max is NaN if it holds one, +inf if it holds one, -inf if all are
    if bool(torch.isnan(top).any()) or bool(torch.isposinf(top).any()):
        raise UserError(f"{control_name(c)} returned NaN or +inf log-probabilities")
    if bool(torch.isneginf(top).any()):
        raise UserError(f"{control_name(c)} left no possible next token (every log-probability is -inf)")
    return out

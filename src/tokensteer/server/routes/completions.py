"""``POST /v1/completions``: continue a prompt (or a list of them), n choices each."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from tokensteer.server.auth import check_key
from tokensteer.server.controls import request_controls
from tokensteer.server.errors import APIError
from tokensteer.server.kvselect import requested
from tokensteer.server.limits import read_json
from tokensteer.server.responses import completion_logprobs, usage
from tokensteer.server.routes.common import check_model, sampling, stream
from tokensteer.server.run import Plan, start
from tokensteer.server.schemas import CompletionRequest, parse
from tokensteer.server.sse import EventStream

router = APIRouter()


@router.post("/v1/completions", dependencies=[Depends(check_key)])
async def completions(request: Request):
    ctx = request.app.state.ctx
    req: CompletionRequest = parse(CompletionRequest, await read_json(request, ctx.limits))
    check_model(ctx, req.model)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo", code="unsupported_parameter")
    if req.suffix:
        raise APIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported_parameter")
    n = 1 if req.n is None else req.n
    if req.best_of not in (None, 1, n):
        raise APIError(400, "best_of is not supported (other than equal to n)", param="best_of", code="unsupported_parameter")
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise APIError(400, "prompt is an empty list; give at least one prompt", param="prompt")
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise APIError(400, f"logprobs must be in [0, 20], got {req.logprobs}", param="logprobs")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    plan = Plan(prompts, n, sampling(req, max_tokens, req.logprobs or 0), req.seed, request_controls(req.tokensteer, None, ctx.vectors, ctx.limits, ctx.stores),
                byte_level=bool(req.tokensteer and req.tokensteer.byte_level), kv_select=requested(req.tokensteer))
    job = await start(ctx, plan)
    want_lp = req.logprobs is not None
    tok = ctx.lm.tokenizer

    def head() -> dict:
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": ctx.model_id}

    if req.stream:
        offsets = [0] * len(job.choices)

        def chunk(ev, trace):
            if not ev.text and ev.finish_reason is None and not want_lp:
                return None
            choice = {"index": ev.index, "text": ev.text, "logprobs": None, "finish_reason": job.choices[ev.index].finish_reason if ev.finish_reason else None}
            if want_lp and ev.finish_reason != "eos":
                choice["logprobs"] = completion_logprobs(tok, [ev], req.logprobs > 0, offsets[ev.index])
                offsets[ev.index] += len(choice["logprobs"]["tokens"][0])
            if trace is not None:
                choice["tokensteer"] = {"trace": trace}
            return {**head(), "choices": [choice]}

        def tail():
            return {**head(), "choices": [], "usage": usage(sum(job.prompt_tokens), job.completion_tokens())}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return EventStream(stream(job, [], chunk, tail if include else None), job.close)

    await job.collect(request)
    choices = []
    for i, c in enumerate(job.choices):
        choice = {"index": i, "text": "".join(c.text), "logprobs": None, "finish_reason": c.finish_reason or "length"}
        if want_lp:
            choice["logprobs"] = completion_logprobs(tok, c.events, req.logprobs > 0)
        if job.traced:
            choice["tokensteer"] = {"trace": c.trace}
        choices.append(choice)
    return JSONResponse({**head(), "choices": choices, "usage": usage(sum(job.prompt_tokens), job.completion_tokens())})

"""``POST /v1/chat/completions``: messages through the model's chat template (or the plain one, see
``server.chat``); ``response_format`` json_object / json_schema become a JSON schema constraint."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from tokensteer.server.auth import check_key
from tokensteer.server.chat import chat_prompt
from tokensteer.server.controls import request_controls
from tokensteer.server.errors import APIError
from tokensteer.server.kvselect import requested
from tokensteer.server.limits import read_json
from tokensteer.server.responses import chat_logprobs, usage
from tokensteer.server.routes.common import CHAT_DEFAULT_MAX_TOKENS, check_model, sampling, stream
from tokensteer.server.run import Plan, start
from tokensteer.server.schemas import ChatRequest, Message, ResponseFormat, parse
from tokensteer.server.sse import EventStream

router = APIRouter()


def text_of(m: Message, i: int) -> str:
    if m.content is None:
        if m.role == "assistant":
            return ""
        raise APIError(400, f"messages.{i}.content is missing", param=f"messages.{i}.content")
    return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)


def schema_of(fmt: ResponseFormat | None) -> object:
    """The JSON schema a response_format asks for, or None."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format.json_schema.schema")
    return fmt.json_schema.schema_


@router.post("/v1/chat/completions", dependencies=[Depends(check_key)])
async def chat(request: Request):
    ctx = request.app.state.ctx
    req: ChatRequest = parse(ChatRequest, await read_json(request, ctx.limits))
    check_model(ctx, req.model)
    messages = [{"role": m.role, "content": text_of(m, i)} for i, m in enumerate(req.messages)]
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise APIError(400, f"top_logprobs must be in [0, 20], got {req.top_logprobs}", param="top_logprobs")
    prompt, stops = chat_prompt(ctx.lm, messages)
    plain = bool(stops)  # the plain template: the reply after "Assistant:" starts with a space, which is dropped
    given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = min(CHAT_DEFAULT_MAX_TOKENS, ctx.limits.max_tokens) if given is None else given
    controls = request_controls(req.tokensteer, schema_of(req.response_format), ctx.vectors, ctx.limits, ctx.stores)
    n = 1 if req.n is None else req.n
    plan = Plan([prompt], n, sampling(req, max_tokens, req.top_logprobs or 0, stops), req.seed, controls, prompt_param="messages",
                byte_level=bool(req.tokensteer and req.tokensteer.byte_level), kv_select=requested(req.tokensteer))
    job = await start(ctx, plan)
    job.id = job.id.replace("cmpl-", "chatcmpl-")
    tok = ctx.lm.tokenizer

    def head(obj: str) -> dict:
        return {"id": job.id, "object": obj, "created": job.created, "model": ctx.model_id}

    if req.stream:

        def delta(i: int, d: dict, reason=None, lp=None) -> dict:
            return {**head("chat.completion.chunk"), "choices": [{"index": i, "delta": d, "logprobs": lp, "finish_reason": reason}]}

        heads = [delta(i, {"role": "assistant", "content": ""}) for i in range(len(job.choices))]
        begun = [not plain for _ in job.choices]

        def chunk(ev, trace):
            real = ev.finish_reason != "eos"
            text = ev.text if begun[ev.index] else ev.text.lstrip()
            begun[ev.index] = begun[ev.index] or bool(text)
            lp = chat_logprobs(tok, [ev]) if req.logprobs and real else None
            if not text and ev.finish_reason is None and lp is None:
                return None
            out = delta(ev.index, {"content": text} if text or real else {}, job.choices[ev.index].finish_reason if ev.finish_reason else None, lp)
            if trace is not None:
                out["choices"][0]["tokensteer"] = {"trace": trace}
            return out

        def tail():
            return {**head("chat.completion.chunk"), "choices": [], "usage": usage(sum(job.prompt_tokens), job.completion_tokens())}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return EventStream(stream(job, heads, chunk, tail if include else None), job.close)

    await job.collect(request)
    choices = []
    for i, c in enumerate(job.choices):
        choice = {
            "index": i,
            "message": {"role": "assistant", "content": "".join(c.text).lstrip() if plain else "".join(c.text), "refusal": None},
            "logprobs": chat_logprobs(tok, c.events) if req.logprobs else None,
            "finish_reason": c.finish_reason or "length",
        }
        if job.traced:
            choice["tokensteer"] = {"trace": c.trace}
        choices.append(choice)
    return JSONResponse({**head("chat.completion"), "choices": choices, "usage": usage(sum(job.prompt_tokens), job.completion_tokens())})

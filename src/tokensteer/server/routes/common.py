"""What completions and chat share: the model name check, the sampling fields, OpenAI fields this
server accepts only at their neutral values, and the streamed response loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator, Callable

from tokensteer.server.errors import APIError, from_exception
from tokensteer.server.schemas import Sampling
from tokensteer.server.sse import DONE, frame

if TYPE_CHECKING:
    from tokensteer.server.app import ServerContext
    from tokensteer.server.run import Job

CHAT_DEFAULT_MAX_TOKENS = 256  # OpenAI's chat default is "up to the context"; a base model rarely stops by itself


def check_model(ctx: ServerContext, name: str) -> None:
    if name != ctx.model_id:
        raise APIError(404, f"the model {name!r} is not served here; this server runs {ctx.model_id!r} (see /v1/models)",
                       param="model", code="model_not_found")


def sampling(req: Sampling, max_tokens: int, top_logprobs: int, stops: tuple[str, ...] = ()) -> dict:
    """SamplingConfig fields (all but the seed) with OpenAI's defaults: temperature 1, top_p 1."""
    if req.presence_penalty not in (None, 0, 0.0):
        raise APIError(400, "presence_penalty is not supported; use repetition_penalty (e.g. 1.2)", param="presence_penalty", code="unsupported_parameter")
    if req.frequency_penalty not in (None, 0, 0.0):
        raise APIError(400, "frequency_penalty is not supported; use repetition_penalty (e.g. 1.2)", param="frequency_penalty", code="unsupported_parameter")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported; ban words with tokensteer.constraints.ban", param="logit_bias", code="unsupported_parameter")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16:
        raise APIError(400, f"at most 16 stop strings, got {len(stop)}", param="stop")
    return {
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": req.top_k or 0,
        "min_p": req.min_p or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "stop": tuple(stop) + tuple(s for s in stops if s not in stop),
        "top_logprobs": top_logprobs,
        "ignore_eos": bool(req.ignore_eos),
    }


async def stream(job: Job, heads: list[dict], chunk: Callable, tail: Callable | None) -> AsyncIterator[bytes]:
    """SSE frames: ``heads`` first, then ``chunk(ev, trace)`` per event (None sends nothing), then
    ``tail()`` (the usage chunk) if given. Events that are ready together go out in one write
    (see ``Job.batches``). An error mid-stream becomes a frame holding the error object; the
    stream always ends with [DONE]. Closing it early cancels the request."""
    try:
        if heads:
            yield b"".join(frame(head) for head in heads)
        async for batch in job.batches():
            frames = [frame(out) for ev in batch if (out := chunk(ev, job.record(ev))) is not None]
            if frames:
                yield b"".join(frames)
        if tail is not None:
            yield frame(tail())
    except Exception as e:  # noqa: BLE001 - the client gets the error object, the log the traceback
        yield frame(from_exception(e).body())
    finally:
        job.close()
    yield DONE

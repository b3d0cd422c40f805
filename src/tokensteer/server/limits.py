"""What one request may ask of the server, and how many may run at once; each limit refuses with
a 4xx that names the limit and the server flag that raises it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi import Request

from tokensteer.server.errors import APIError


@dataclass(frozen=True)
class Limits:
    """Per-request and server-wide limits (``tokensteer serve --max-…`` flags)."""

    max_body_bytes: int = 1 << 20  # a request body, before it is parsed
    max_prompt_tokens: int = 2048  # one prompt (or a chat's rendered prompt)
    max_tokens: int = 1024  # tokens to generate per choice
    max_n: int = 16  # choices per request: n × the number of prompts
    max_formula_chars: int = 2000
    max_formula_rows: int = 8  # conditioning texts a formula adds: one batch row each per choice
    max_concurrent: int = 64  # requests running or waiting at once; more get 429

    def check_tokens(self, max_tokens: int, param: str) -> None:
        if max_tokens < 0:
            raise APIError(400, f"{param} must be ≥ 0, got {max_tokens}", param=param)
        if max_tokens > self.max_tokens:
            raise APIError(400, f"{param} {max_tokens} is above this server's limit of {self.max_tokens} (tokensteer serve --max-tokens-limit)",
                           param=param, code="max_tokens_too_large")

    def check_choices(self, n: int, prompts: int) -> None:
        if n < 1:
            raise APIError(400, f"n must be ≥ 1, got {n}", param="n")
        if n * prompts > self.max_n:
            what = f"n = {n}" if prompts == 1 else f"n × prompts = {n} × {prompts}"
            raise APIError(400, f"{what} choices is above this server's limit of {self.max_n} per request (tokensteer serve --max-n)",
                           param="n", code="too_many_choices")

    def check_prompt(self, n_tokens: int, param: str) -> None:
        if n_tokens > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n_tokens} tokens, above this server's limit of {self.max_prompt_tokens} "
                           "(tokensteer serve --max-prompt-tokens)", param=param, code="context_length_exceeded")


async def read_json(request: Request, limits: Limits) -> dict:
    """The request body as a JSON object, read up to ``max_body_bytes`` (413 beyond)."""
    too_big = APIError(413, f"the request body is larger than this server's limit of {limits.max_body_bytes:,} bytes "
                       "(tokensteer serve --max-body-bytes)", code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    return obj


class Gate:
    """Counts requests in flight (running or waiting in the engine's queue); beyond the limit, 429.
    Only the event loop's thread touches it, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0

    def enter(self) -> None:
        if self.active >= self.limit:
            raise APIError(429, f"the server is busy: {self.active} requests are running or waiting, its limit "
                           "(tokensteer serve --max-concurrent); retry shortly", code="too_many_requests")
        self.active += 1

    def leave(self) -> None:
        self.active -= 1

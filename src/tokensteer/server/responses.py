"""OpenAI response objects for completions and chat, built from the engine's token events (field
names and shapes as in the ``openai`` package's types; tests check them against those types)."""

from __future__ import annotations

import math
import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokensteer.backends.base import Tokenizer
    from tokensteer.engine import TokenEvent

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
FLOOR = -9999.0  # what a -inf log-probability becomes: JSON has no infinity


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def finite(x: float) -> float:
    return x if math.isfinite(x) else FLOOR


def finish(reason: str | None) -> str | None:
    return None if reason is None else FINISH.get(reason, "stop")


def completion_logprobs(tok: Tokenizer, events: list[TokenEvent], top: bool, offset: int = 0) -> dict:
    """``choices[i].logprobs`` of a completion: tokens, their log-probabilities, top alternatives
    (``{text: logprob}``; tokens the controls ruled out are left out) and each token's offset in
    the completion text."""
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        text = tok.token_text(ev.token)
        tokens.append(text)
        lps.append(finite(ev.logprob))
        tops.append({tok.token_text(i): v for i, v in ev.top if math.isfinite(v)} if top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops if top else None, "text_offset": offsets}


def chat_logprobs(tok: Tokenizer, events: list[TokenEvent]) -> dict:
    """``choices[i].logprobs`` of a chat completion: one entry per token with its bytes and top alternatives."""

    def entry(token: int, lp: float) -> dict:
        return {"token": tok.token_text(token), "logprob": finite(lp), "bytes": list(tok.token_bytes(token))}

    content = [{**entry(ev.token, ev.logprob), "top_logprobs": [entry(i, v) for i, v in ev.top if math.isfinite(v)]} for ev in events]
    return {"content": content, "refusal": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

"""Server-sent events as OpenAI streams them: ``data: {json}`` frames, an error as a frame holding
the error object, and ``data: [DONE]`` at the end."""

from __future__ import annotations

import json
from typing import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def frame(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream response that always closes its generator, so a client that hangs up
    runs the generator's cleanup (which cancels its request) at once."""

    def __init__(self, frames: AsyncIterator[bytes]) -> None:
        super().__init__(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.frames = frames

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.frames.aclose()

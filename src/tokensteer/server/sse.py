"""Server-sent events as OpenAI streams them: ``data: {json}`` frames, an error as a frame holding
the error object, and ``data: [DONE]`` at the end."""

from __future__ import annotations

import json
from typing import AsyncGenerator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def frame(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream response that always closes its generator and calls ``on_close``, so a
    client that hangs up (even before the first frame) cancels its request at once."""

    def __init__(self, frames: AsyncGenerator[bytes, None], on_close: Callable[[], None]) -> None:
        super().__init__(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.frames, self.on_close = frames, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.frames.aclose()
            self.on_close()

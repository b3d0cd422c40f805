"""The engine: continuous batching over one loaded model, with controls acting at named stages.

    variants → edits → forward → rewrite → mask → sample → accept

``Engine.submit`` queues a request from any thread and returns a ``Handle`` (iterate it, or
``async for`` it; ``cancel`` ends it); ``generate`` and ``stream`` are blocking clients of the
backend's engine. See docs/architecture.md.
"""

from tokensteer.engine.clients import generate, generate_bytes, stream, stream_bytes
from tokensteer.engine.engine import Engine, engine_for
from tokensteer.engine.events import Generation, TokenEvent
from tokensteer.engine.handle import Cancelled, Handle
from tokensteer.engine.state import LoopState

__all__ = ["Cancelled", "Engine", "Generation", "Handle", "LoopState", "TokenEvent", "engine_for", "generate", "generate_bytes", "stream", "stream_bytes"]

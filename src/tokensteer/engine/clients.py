"""``generate`` and ``stream``: the engine's blocking clients, as the Python API and the CLI use them."""

from __future__ import annotations

import threading
from typing import Iterator, Sequence

from tokensteer.backends.base import Backend
from tokensteer.engine.engine import engine_for
from tokensteer.engine.events import Generation, TokenEvent
from tokensteer.hooks import Control
from tokensteer.sampling import SamplingConfig


def stream(backend: Backend, prompts: str | Sequence[str], cfg: SamplingConfig = SamplingConfig(), controls: Sequence[Control] = ()) -> Iterator[TokenEvent]:
    """Submit the prompts as one request and yield each accepted token; closing the stream early cancels it."""
    _not_on_engine_thread()
    handle = engine_for(backend).submit(prompts, cfg, controls)
    try:
        yield from handle
    finally:
        handle.cancel()


def generate(backend: Backend, prompts: str | Sequence[str], cfg: SamplingConfig = SamplingConfig(), controls: Sequence[Control] = ()) -> list[Generation]:
    """Submit the prompts as one request and wait for one Generation per prompt."""
    _not_on_engine_thread()
    handle = engine_for(backend).submit(prompts, cfg, controls)
    try:
        return handle.result()
    finally:
        handle.cancel()  # interrupted while waiting (Ctrl-C): the request leaves the batch


def stream_bytes(backend: Backend, prompts: str | Sequence[str], cfg: SamplingConfig, controls: Sequence[Control] = (), formula: str | None = None) -> Iterator[TokenEvent]:
    """``stream`` for a byte-level request (one event per byte)."""
    _not_on_engine_thread()
    handle = engine_for(backend).submit_bytes(prompts, cfg, formula, controls=controls)
    try:
        yield from handle
    finally:
        handle.cancel()


def generate_bytes(backend: Backend, prompts: str | Sequence[str], cfg: SamplingConfig, controls: Sequence[Control] = (), formula: str | None = None) -> list:
    """``generate`` for a byte-level request: one ByteGeneration per prompt."""
    _not_on_engine_thread()
    handle = engine_for(backend).submit_bytes(prompts, cfg, formula, controls=controls)
    try:
        return handle.result()
    finally:
        handle.cancel()


def _not_on_engine_thread() -> None:
    if threading.current_thread().name == "tokensteer-engine":
        raise RuntimeError("a control cannot generate through the engine from inside a step; open a session of its own")

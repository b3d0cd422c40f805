"""The FastAPI app: one loaded model, one engine, the routes, the playground and the error shape.

    app = create_app(lm, Settings(api_key="k", vectors="vecs/"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from tokensteer.server import errors
from tokensteer.server.cli import STREAM_INTERVAL_S
from tokensteer.server.controls import Vectors
from tokensteer.server.errors import APIError
from tokensteer.server.limits import Gate, Limits
from tokensteer.server.metrics import CountRequests, Metrics
from tokensteer.server.retrieve import Stores

if TYPE_CHECKING:
    from tokensteer.backends.base import Backend
    from tokensteer.engine import Engine
    from tokensteer.kvselect import KVSelectConfig
    from tokensteer.server.kvselect import Engines

PLAYGROUND_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize")


@dataclass
class Settings:
    """How the server runs: its key, its vector folder, its limits and its batch."""

    api_key: str | None = None
    vectors: str | None = None
    stores: str | None = None  # folder of document stores clients name in tokensteer.retrieve
    limits: Limits = field(default_factory=Limits)
    max_batch_rows: int = 32
    kv_select: KVSelectConfig | None = None  # TokenSelect for requests that do not name their own (serve --kv-select)
    stream_interval: float = STREAM_INTERVAL_S  # seconds a stream's write may wait for more tokens (serve --stream-interval)


@dataclass
class ServerContext:
    """What every route reads: the model, its engine and the server's settings."""

    lm: Backend
    engine: Engine
    limits: Limits
    vectors: Vectors
    api_key: str | None
    metrics: Metrics
    gate: Gate
    model_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)
    engines: Engines | None = None  # the engine per kv_select setting (``engine`` for the server's own)
    stores: Stores = field(default_factory=lambda: Stores(None))  # document stores for tokensteer.retrieve
    stream_interval: float = STREAM_INTERVAL_S  # see Settings
    closed: bool = False


def warm_tokenizer(lm: Backend) -> None:
    """Decode every token once where the tokenizer caches pieces (llama.cpp), so request threads
    and the engine thread afterwards only read the cache."""
    piece = getattr(lm.tokenizer, "piece", None)
    if piece is not None:
        for i in range(lm.tokenizer.vocab_size):
            piece(i)
        getattr(lm.tokenizer, "special_ids", None)  # found on first use


def create_app(lm: Backend, settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The server for one loaded model (``engine``: an existing Engine over ``lm``, else a new one)."""
    from tokensteer.engine import Engine
    from tokensteer.server.kvselect import Engines, server_setting
    from tokensteer.server.routes import chat, completions, info

    settings = settings or Settings()
    lim = settings.limits
    server_setting(lm, settings.kv_select)
    warm_tokenizer(lm)
    own = engine is None  # an engine the caller passed outlives this app
    engine = engine or Engine(lm, max_batch_rows=settings.max_batch_rows, max_running=lim.max_concurrent)
    ctx = ServerContext(lm, engine, lim, Vectors(settings.vectors), settings.api_key or None, Metrics(), Gate(lim.max_concurrent), lm.model_name)
    ctx.engines = Engines(lm, engine, settings.max_batch_rows, lim.max_concurrent)
    ctx.stores = Stores(settings.stores)
    ctx.stream_interval = settings.stream_interval
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        ctx.closed = True
        ctx.engines.close()
        if own:
            engine.close()

    app = FastAPI(title="tokensteer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(CountRequests, metrics=ctx.metrics, routes=ROUTES)
    app.state.ctx = ctx
    errors.install(app)
    for r in (completions.router, chat.router, info.router):
        app.include_router(r)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(asset("index.html"))

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_file(name: str) -> Response:
        if name not in PLAYGROUND_FILES:
            raise APIError(404, f"no playground file {name!r}")
        return Response(asset(name), media_type=PLAYGROUND_FILES[name])

    return app


def asset(name: str) -> bytes:
    return resources.files("tokensteer.server").joinpath("playground", name).read_bytes()

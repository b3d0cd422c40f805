"""``tokensteer serve``: load a model once and serve it over HTTP (OpenAI's API plus the
``tokensteer`` controls) with a web playground at ``/``."""

from __future__ import annotations

import os
import socket
from typing import Optional

import typer

from tokensteer.errors import UserError

#: serve's default --stream-interval: a stream costs the server and its client per write (a wake, a
#: socket write and a read each), taken from the CPUs the model runs on; 20 writes a second still
#: reads as token by token
STREAM_INTERVAL_S = 0.05
#: serve --ray's default --stream-interval: each write crosses Ray Serve's proxy, which costs per message
RAY_STREAM_INTERVAL_S = 0.1
MAX_STREAM_INTERVAL_S = 10.0


def serve_command(
    model: Optional[str] = typer.Option(None, help="Local Hugging Face model folder or .gguf file (default: bundled Gemma 3 270M)."),
    backend: str = typer.Option("auto", help="auto, torch (every control) or llamacpp (fast; one steering vector set per batch)."),
    dtype: str = typer.Option("float32", help="Weights dtype for the torch backend: float32 or bfloat16."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 exposes the server to the network (set --api-key)."),
    port: int = typer.Option(8000, help="Port to listen on (0 picks a free one)."),
    api_key: Optional[str] = typer.Option(None, envvar="TOKENSTEER_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on the API routes."),
    vectors: Optional[str] = typer.Option(None, help="Folder of steering vectors (.safetensors/.gguf) clients may name in tokensteer.steer."),
    stores: Optional[str] = typer.Option(None, help="Folder of document stores (sub-folders of .txt/.md files, .jsonl files) clients may name in tokensteer.retrieve."),
    max_concurrent: int = typer.Option(64, help="Requests running or queued at once; more get HTTP 429."),
    max_tokens_limit: int = typer.Option(1024, help="Most tokens one choice may generate."),
    max_prompt_tokens: int = typer.Option(2048, help="Most tokens in one prompt."),
    max_n: int = typer.Option(16, help="Most choices per request (n × prompts)."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body."),
    max_formula_chars: int = typer.Option(2000, help="Longest formula."),
    max_formula_rows: int = typer.Option(8, help="Most conditioning texts in one formula (each is a batch row)."),
    batch_rows: int = typer.Option(32, help="Rows the running batch holds before requests start a second one."),
    stream_interval: Optional[float] = typer.Option(None, help="Seconds a stream may hold tokens to send them in one write (fewer, larger SSE writes; the first token and a finished choice go at once); default 0.05, or 0.1 with --ray, where every write crosses Ray Serve's proxy; 0 writes each token as it comes."),
    kv_select: Optional[str] = typer.Option(None, "--kv-select", help="TokenSelect for long prompts (torch backend) for requests that do not set tokensteer.kv_select: bare for the defaults, or k=…,local=…,init=…,theta=…. See docs/longcontext.md.", rich_help_panel="Long prompts"),
    log_level: str = typer.Option("info", help="uvicorn's log level: debug, info, warning, error."),
    ray: bool = typer.Option(False, "--ray", help="Run as a Ray Serve deployment (pip install 'tokensteer\\[ray]'; docs/scaling.md).", rich_help_panel="Ray cluster"),
    address: Optional[str] = typer.Option(None, help="With --ray: join the Ray cluster at ADDR (host:port, or 'auto' for `ray start` on this machine); default: start a local one.", rich_help_panel="Ray cluster"),
    replicas: Optional[int] = typer.Option(None, help="With --ray: replicas, each loading the model (default 1).", rich_help_panel="Ray cluster"),
    autoscale: Optional[str] = typer.Option(None, help="With --ray: MIN,MAX replicas, added and removed with the load (instead of --replicas).", rich_help_panel="Ray cluster"),
    replica_cpus: int = typer.Option(1, help="With --ray: CPUs (and threads) each replica reserves.", rich_help_panel="Ray cluster"),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API with a playground at /.

    Examples:

      tokensteer serve

      tokensteer serve --port 8080 --vectors vectors/ --api-key secret

      tokensteer serve --stores stores/    (then "tokensteer": {"retrieve": {"store": "NAME", "k": 4}})

      tokensteer serve --ray --address auto --replicas 2

      tokensteer serve --backend torch --kv-select --max-prompt-tokens 32768

      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "gemma-3-270m", "prompt": "The day was", "max_tokens": 20, "tokensteer": {"formula": "positive"}}'
    """
    from tokensteer.cli_common import err, load_model, user_errors

    with user_errors():
        for name, v in (("--max-concurrent", max_concurrent), ("--max-tokens-limit", max_tokens_limit), ("--max-prompt-tokens", max_prompt_tokens),
                        ("--max-n", max_n), ("--max-body-bytes", max_body_bytes), ("--max-formula-chars", max_formula_chars), ("--batch-rows", batch_rows)):
            if v < 1:
                raise UserError(f"{name} must be at least 1, got {v}")
        if stream_interval is not None and not 0 <= stream_interval <= MAX_STREAM_INTERVAL_S:
            raise UserError(f"--stream-interval must be in [0, {MAX_STREAM_INTERVAL_S:g}] seconds, got {stream_interval}")
        if max_formula_rows < 0:
            raise UserError(f"--max-formula-rows must be ≥ 0, got {max_formula_rows}")
        if vectors is not None and not os.path.isdir(os.path.expanduser(vectors)):
            raise UserError(f"--vectors {vectors!r} is not a folder")
        if stores is not None and not os.path.isdir(os.path.expanduser(stores)):
            raise UserError(f"--stores {stores!r} is not a folder")
        if not ray and (address or replicas is not None or autoscale):
            raise UserError("--address, --replicas and --autoscale need --ray")
        from tokensteer.kvselect import cli as kv_cli

        kv_cfg, backend = kv_cli.choose(kv_select, backend, err)
        sock = bind(host, port)  # before the model loads: a busy port fails at once

    from tokensteer.server import Limits, Settings, create_app

    limits = Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens_limit, max_n=max_n,
                    max_formula_chars=max_formula_chars, max_formula_rows=max_formula_rows, max_concurrent=max_concurrent)
    interval = (RAY_STREAM_INTERVAL_S if ray else STREAM_INTERVAL_S) if stream_interval is None else stream_interval
    settings = Settings(api_key=api_key, vectors=vectors, stores=stores, limits=limits, max_batch_rows=batch_rows, kv_select=kv_cfg,
                        stream_interval=interval)
    if ray:
        from tokensteer.scale.cli import serve_on_ray

        return serve_on_ray(sock, model, backend, dtype, settings, address, replicas, autoscale, replica_cpus, log_level)
    lm = load_model(model, backend, dtype)

    import uvicorn

    with user_errors():
        app = create_app(lm, settings)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if bound_host not in ("127.0.0.1", "::1", "localhost") and not api_key:
        err.print(f"[yellow]warning:[/] listening on {bound_host} without --api-key: anyone who can reach this port can use the model", highlight=False)
    err.print(f"[bold]playground:[/] http://{shown}:{bound_port}/   [bold]API:[/] http://{shown}:{bound_port}/v1", highlight=False)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; a busy port or an unknown address is a UserError."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0–65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise UserError(f"--host {host!r} is not an address of this machine") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock

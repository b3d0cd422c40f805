"""The ``--ray`` branch of ``tokensteer serve``: check the Ray options, join or start a cluster,
deploy, and serve until stopped."""

from __future__ import annotations

import os
import socket

from tokensteer.errors import UserError
from tokensteer.server import Settings


def serve_on_ray(sock: socket.socket, model: str | None, backend: str, dtype: str, settings: Settings, address: str | None,
                 replicas: int | None, autoscale: str | None, replica_cpus: int, log_level: str) -> None:
    """``tokensteer serve --ray``: ``sock`` is the free port the proxy will take (closed here)."""
    from tokensteer.cli_common import err, user_errors

    host, port = sock.getsockname()[:2]
    sock.close()
    with user_errors():
        if replicas is not None and autoscale:
            raise UserError("give --replicas or --autoscale, not both")
        if replicas is not None and replicas < 1:
            raise UserError(f"--replicas must be at least 1, got {replicas}")
        if log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise UserError(f"--log-level must be critical, error, warning, info, debug or trace, got {log_level!r}")
        if replica_cpus < 1:
            raise UserError(f"--replica-cpus must be at least 1, got {replica_cpus}")
        from tokensteer.scale.cluster import connected, require_ray

        require_ray()
        from tokensteer.scale.serve import ReplicaConfig, parse_autoscale, serve_until_stopped

        scale = parse_autoscale(autoscale) if autoscale else None
        if host not in ("127.0.0.1", "::1", "localhost") and not settings.api_key:
            err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this port can use the model", highlight=False)
        cfg = ReplicaConfig(model, backend, dtype, settings, replica_cpus, os.getcwd())
        err.print("[dim]starting Ray Serve (each replica loads the model)…[/]", highlight=False)
        with connected(address) as owned:
            serve_until_stopped(cfg, host, port, replicas, scale, owned, log_level,
                                say=lambda msg: err.print(msg, highlight=False))

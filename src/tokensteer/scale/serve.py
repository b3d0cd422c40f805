"""``tokensteer serve --ray``: the server's FastAPI app as a Ray Serve deployment.

Each replica is a Ray actor that loads the model once and builds the same app ``tokensteer serve``
runs (``create_app``: OpenAI routes, playground, its own continuously batching engine). Ray Serve's
HTTP proxy takes requests on the port and hands each to a replica.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

from tokensteer.errors import UserError
from tokensteer.scale.cluster import first_line, worker_setup
from tokensteer.server import Settings

APP_NAME = "tokensteer"


@dataclass
class ReplicaConfig:
    """What every replica loads and how its app runs; ``cwd``: the driver's, for relative paths."""

    model: str | None
    backend: str
    dtype: str
    settings: Settings
    cpus: int = 1
    cwd: str | None = None


@serve.deployment(name=APP_NAME)
@serve.ingress()
class Replica:
    """One model, one engine, one app: Ray Serve calls ``__serve_build_asgi_app__`` after ``__init__``."""

    def __init__(self, cfg: ReplicaConfig) -> None:
        import tokensteer

        worker_setup(cfg.cpus, cfg.cwd)
        self.cfg = cfg
        self.lm = tokensteer.load(cfg.model, backend=cfg.backend, dtype=cfg.dtype)

    def __serve_build_asgi_app__(self) -> Any:
        from tokensteer.server import create_app

        return create_app(self.lm, self.cfg.settings)


def parse_autoscale(spec: str) -> tuple[int, int]:
    """``"1,4"`` -> (1, 4): the fewest and most replicas."""
    parts = [p.strip() for p in spec.split(",")]
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--autoscale must look like MIN,MAX (e.g. 1,4), got {spec!r}") from None
    if lo < 0 or hi < max(1, lo):
        raise UserError(f"--autoscale MIN,MAX needs 0 ≤ MIN ≤ MAX and MAX ≥ 1, got {spec!r}")
    return lo, hi


def deployment_options(cfg: ReplicaConfig, replicas: int | None, autoscale: tuple[int, int] | None) -> dict[str, Any]:
    """Ray Serve options: CPUs per replica; a replica takes as many requests as its server admits
    (its engine batches them) and as many more wait at each proxy (beyond that: HTTP 503); either a
    fixed count or autoscaling on requests per replica."""
    lim = cfg.settings.limits
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": cfg.cpus}, "max_ongoing_requests": lim.max_concurrent,
                            "max_queued_requests": lim.max_concurrent}
    if autoscale is not None:
        lo, hi = autoscale
        target = max(1, min(cfg.settings.max_batch_rows, lim.max_concurrent))  # a replica whose batch is full asks for another
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1), "target_ongoing_requests": target}
    else:
        opts["num_replicas"] = replicas or 1
    return opts


def deploy(cfg: ReplicaConfig, host: str, port: int, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
           log_level: str = "warning") -> None:
    """Start Ray Serve's proxy on host:port (where Serve is not running yet) and deploy the app at
    ``/``; returns once every replica is up. Needs a Ray connection (``cluster.connected``).
    ``log_level`` as uvicorn's: Serve logs each request at info and below."""
    level = "DEBUG" if log_level.lower() == "trace" else log_level.upper()
    logging.getLogger("ray.serve").setLevel(level)
    logs = {"log_level": level, "enable_access_log": level in ("DEBUG", "INFO")}
    serve.start(http_options={"host": host, "port": port}, logging_config=logs)
    app = Replica.options(**deployment_options(cfg, replicas, autoscale)).bind(cfg)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logs)
    except RuntimeError as e:  # a replica failed to start (e.g. the model is not on that node)
        raise UserError(f"the Ray Serve deployment failed: {first_line(e)}") from None


def serve_until_stopped(cfg: ReplicaConfig, host: str, port: int, replicas: int | None, autoscale: tuple[int, int] | None,
                        owned: bool, log_level: str = "warning", say: Any = print) -> None:
    """Deploy, announce the URLs, and wait for Ctrl-C or SIGTERM; then remove the app (and Serve
    itself where this command started the cluster)."""
    deploy(cfg, host, port, replicas, autoscale, log_level)
    shown = f"[{host}]" if ":" in host else host
    scale = f"autoscaling {autoscale[0]}–{autoscale[1]} replicas" if autoscale else f"{replicas or 1} replica(s)"
    say(f"[bold]playground:[/] http://{shown}:{port}/   [bold]API:[/] http://{shown}:{port}/v1   (Ray Serve, {scale})")

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            serve.shutdown() if owned else serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - the cluster may already be gone; nothing left to remove
            pass


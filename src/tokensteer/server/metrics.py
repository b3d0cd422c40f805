"""Prometheus metrics (``GET /metrics``): requests, tokens, the running batch, the queue, and time
to first token. Each app has its own registry, so several servers can live in one process."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tokensteer_requests", "HTTP requests to the API, by route and status", ["route", "status"], registry=r)
        self.tokens = Counter("tokensteer_tokens", "Tokens processed: prompt (read) and completion (generated)", ["kind"], registry=r)
        self.ttft = Histogram("tokensteer_time_to_first_token_seconds", "Seconds from a request's submission to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.running = Gauge("tokensteer_requests_running", "Requests whose rows are in the running batch", registry=r)
        self.waiting = Gauge("tokensteer_requests_waiting", "Requests queued for the running batch", registry=r)
        self.batch_rows = Gauge("tokensteer_batch_rows", "Rows in the running batch (all groups)", registry=r)
        self.groups = Gauge("tokensteer_batch_groups", "Groups of rows the engine steps (requests that cannot share run apart)", registry=r)
        self.in_flight = Gauge("tokensteer_http_in_flight", "API requests the server holds now (its --max-concurrent counts these)", registry=r)

    def render(self, stats: dict, in_flight: int) -> tuple[bytes, str]:
        """The exposition text, with the gauges read from the engine now."""
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        self.batch_rows.set(stats.get("rows", 0))
        self.groups.set(len(stats.get("batch_rows", ())))
        self.in_flight.set(in_flight)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountRequests:
    """ASGI middleware: count API requests by route and final status (streams included)."""

    def __init__(self, app, metrics: Metrics, routes: tuple[str, ...]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in self.routes:
            return await self.app(scope, receive, send)
        status = [500]

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.requests.labels(path, str(status[0])).inc()

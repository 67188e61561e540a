"""Prometheus metrics (prometheus-client) and the ASGI middleware that feeds them and bounds body sizes.

Request counts and latency histograms per endpoint (the route template, not the raw path) and status,
per-stage latency of /recommend, the model version, index size and reload count. With several uvicorn
workers set PROMETHEUS_MULTIPROC_DIR and RECSYS_METRICS_MULTIPROC=1 (``recsys serve --workers N`` does): /metrics then aggregates
every worker's files through prometheus-client's multiprocess collector.
"""

from __future__ import annotations

import asyncio
import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RETRY_AFTER_S = 1  # what a shed reply asks the client to wait (whole seconds: the header's unit)
BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self):
        # several uvicorn workers: `recsys serve --workers N` sets both variables (a stray PROMETHEUS_MULTIPROC_DIR
        # left by another library must not switch a single process to file-backed metrics)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")) and os.environ.get("RECSYS_METRICS_MULTIPROC") == "1"
        self.registry = CollectorRegistry()
        # multiprocess: values live in files that /metrics aggregates; nothing is registered in this process
        r = {"registry": None} if self.multiprocess else {"registry": self.registry}
        self.requests = Counter("recsys_requests_total", "HTTP requests", ["endpoint", "method", "status"], **r)
        self.latency = Histogram("recsys_request_latency_seconds", "HTTP request latency", ["endpoint", "status"],
                                 buckets=BUCKETS, **r)
        self.stage = Histogram("recsys_stage_latency_seconds", "Latency of one stage of /recommend", ["stage"],
                               buckets=BUCKETS, **r)
        self.batch_size = Histogram("recsys_batch_size", "Requests served together in one batch (dynamic batching)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), **r)
        gauge = {"multiprocess_mode": "liveall"} if self.multiprocess else {}
        self.model = Gauge("recsys_model_info", "The model version being served (value 1)", ["version", "source", "index"],
                           **gauge, **r)
        self.index_items = Gauge("recsys_index_items", "Items in the candidate index", **gauge, **r)
        self.reloads = Counter("recsys_reloads_total", "Model reloads applied", **r)
        self.reload_failures = Counter("recsys_reload_failures_total",
                                       "Reloads refused (a snapshot that failed its checks; the previous one stays)", **r)
        self.shed = Counter("recsys_shed_total", "Requests refused at once with 503 (over the worker's in-flight "
                            "limit, or the search pool full)", ["endpoint"], **r)
        self.events = Counter("recsys_events_total", "Interactions accepted into the event log", ["kind"], **r)
        self.middleware = _middleware(self)

    def loaded(self, snap, reload: bool) -> None:
        labels = (snap.model, snap.bundle.source, snap.index.info.kind)
        if getattr(self, "_labels", None) not in (None, labels):
            self.model.remove(*self._labels)
        self._labels = labels
        self.model.labels(*labels).set(1)
        self.index_items.set(snap.n_items)
        if reload:
            self.reloads.inc()

    def event(self, new: bool) -> None:
        self.events.labels("new" if new else "duplicate").inc()

    def stages(self, timings_ms: dict[str, float]) -> None:
        for name, ms in timings_ms.items():
            if name != "total_ms":
                self.stage.labels(name.removesuffix("_ms")).observe(ms / 1000)

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _middleware(metrics: Metrics):
    class MetricsAndLimits:
        """Pure ASGI: sheds a request at once with 503 + Retry-After when the worker already has ``max_in_flight``
        requests in progress (back-pressure: a bounded queue instead of latency that grows without bound; the
        health and metrics paths are never shed), rejects bodies over the route's limit with 413 (by
        Content-Length, and while streaming for chunked bodies), then records the request's count and latency
        under its route template."""

        def __init__(self, app, limits: dict[str, int], default_limit: int, max_in_flight: int = 0,
                     open_paths: tuple[str, ...] = (), path_in_flight: dict[str, int] | None = None):
            """``path_in_flight``: a smaller in-flight limit of its own for a path (/search: its pool), checked
            before the body is read, so a flood of uploads is refused without reading them."""
            self.app, self.limits, self.default = app, limits, default_limit
            self.max_in_flight, self.open_paths = max_in_flight, open_paths
            self.path_limits = path_in_flight or {}
            self.in_flight = 0  # on the event loop only: no lock needed
            # (client host, port) of a connection just shed -> when its Retry-After ends. A client that retries at
            # once (a retry storm) has its retry held until then, at no cost to anyone else: without this, 248
            # closed-loop connections retrying at once made 9,800 503s a second and starved the accepted
            # requests of the GIL (161 answered a second instead of 714; BENCHMARKS.md: load)
            self.told_to_wait: dict = {}
            self.path_busy = {p: 0 for p in self.path_limits}

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            path = scope["path"]
            if self.told_to_wait:  # this connection was shed and retries before its Retry-After: held until then
                until = self.told_to_wait.pop(scope.get("client"), 0.0)
                if until > time.monotonic():
                    await asyncio.sleep(until - time.monotonic())
            if self.max_in_flight and path not in self.open_paths and self.in_flight >= self.max_in_flight:
                return await self._shed(send, scope, "in-flight limit",
                                        b"over capacity: %d requests in progress; retry shortly" % self.in_flight)
            own = self.path_limits.get(path)
            if own is not None and self.path_busy[path] >= own:
                return await self._shed(send, scope, path, b"%d searches in progress; retry shortly" % own)
            self.in_flight += 1
            if own is not None:
                self.path_busy[path] += 1
            held = [True]

            def release() -> None:  # as the reply's last byte goes out: the client's next request finds the slot free
                if held[0]:
                    held[0] = False
                    self.in_flight -= 1
                    if own is not None:
                        self.path_busy[path] -= 1

            try:
                await self._handle(scope, receive, send, release)
            finally:
                release()

        async def _shed(self, send, scope, why: str, detail: bytes) -> None:
            """503 + Retry-After at once, before the body is read (counted in recsys_shed_total)."""
            metrics.shed.labels(why).inc()
            metrics.requests.labels("shed", scope["method"], "503").inc()
            if len(self.told_to_wait) > 100_000:  # connections long gone
                now = time.monotonic()
                self.told_to_wait = {c: t for c, t in self.told_to_wait.items() if t > now}
            self.told_to_wait[scope.get("client")] = time.monotonic() + RETRY_AFTER_S
            body = b'{"detail":"%s"}' % detail
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"%d" % RETRY_AFTER_S),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        async def _handle(self, scope, receive, send, release):
            t0 = time.perf_counter()
            limit = self.limits.get(scope["path"], self.default)
            status = {"code": 500, "started": False, "over": False}
            length = dict(scope.get("headers") or []).get(b"content-length")

            async def send_wrapper(message):
                if status["over"]:  # the body went over the limit: our 413, not the app's parse error
                    if message["type"] == "http.response.start" and not status["started"]:
                        await too_large()
                    return
                if message["type"] == "http.response.start":
                    status["code"], status["started"] = message["status"], True
                elif not message.get("more_body", False):
                    release()
                await send(message)

            async def too_large():
                body = b'{"detail":"request body over the %d-byte limit"}' % limit
                status["code"], status["started"] = 413, True
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})

            seen = {"n": 0}

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    seen["n"] += len(message.get("body", b""))
                    if seen["n"] > limit:
                        status["over"] = True
                        raise _TooLarge()
                return message

            try:
                if length is not None and length.isdigit() and int(length) > limit:
                    await too_large()
                else:
                    await self.app(scope, receive_limited, send_wrapper)
            except _TooLarge:
                if not status["started"]:
                    await too_large()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            code = str(status["code"])
            metrics.requests.labels(endpoint, scope.get("method", ""), code).inc()
            metrics.latency.labels(endpoint, code).observe(time.perf_counter() - t0)

    return MetricsAndLimits


class _TooLarge(Exception):
    pass

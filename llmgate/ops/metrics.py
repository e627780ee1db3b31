# -*- test-case-name: tests.ops.test_metrics -*-
"""
Prometheus metrics, on a registry of our own, served by a tiny Resource.

prometheus_client's Twisted helper wraps a WSGI app on the global reactor's
thread pool and the global registry; ours is injected and testable. Metrics
are updated once per request when it ends, never per streamed event, and
their labels carry names (route, model, provider, key name), never a secret.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource

from llmgate.dialects import ENDPOINTS

# Model names come from clients. A name becomes a label value only if it is
# configured, or an upstream answered 200 for it (a default provider serves
# names we do not list), and only up to this many distinct names; anything
# else is counted as "other", so no client can fill the registry with junk.
MAX_MODELS = 256

_ROUTES = frozenset(p.decode() for p in ENDPOINTS)

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The gateway's metrics."""

    def __init__(self, registry: CollectorRegistry | None = None, models: Iterable[str] = ()) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmgate_requests",
            "Requests handled, by route, status and outcome.",
            ["route", "status", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "llmgate_tokens",
            "Tokens counted, by model, provider, bucket and source.",
            ["model", "provider", "bucket", "source"],
            registry=r,
        )
        self.cost = Counter(
            "llmgate_cost_usd", "Cost of requests with a known price, USD.", ["model", "provider"], registry=r
        )
        self.active = Gauge("llmgate_active_requests", "Requests being relayed now.", registry=r)
        self.ttft = Histogram(
            "llmgate_ttft_seconds", "Time to the first relayed byte.", ["route"], buckets=_TTFT_BUCKETS, registry=r
        )
        self.ledger_pending = Gauge("llmgate_ledger_pending", "Usage records not yet written.", registry=r)
        self.ledger_failures = Gauge("llmgate_ledger_write_failures", "Failed ledger writes since start.", registry=r)
        self.ledger_dropped = Gauge("llmgate_ledger_dropped", "Usage records dropped since start.", registry=r)
        self.executor_jobs = Gauge(
            "llmgate_executor_jobs", "Jobs queued or running on a gateway thread pool.", ["pool"], registry=r
        )
        self.executor_bytes = Gauge(
            "llmgate_executor_bytes", "Body bytes held by the jobs of a thread pool.", ["pool"], registry=r
        )
        self.executor_rejected = Gauge(
            "llmgate_executor_rejected", "Jobs refused by a full thread pool queue since start.", ["pool"], registry=r
        )
        self._configured = frozenset(models)
        self._models: set[str] = set()
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        # labels() takes a lock and builds a key on every call; cache the
        # children (their number is bounded by the label caps).
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _model(self, rec: Any) -> str:
        name = rec.model
        if name in self._configured or name in self._models:
            return name
        if rec.status == 200 and len(self._models) < MAX_MODELS:
            self._models.add(name)
            return name
        return "other"

    def watch_executor(self, executor: Any) -> None:
        """Report a L{BoundedExecutor}'s queue whenever metrics are scraped."""
        name = executor.name
        self.executor_jobs.labels(name).set_function(lambda: executor.jobs)
        self.executor_bytes.labels(name).set_function(lambda: executor.bytes)
        self.executor_rejected.labels(name).set_function(lambda: executor.rejected)

    def watch_ledger(self, ledger: Any) -> None:
        """Report the ledger's state whenever metrics are scraped."""
        self.ledger_pending.set_function(ledger.pending_count)
        self.ledger_failures.set_function(lambda: ledger.write_failures)
        self.ledger_dropped.set_function(lambda: ledger.dropped)

    def observe(self, rec: Any) -> None:
        """Account for one finished request's usage record."""
        # Unknown paths come from clients too: label them all "other".
        route = rec.route if rec.route in _ROUTES else "other"
        self._child(self.requests, route, str(rec.status), rec.outcome).inc()
        if rec.ttft_ms is not None:
            self._child(self.ttft, route).observe(rec.ttft_ms / 1000.0)
        model = self._model(rec)
        if rec.source is not None:
            for bucket in ("input", "output", "cached_input", "cache_creation", "reasoning"):
                n = getattr(rec, bucket + "_tokens")
                if n:
                    self._child(self.tokens, model, rec.provider, bucket, rec.source).inc(n)
        if rec.cost_usd:
            self._child(self.cost, model, rec.provider).inc(rec.cost_usd)


class MetricsResource(Resource):
    """C{GET /metrics} in the Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)

# -*- test-case-name: tests.ops.test_metrics -*-
"""
Prometheus metrics, on a registry of our own, served by a tiny Resource.

prometheus_client's Twisted helper wraps a WSGI app on the global reactor's
thread pool and the global registry; ours is injected and testable. Metrics
are updated once per request when it ends, never per streamed event, and
their labels carry names (route, model, provider, key name), never a secret.

Under C{--workers N} each worker process counts its own requests in
prometheus_client's multiprocess mode (the supervisor sets
C{PROMETHEUS_MULTIPROC_DIR} to a directory it owns, before the worker
imports prometheus_client): values live in per-process memory-mapped
files, and the supervisor's C{/metrics} (L{AggregateMetricsResource})
sums them.  Chosen over the supervisor scraping each worker because it
needs no channel per worker and no merging code of ours, and a dead
worker's counters stay in the sum (counters never go back).  The gauges
name their multiprocess mode: C{livesum} for "now" values (a dead
worker's files are removed by the supervisor), C{sum} for "since start".

The per-request updates (L{Metrics.observe}, L{Metrics.attempt}) of a
single process are batched when the gateway gives L{Metrics} its reactor
(L{Metrics.batch}): each request adds to a plain dict on the reactor
thread (no lock, no bucket search per histogram), and the sums go into
prometheus_client's values -- one locked C{inc} per value touched,
however many requests -- when the registry is collected (so a scrape of
C{/metrics} sees every finished request), at most L{FLUSH_INTERVAL}
seconds after the first pending update, and at shutdown.  Unbatched, a
dozen prometheus updates per request, each taking a lock, were ~12 us of
the reactor thread.  A worker's updates are not batched: its values are
files the supervisor sums even after a SIGKILL, which must lose none.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llmgate.dialects import ENDPOINTS
from llmgate.ops.periodic import Periodic

# Model names come from clients. A name becomes a label value only if it is
# configured, or an upstream answered 200 for it (a default provider serves
# names we do not list), and only up to this many distinct names; anything
# else is counted as "other", so no client can fill the registry with junk.
MAX_MODELS = 256

_ROUTES = frozenset(p.decode() for p in ENDPOINTS)

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# The gateway's own share of the first token's latency: sub-millisecond
# when idle, a reactor turn or more under load.
_ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

# Batched updates wait at most this long for a scrape before they are
# written into the values.
FLUSH_INTERVAL = 1.0

# Why an upstream attempt was made, for llmgate_upstream_attempts_total.
ATTEMPT_REASONS = frozenset(["first", "retry", "fallback", "hedge"])

# Key label of a request with no key name (refused before its key was
# checked), and of a name that is not configured (a key removed by a
# reload while its requests ran): bounded either way.
NO_KEY = "none"
OTHER = "other"

# Why the gateway refused a request itself, for llmgate_rejections_total:
# a fixed set, so the label stays bounded whatever the callers pass.
REJECTION_REASONS = frozenset(
    ["rpm", "tpm", "concurrency", "budget", "model_not_allowed", "unpriced_model", "expired", "invalid_key"]
)


def upstream_error_reason(rec: Any) -> str:
    """
    A bounded reason for an C{upstream_error} record, from where it failed
    and its status: C{connect} / C{connect_timeout}, C{headers_timeout},
    C{http_429}, C{http_4xx}, C{http_5xx} (the upstream's status, or the
    gateway's 502 for a response it could not relay), C{body} (cut
    mid-response: a stream error event, an idle timeout, a lost
    connection).
    """
    phase, status = rec.phase, rec.status
    if phase == "connect":
        return "connect_timeout" if status == 504 else "connect"
    if phase == "body":
        return "body"
    if status == 504:
        return "headers_timeout"
    if status == 429:
        return "http_429"
    if 400 <= status < 500:
        return "http_4xx"
    return "http_5xx"


class Metrics:
    """The gateway's metrics."""

    def __init__(
        self, registry: CollectorRegistry | None = None, models: Iterable[str] = (), keys: Iterable[str] = ()
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Batched updates (see the module docstring): value -> amount to
        # add; the flusher is registered first, so a collection writes
        # them before any metric is read.
        self._pending: dict[Any, float] = {}
        self._clock: Any = None
        self._timer: Any = None
        self._values: dict[tuple[Any, ...], Any] = {}
        r.register(_Flusher(self))
        self.requests = Counter(
            "llmgate_requests",
            "Requests handled, by route, status, outcome, gateway key name and provider.",
            ["route", "status", "outcome", "key", "provider"],
            registry=r,
        )
        self.tokens = Counter(
            "llmgate_tokens",
            "Tokens counted, by model, provider, bucket, source and gateway key name.",
            ["model", "provider", "bucket", "source", "key"],
            registry=r,
        )
        self.cost = Counter(
            "llmgate_cost_usd", "Cost of requests with a known price, USD.", ["model", "provider", "key"], registry=r
        )
        self.active = Gauge(
            "llmgate_active_requests", "Requests being relayed now.", registry=r, multiprocess_mode="livesum"
        )
        self.ttft = Histogram(
            "llmgate_ttft_seconds", "Time to the first relayed byte of a stream.", ["route"],
            buckets=_TTFT_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "llmgate_request_duration_seconds", "Total duration of relayed requests, admission to end.",
            ["route", "provider"], buckets=_DURATION_BUCKETS, registry=r,
        )
        self.upstream_headers = Histogram(
            "llmgate_upstream_headers_seconds", "Time from starting an upstream request to its response headers.",
            ["provider"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.added_first = Histogram(
            "llmgate_gateway_added_first_byte_seconds",
            "Latency the gateway adds to the first relayed bytes: from the upstream read that brought "
            "them to their write to the client.",
            ["route"], buckets=_ADDED_BUCKETS, registry=r,
        )
        self.added_chunk_max = Histogram(
            "llmgate_gateway_added_chunk_max_seconds",
            "Per stream, the worst latency the gateway added to a later chunk (after the first): "
            "from the upstream read that completed its events to their write to the client.",
            ["route"], buckets=_ADDED_BUCKETS, registry=r,
        )
        self.added_chunk_mean = Histogram(
            "llmgate_gateway_added_chunk_mean_seconds",
            "Per stream, the mean latency the gateway added to later chunks (after the first).",
            ["route"], buckets=_ADDED_BUCKETS, registry=r,
        )
        self.cancellations = Counter(
            "llmgate_cancellations", "Requests their client cancelled, by phase.", ["phase"], registry=r
        )
        self.upstream_errors = Counter(
            "llmgate_upstream_errors", "Requests that failed upstream, by provider and reason.",
            ["provider", "reason"], registry=r,
        )
        # Every upstream attempt, by why it was made (L{ATTEMPT_REASONS}),
        # and every hedge by whether it served the client (won) or not.
        self.upstream_attempts = Counter(
            "llmgate_upstream_attempts", "Upstream attempts, by provider and reason (first, retry, fallback, hedge).",
            ["provider", "reason"], registry=r,
        )
        self.hedges = Counter(
            "llmgate_hedges", "Hedged attempts, by model and result (won: the hedge served the client; lost).",
            ["model", "result"], registry=r,
        )
        self.ledger_pending = Gauge(
            "llmgate_ledger_pending", "Usage records not yet written.", registry=r, multiprocess_mode="livesum"
        )
        # Counters, kept in step with the ledger's own counts by
        # sync_ledger (before a scrape, or on a worker's timer).
        self.ledger_failures = Counter(
            "llmgate_ledger_write_failures", "Failed ledger writes.", registry=r
        )
        self.ledger_dropped = Counter(
            "llmgate_ledger_dropped", "Usage records dropped (the disk failed too long).", registry=r
        )
        self._ledger: Any = None
        self._ledger_seen = [0, 0]
        self.executor_jobs = Gauge(
            "llmgate_executor_jobs", "Jobs queued or running on a gateway thread pool.", ["pool"],
            registry=r, multiprocess_mode="livesum",
        )
        self.executor_bytes = Gauge(
            "llmgate_executor_bytes", "Body bytes held by the jobs of a thread pool.", ["pool"],
            registry=r, multiprocess_mode="livesum",
        )
        self.executor_rejected = Gauge(
            "llmgate_executor_rejected", "Jobs refused by a full thread pool queue since start.", ["pool"],
            registry=r, multiprocess_mode="sum",
        )
        # -- keys, limits and budgets (llmgate.policy) --
        self.rejections = Counter(
            "llmgate_rejections",
            "Requests the gateway refused for their key: reason rpm, tpm, concurrency, budget, "
            "model_not_allowed, unpriced_model, expired or invalid_key (key \"none\").",
            ["key", "reason"], registry=r,
        )
        # Under --workers with in-memory state each worker enforces its own
        # view of the spend; "livemin" shows the least any live worker has
        # left, the view that refuses first.  With Redis each worker sets it
        # from the shared spend Redis returns at each of its settles, so the
        # least is the latest: the budget less every worker's spend.
        self.budget_remaining = Gauge(
            "llmgate_budget_remaining_usd",
            "Budget left in the current period per key with a budget (USD; negative by the overshoot).",
            ["key"], registry=r, multiprocess_mode="livemin",
        )
        self._configured = frozenset(models)
        self.keys = frozenset(keys)
        self._executors: list[Any] = []
        self._models: set[str] = set()
        self._children: dict[tuple[Any, ...], Any] = {}
        # -- status page (llmgate.ops.status): a StatusBoard fed below --
        self.board: Any = None

    def _key(self, name: str) -> str:
        """A key label: a configured key's name (or "anonymous" without keys)."""
        if not name:
            return NO_KEY
        if name in self.keys or name == "anonymous":
            return name
        return OTHER

    def rejected(self, key_name: str, reason: str) -> None:
        """
        Count a request refused for its key: C{key_name} a configured
        key's name (anything else counts as C{none} or C{other}, never the
        presented secret), C{reason} one of L{REJECTION_REASONS}.
        """
        if reason == "invalid_key":
            key_name = ""
        self._child(self.rejections, self._key(key_name), reason if reason in REJECTION_REASONS else OTHER).inc()

    def attempt(self, provider: str, reason: str) -> None:
        """
        Count an upstream attempt: C{provider} a configured provider's name,
        C{reason} one of L{ATTEMPT_REASONS} (anything else counts as other).
        """
        self._inc(self.upstream_attempts, (provider, reason if reason in ATTEMPT_REASONS else OTHER))

    def hedge(self, model: str, result: str) -> None:
        """Count a hedge's C{result} ("won"/"lost") for a configured C{model}."""
        model = model if model in self._configured else OTHER
        self._child(self.hedges, model, result if result in ("won", "lost") else OTHER).inc()

    def budget_left(self, key_name: str, remaining: float) -> None:
        """Set a configured key's remaining budget (called when its request settles)."""
        if key_name in self.keys:
            self._child(self.budget_remaining, key_name).set(remaining)

    def _child(self, metric: Any, *labels: str) -> Any:
        # labels() takes a lock and builds a key on every call; cache the
        # children (their number is bounded by the label caps).
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- batching ------------------------------------------------------------

    def batch(self, clock: Any, interval: float = FLUSH_INTERVAL) -> None:
        """
        Batch the per-request updates from now on: written at each
        collection, C{interval} seconds of C{clock} after the first one
        pending, and when C{clock} (a reactor) shuts down.  Every update
        must then come from C{clock}'s thread.  Nothing changes in
        multiprocess mode (a worker's values are written at once).
        """
        if getattr(values.ValueClass, "_multiprocess", False):
            # A worker's values are its files, which the supervisor sums
            # even after the worker died (SIGKILL included): each update is
            # written at once, so none is lost with the process.
            return
        self._clock = clock
        self._interval = interval
        add_trigger = getattr(clock, "addSystemEventTrigger", None)
        if add_trigger is not None:
            add_trigger("after", "shutdown", self.flush)

    def flush(self) -> None:
        """Write the batched updates into prometheus_client's values."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        pending = self._pending
        if pending:
            self._pending = {}
            for value, amount in pending.items():
                value.inc(amount)

    def _due(self) -> None:
        if self._timer is None:
            self._timer = self._clock.callLater(self._interval, self.flush)

    def _inc(self, metric: Any, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """C{metric.labels(*labels).inc(amount)}, batched if L{batch} was called."""
        if self._clock is None:
            self._child(metric, *labels).inc(amount)
            return
        key = (metric, labels)
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = self._child(metric, *labels)._value
        pending = self._pending
        pending[value] = pending.get(value, 0.0) + amount
        if self._timer is None:
            self._due()

    def _observe(self, metric: Any, labels: tuple[str, ...], amount: float) -> None:
        """C{metric.labels(*labels).observe(amount)} of a histogram, batched if L{batch} was called."""
        if self._clock is None:
            self._child(metric, *labels).observe(amount)
            return
        key = (metric, labels)
        parts = self._values.get(key)
        if parts is None:
            child = self._child(metric, *labels)
            parts = self._values[key] = (child._sum, child._buckets, child._upper_bounds)
        total, buckets, bounds = parts
        pending = self._pending
        pending[total] = pending.get(total, 0.0) + amount
        # The first bucket whose upper bound is >= amount (the last is +Inf),
        # as Histogram.observe counts it.
        bucket = buckets[bisect_left(bounds, amount)]
        pending[bucket] = pending.get(bucket, 0.0) + 1.0
        if self._timer is None:
            self._due()

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
        self._executors.append(executor)
        self.executor_jobs.labels(name).set_function(lambda: executor.jobs)
        self.executor_bytes.labels(name).set_function(lambda: executor.bytes)
        self.executor_rejected.labels(name).set_function(lambda: executor.rejected)

    def watch_ledger(self, ledger: Any) -> None:
        """
        Report the ledger's state whenever metrics are scraped (the
        counters through L{sync_ledger}, which L{MetricsResource} calls).
        """
        self._ledger = ledger
        self.ledger_pending.set_function(ledger.pending_count)

    def sync_ledger(self) -> None:
        """Bring the ledger counters up to the ledger's own counts."""
        ledger = self._ledger
        if ledger is None:
            return
        seen = self._ledger_seen
        failures, dropped = ledger.write_failures, ledger.dropped
        if failures > seen[0]:
            self.ledger_failures.inc(failures - seen[0])
            seen[0] = failures
        if dropped > seen[1]:
            self.ledger_dropped.inc(dropped - seen[1])
            seen[1] = dropped

    def push_ledger(self, ledger: Any, clock: Any, interval: float = 1.0) -> Service:
        """
        Under multiprocess mode a gauge's function is never called (the
        scrape reads files), so a worker sets the ledger gauges every
        C{interval} seconds instead.

        @return: the service doing it, for the worker's tree.
        """
        self._ledger = ledger
        return _LedgerGauges(self, ledger, clock, interval)

    def observe(self, rec: Any, ex: Any = None) -> None:
        """
        Account for one finished request's usage record, and, for a
        relayed one, the timings of its L{Exchange
        <llmgate.relay.stream.Exchange>} C{ex}.
        """
        # -- status page (llmgate.ops.status) --
        if self.board is not None:
            self.board.observe(rec)
        # Unknown paths come from clients too: label them all "other".
        route = rec.route if rec.route in _ROUTES else "other"
        key = self._key(rec.key_name)
        provider = rec.provider
        outcome = rec.outcome
        self._inc(self.requests, (route, str(rec.status), outcome, key, provider))
        if rec.ttft_ms is not None and rec.streamed:
            self._observe(self.ttft, (route,), rec.ttft_ms / 1000.0)
        if outcome == "client_cancelled":
            self._inc(self.cancellations, (rec.phase or "request",))
        elif outcome == "upstream_error":
            self._inc(self.upstream_errors, (provider, upstream_error_reason(rec)))
        if ex is not None:
            self._observe(self.duration, (route, provider), rec.duration_ms / 1000.0)
            if ex.headers_at is not None:
                self._observe(self.upstream_headers, (provider,), max(0.0, ex.headers_at - ex.started))
            if ex.first_write_at is not None and ex.first_byte_at is not None:
                self._observe(self.added_first, (route,), max(0.0, ex.first_write_at - ex.first_byte_at))
            if ex.added_n:
                self._observe(self.added_chunk_max, (route,), max(0.0, ex.added_max))
                self._observe(self.added_chunk_mean, (route,), max(0.0, ex.added_sum / ex.added_n))
        model = self._model(rec)
        source = rec.source
        if source is not None:
            for bucket, n in (
                ("input", rec.input_tokens),
                ("output", rec.output_tokens),
                ("cached_input", rec.cached_input_tokens),
                ("cache_creation", rec.cache_creation_tokens),
                ("reasoning", rec.reasoning_tokens),
            ):
                if n:
                    self._inc(self.tokens, (model, provider, bucket, source, key), n)
        if rec.cost_usd:
            self._inc(self.cost, (model, provider, key), rec.cost_usd)


class _Flusher:
    """
    Registered first in the metrics' registry: collecting it writes the
    batched updates, so the metrics collected after it include them.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self._metrics.flush()
        return []


class MetricsResource(Resource):
    """C{GET /metrics} in the Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, before: Callable[[], Any] | None = None) -> None:
        """@param before: called before each scrape (L{Metrics.sync_ledger})."""
        super().__init__()
        self.registry = registry
        self._before = before

    def render_GET(self, request: Any) -> bytes:
        if self._before is not None:
            self._before()
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class _LedgerGauges(Periodic):
    """Copies the ledger's state into its gauges on a timer (at start, and a last time at stop)."""

    def __init__(self, metrics: Metrics, ledger: Any, clock: Any, interval: float) -> None:
        super().__init__(clock, interval, now=True)
        self._metrics = metrics
        self._ledger = ledger

    def tick(self) -> None:
        self.update()

    def update(self) -> None:
        m, ledger = self._metrics, self._ledger
        m.ledger_pending.set(ledger.pending_count())
        m.sync_ledger()
        for executor in m._executors:
            m.executor_jobs.labels(executor.name).set(executor.jobs)
            m.executor_bytes.labels(executor.name).set(executor.bytes)
            m.executor_rejected.labels(executor.name).set(executor.rejected)

    def stopService(self) -> None:
        super().stopService()
        self.update()


def render_multiprocess(path: str) -> bytes:
    """
    The sum over every process that wrote metrics files in C{path}, in
    the Prometheus text format.  Reads files: call it off the reactor.
    """
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return generate_latest(registry)


class AggregateMetricsResource(Resource):
    """
    The supervisor's C{GET /metrics} under C{--workers}: the workers'
    metrics files summed, read in a thread.
    """

    isLeaf = True
    _log = Logger(namespace="llmgate.metrics")

    def __init__(self, path: Callable[[], str], in_thread: Any) -> None:
        """
        @param path: returns the directory (made when the tree starts).
        @param in_thread: runs a blocking callable off the reactor.
        """
        super().__init__()
        self.path = path
        self._in_thread = in_thread

    def render_GET(self, request: Any) -> Any:
        d = self._in_thread(render_multiprocess, self.path())

        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(body: bytes) -> None:
            if gone:
                return
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            request.write(body)
            request.finish()

        def failed(f: Any) -> None:
            self._log.failure("reading the workers' metrics failed", f)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET

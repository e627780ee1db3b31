# -*- test-case-name: tests.ops.test_otel -*-
"""
OpenTelemetry GenAI semantic conventions: metrics and a span per request,
made from each finished usage record (L{GenAITelemetry.observe}, called once
per request by L{llmgate.accounting.recorder.Accounting}), never per event.

Optional: C{pip install 'llmgate[otel]'} and C{[otel] endpoint}. This
module imports the OpenTelemetry SDK, so nothing imports it unless C{[otel]}
is configured (L{llmgate.tap}); tests hand L{GenAITelemetry} in-memory
providers.

Names and attributes follow the GenAI conventions (gen_ai.provider.name,
which replaced gen_ai.system): metrics C{gen_ai.client.token.usage}
(C{gen_ai.token.type} input/output), C{gen_ai.server.time_to_first_token}
(streams), C{gen_ai.server.request.duration}; spans named
C{"{operation} {model}"} of kind CLIENT (the conventions' kind for an
inference call; the gateway makes the call to the provider).

Under each request span, a child span per upstream attempt, so that a
retried request shows each try: named C{"{operation} {upstream model}"},
with the provider, the attempt number, its outcome and status, and the
served attempt's tokens. A failed attempt (or, with hedging, a lost one)
is reported by its own record (L{GenAITelemetry.attempt}, from
L{Accounting.attempt_failed
<llmgate.accounting.recorder.Accounting.attempt_failed>}) before its
request ends, and waits, as a record and two floats, for the request's
span to be made from the final record; one reported after its request
ended gets its span at once, under the request's span if that ended in the
last L{RECENT} requests. Attempt times are the relay clock's, put on the
request's wall-clock start; the served attempt starts where the last
failed one ended (retries are sequential).
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, Optional

from opentelemetry.trace import NonRecordingSpan, SpanKind, Status, StatusCode, set_span_in_context
from twisted.application.service import Service

from llmgate.dialects import ENDPOINTS

# gen_ai.operation.name by route; a custom value where the conventions have
# none (count_tokens), "_OTHER" for paths the gateway does not relay.
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
    "/v1/messages/count_tokens": "count_tokens",
}
_ROUTE_KIND = {p.decode(): e.kind for p, e in ENDPOINTS.items()}

# The conventions' advisory bucket boundaries.
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]


# Bounds of the attempt bookkeeping: client requests with failed attempts
# waiting for their final record (one always comes; the bound only guards
# against a bug), and requests whose span is remembered for late attempts.
MAX_WAITING = 10_000
RECENT = 1_024


def error_type(rec: Any) -> Optional[str]:
    """C{error.type} of a record: its outcome when not completed, else its 4xx/5xx status, else None."""
    if rec.outcome != "completed":
        return rec.outcome
    if rec.status >= 400:
        return str(rec.status)
    return None


class GenAITelemetry:
    """
    Turns finished usage records into GenAI metrics and spans.

    @param meter_provider: an SDK C{MeterProvider}.
    @param tracer_provider: an SDK C{TracerProvider}.
    """

    def __init__(self, meter_provider: Any, tracer_provider: Any) -> None:
        meter = meter_provider.get_meter("llmgate")
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self._ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time to generate the first token of a streamed response.",
            explicit_bucket_boundaries_advisory=_TTFT_BUCKETS,
        )
        self._duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="Generative AI server request duration.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._tracer = tracer_provider.get_tracer("llmgate")
        # parent request id -> [(record, provider kind, started, ended)] of
        # its failed attempts (relay clock), until the request's record.
        self._waiting: dict[str, list[tuple[Any, Optional[str], float, float]]] = {}
        # request id -> (context of its span, wall start, clock start) of
        # the last RECENT relayed requests, for attempts reported late.
        self._recent: dict[str, tuple[Any, float, float]] = {}

    def attempt(self, rec: Any, kind: Optional[str], started: float, ended: float) -> None:
        """
        An upstream attempt that did not serve its request: its record
        (C{parent_request_id} names the request), its provider's kind, and
        its start and end on the relay's clock.
        """
        parent = rec.parent_request_id
        if parent is None:
            return
        recent = self._recent.get(parent)
        if recent is not None:
            ctx, base, t0 = recent
            self._attempt_span(ctx, rec, kind, base + _ns(started - t0), base + _ns(ended - t0), {})
            return
        waiting = self._waiting.get(parent)
        if waiting is None:
            if len(self._waiting) >= MAX_WAITING:
                del self._waiting[next(iter(self._waiting))]
            waiting = self._waiting[parent] = []
        waiting.append((rec, kind, started, ended))

    def _attempt_span(
        self, ctx: Any, rec: Any, kind: Optional[str], start_ns: int, end_ns: int, usage: dict[str, Any]
    ) -> None:
        operation = OPERATIONS.get(rec.route, "_OTHER")
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "llmgate.attempt": rec.attempt}
        if kind:
            attrs["gen_ai.provider.name"] = kind
        if rec.provider:
            attrs["llmgate.provider"] = rec.provider
        if rec.upstream_model:
            attrs["gen_ai.request.model"] = rec.upstream_model
        attrs["llmgate.outcome"] = rec.outcome
        if rec.status:
            attrs["http.response.status_code"] = rec.status
        if rec.phase:
            attrs["llmgate.phase"] = rec.phase
        attrs.update(usage)
        err = error_type(rec)
        if err is not None:
            attrs["error.type"] = err
        span = self._tracer.start_span(
            f"{operation} {rec.upstream_model}" if rec.upstream_model else operation,
            context=ctx, kind=SpanKind.CLIENT, attributes=attrs, start_time=start_ns,
        )
        if err is not None:
            span.set_status(Status(StatusCode.ERROR, err))
        span.end(end_time=max(start_ns, end_ns))

    def observe(self, rec: Any, ex: Any = None) -> None:
        """Record one finished request (C{rec}, and its Exchange C{ex} if it was relayed)."""
        operation = OPERATIONS.get(rec.route, "_OTHER")
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation}
        kind = ex.provider.kind if ex is not None else _ROUTE_KIND.get(rec.route)
        if kind:
            attrs["gen_ai.provider.name"] = kind
        if rec.model:
            attrs["gen_ai.request.model"] = rec.model
        if rec.served_model:
            attrs["gen_ai.response.model"] = rec.served_model
        for n, kind_ in ((rec.input_tokens, "input"), (rec.output_tokens, "output")):
            if n is not None:
                self._tokens.record(n, {**attrs, "gen_ai.token.type": kind_})
        if rec.streamed and rec.ttft_ms is not None:
            self._ttft.record(rec.ttft_ms / 1000.0, attrs)
        err = error_type(rec)
        self._duration.record(rec.duration_ms / 1000.0, attrs if err is None else {**attrs, "error.type": err})
        # The span: built after the fact from the record's own times.
        span_attrs = dict(attrs)
        if rec.input_tokens is not None:
            span_attrs["gen_ai.usage.input_tokens"] = rec.input_tokens
        if rec.output_tokens is not None:
            span_attrs["gen_ai.usage.output_tokens"] = rec.output_tokens
        if rec.upstream_id:
            span_attrs["gen_ai.response.id"] = rec.upstream_id
        if rec.status:
            span_attrs["http.response.status_code"] = rec.status
        span_attrs["llmgate.request_id"] = rec.request_id
        if err is not None:
            span_attrs["error.type"] = err
        start = int(rec.ts * 1e9)
        span = self._tracer.start_span(
            f"{operation} {rec.model}" if rec.model else operation,
            kind=SpanKind.CLIENT, attributes=span_attrs, start_time=start,
        )
        if err is not None:
            span.set_status(Status(StatusCode.ERROR, err))
        span.end(end_time=start + int(rec.duration_ms * 1e6))
        if ex is not None:
            self._attempts(rec, ex, span, span_attrs, start)

    def _attempts(self, rec: Any, ex: Any, span: Any, span_attrs: dict[str, Any], base: int) -> None:
        """
        The attempt spans under the request's C{span} (started at C{base}
        ns): the failed ones reported, then the served one.
        """
        # The parent's ids only: the span itself (its attributes) is not
        # kept for late attempts.
        ctx = set_span_in_context(NonRecordingSpan(span.get_span_context()))
        t0 = ex.started
        recent = self._recent
        recent[rec.request_id] = (ctx, base, t0)
        if len(recent) > RECENT:
            del recent[next(iter(recent))]
        last_end = t0
        for a_rec, kind, started, ended in self._waiting.pop(rec.request_id, ()):
            self._attempt_span(ctx, a_rec, kind, base + _ns(started - t0), base + _ns(ended - t0), {})
            last_end = max(last_end, ended)
        usage = {k: v for k, v in span_attrs.items() if k.startswith("gen_ai.usage.") or k in _SERVED}
        end = base + int(rec.duration_ms * 1e6)
        self._attempt_span(ctx, rec, ex.provider.kind, min(end, base + _ns(last_end - t0)), end, usage)


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


# Attributes of the request span that the served attempt's span repeats.
_SERVED = frozenset(["gen_ai.response.model", "gen_ai.response.id"])


def resource_attributes(service_name: str) -> dict[str, Any]:
    """
    The exported resource of this process: C{service.name} and a
    C{service.instance.id} of its own, a random UUID made at each process
    start (the conventions' advice), with the host name and pid beside it
    for people.  Under C{--workers} every worker exports its own
    cumulative metrics: with one instance id for all, a collector would
    take them for one series that keeps going back and forth.  A restarted
    worker is a new instance (its counters start again from zero).
    """
    return {
        "service.name": service_name,
        "service.instance.id": str(uuid.uuid4()),
        "host.name": socket.gethostname(),
        "process.pid": os.getpid(),
    }


class OTLPExport(Service):
    """
    The OTLP/HTTP exporters' providers: their export threads are the SDK's
    own; shutting them down (a last flush over HTTP) runs in C{in_thread}
    so the reactor does not wait on the collector.
    """

    def __init__(self, endpoint: str, service_name: str, in_thread: Any) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(resource_attributes(service_name))
        # Shut down by stopService (in a thread), not again at exit.
        self.meter_provider = MeterProvider(
            resource=resource, shutdown_on_exit=False,
            metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"))],
        )
        self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
        self.telemetry = GenAITelemetry(self.meter_provider, self.tracer_provider)
        self._in_thread = in_thread

    def stopService(self) -> Any:
        super().stopService()
        return self._in_thread(self._shutdown)

    def _shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

"""
The reactor-thread cost of [otel] per request: L{GenAITelemetry.observe}
(GenAI metrics, the request's span and its attempt spans) on finished
records, with the SDK's batch span processor and a span exporter that
drops everything (the export itself runs in the SDK's thread).

    python bench/otel_spans.py [--n 5000]

Prints microseconds per request for a request served by its first
attempt, and for one retried once (a failed attempt reported first).
Without [otel] none of this runs and nothing of OpenTelemetry is imported
(tests.ops.test_otel.ImportCostTests).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

from llmgate.ops.otel import GenAITelemetry  # noqa: E402


class _Drop(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _rec(i: int, **kw: Any) -> SimpleNamespace:
    rec = SimpleNamespace(
        route="/v1/chat/completions", model="gpt-4o", served_model="gpt-4o-2024-08-06", input_tokens=30,
        output_tokens=200, upstream_id="chatcmpl-x", status=200, request_id=f"r{i}", outcome="completed",
        ts=time.time(), duration_ms=1234.0, streamed=True, ttft_ms=200.0, provider="openai-main",
        upstream_model="gpt-4o", attempt=1, phase=None, parent_request_id=None,
    )
    rec.__dict__.update(kw)
    return rec


def run(n: int, retried: bool) -> float:
    """Mean microseconds per request on this thread."""
    tracer = TracerProvider()
    tracer.add_span_processor(BatchSpanProcessor(_Drop(), max_queue_size=4 * n))
    telemetry = GenAITelemetry(MeterProvider(metric_readers=[InMemoryMetricReader()]), tracer)
    kind = SimpleNamespace(kind="openai")
    recs = [_rec(i, attempt=2 if retried else 1) for i in range(n)]
    exs = [SimpleNamespace(provider=kind, started=100.0, ended=101.234) for _ in range(n)]
    failed = [
        _rec(i, request_id=f"r{i}-1", parent_request_id=f"r{i}", outcome="upstream_error", status=500,
             phase="headers", input_tokens=None, output_tokens=None)
        for i in range(n)
    ]
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for i in range(n):
            if retried:
                telemetry.attempt(failed[i], "openai", 100.0, 100.3)
            telemetry.observe(recs[i], exs[i])
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        gc.enable()
        tracer.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000)
    args = p.parse_args()
    for label, retried in (("served by its first attempt", False), ("retried once", True)):
        best = min(run(args.n, retried) for _ in range(3))
        print(f"{label}: {best:.1f} us per request (best of 3 x {args.n})")


if __name__ == "__main__":
    main()

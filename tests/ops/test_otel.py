"""
OpenTelemetry GenAI metrics and spans (llmgate.ops.otel), the [otel]
settings, and that nothing of OpenTelemetry loads when [otel] is off.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from twisted.trial.unittest import SynchronousTestCase

from llmgate import config as configmod
from llmgate.ops.otel import GenAITelemetry
from tests.fakes import SSE_HEADERS, FakeResponse, Gateway, make_config


class _Records:
    """A ledger stand-in keeping the final records."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def record(self, rec: Any) -> None:
        self.records.append(rec)


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Histogram data points by metric name."""
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
    return out


class GenAITelemetryTests(SynchronousTestCase):
    """Requests through the in-memory gateway give GenAI metrics and spans."""

    def setUp(self) -> None:
        self.reader = InMemoryMetricReader()
        self.spans = InMemorySpanExporter()
        tracer = TracerProvider()
        tracer.add_span_processor(SimpleSpanProcessor(self.spans))
        self.gw = Gateway()
        self.ledger = _Records()
        self.gw.accounting.ledger = self.ledger
        self.gw.accounting.telemetry = GenAITelemetry(MeterProvider(metric_readers=[self.reader]), tracer)

    def stream(self, input_tokens: int, output_tokens: int) -> None:
        gw = self.gw
        gw.post("/v1/chat/completions", {"model": "public-model", "stream": True})
        gw.clock.advance(0.1)
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[-1]["deferred"].callback(r)
        gw.clock.advance(0.2)
        r.send(b'data: {"id":"c1","model":"real-model-2024","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
        gw.clock.advance(0.3)
        r.send(
            b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d}}\n\ndata: [DONE]\n\n'
            % (input_tokens, output_tokens)
        )
        r.end()
        gw.clock.advance(0)

    def test_metrics_attributes_and_token_sums(self) -> None:
        """
        gen_ai.client.token.usage sums per token type equal the ledger's
        sums; TTFT and duration are observed with the operation, provider
        kind, requested and served model.
        """
        self.stream(5, 7)
        self.stream(11, 13)
        got = points(self.reader)
        want = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "public-model",
            "gen_ai.response.model": "real-model-2024",
        }
        sums = {}
        for p in got["gen_ai.client.token.usage"]:
            attrs = dict(p.attributes)
            kind = attrs.pop("gen_ai.token.type")
            self.assertEqual(attrs, want)
            sums[kind] = p.sum
        recs = self.ledger.records
        self.assertEqual(len(recs), 2)
        self.assertEqual(sums, {"input": sum(r.input_tokens for r in recs), "output": sum(r.output_tokens for r in recs)})
        self.assertEqual(sums, {"input": 16, "output": 20})
        [ttft] = got["gen_ai.server.time_to_first_token"]
        self.assertEqual(dict(ttft.attributes), want)
        self.assertEqual(ttft.count, 2)
        self.assertAlmostEqual(ttft.sum, 0.6)
        [dur] = got["gen_ai.server.request.duration"]
        self.assertEqual(dict(dur.attributes), want)
        self.assertAlmostEqual(dur.sum, 1.2)

    def request_spans(self) -> list[Any]:
        """The spans of client requests (attempt spans have a parent)."""
        return [s for s in self.spans.get_finished_spans() if s.parent is None]

    def test_span_per_request(self) -> None:
        """One CLIENT span per request, named "{operation} {model}", with usage and times."""
        self.stream(5, 7)
        [span] = self.request_spans()
        self.assertEqual(span.name, "chat public-model")
        self.assertEqual(span.kind, SpanKind.CLIENT)
        a = span.attributes
        self.assertEqual(
            (a["gen_ai.operation.name"], a["gen_ai.provider.name"], a["gen_ai.request.model"], a["gen_ai.response.model"]),
            ("chat", "openai", "public-model", "real-model-2024"),
        )
        self.assertEqual((a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]), (5, 7))
        self.assertEqual(a["gen_ai.response.id"], "c1")
        self.assertNotIn("error.type", a)
        self.assertEqual(span.status.status_code, StatusCode.UNSET)
        self.assertAlmostEqual((span.end_time - span.start_time) / 1e9, 0.6, places=6)

    def test_failure_has_error_type(self) -> None:
        """An upstream failure's span and duration carry error.type and an error status."""
        gw = self.gw
        gw.post("/v1/messages", {"model": "claude-x", "max_tokens": 5})
        r = FakeResponse(500, {b"content-type": [b"application/json"]})
        gw.http.calls[-1]["deferred"].callback(r)
        r.send(b'{"type":"error","error":{"type":"api_error","message":"boom"}}')
        r.end()
        gw.clock.advance(0)
        [rec] = self.ledger.records
        [span] = self.request_spans()
        self.assertEqual(span.attributes["gen_ai.provider.name"], "anthropic")
        self.assertEqual(span.attributes["error.type"], rec.outcome)
        self.assertEqual(rec.outcome, "upstream_error")
        self.assertEqual(span.status.status_code, StatusCode.ERROR)
        [dur] = points(self.reader)["gen_ai.server.request.duration"]
        self.assertEqual(dur.attributes["error.type"], "upstream_error")

    def test_rejected_request(self) -> None:
        """A request the gateway refuses still gets its span, with error.type "rejected"."""
        self.gw.post("/v1/chat/completions", {"model": "public-model"}, headers={"Content-Type": "text/plain"})
        self.gw.clock.advance(0)
        [rec] = self.ledger.records
        self.assertEqual(rec.outcome, "rejected")
        # No upstream attempt: the request's span alone.
        [span] = self.spans.get_finished_spans()
        self.assertEqual(span.attributes["error.type"], "rejected")


class AttemptSpanTests(SynchronousTestCase):
    """A child span per upstream attempt under the request's span."""

    def setUp(self) -> None:
        from tests.routing.helpers import FixedRng, routed_gateway

        self.spans = InMemorySpanExporter()
        tracer = TracerProvider()
        tracer.add_span_processor(SimpleSpanProcessor(self.spans))
        self.gw = routed_gateway()
        self.gw.resource.rng = FixedRng(0.1)  # a first, then b
        self.telemetry = GenAITelemetry(MeterProvider(metric_readers=[InMemoryMetricReader()]), tracer)
        self.gw.accounting.telemetry = self.telemetry

    def by_parent(self) -> tuple[Any, list[Any]]:
        spans = self.spans.get_finished_spans()
        [top] = [s for s in spans if s.parent is None]
        children = sorted((s for s in spans if s.parent is not None), key=lambda s: s.attributes["llmgate.attempt"])
        for c in children:
            self.assertEqual(c.parent.span_id, top.context.span_id)
            self.assertEqual(c.context.trace_id, top.context.trace_id)
        return top, children

    def test_retried_request_has_a_span_per_attempt(self) -> None:
        """
        A 500 from a, then b serves: under the request's span, attempt 1 (a,
        gpt-4o-a, upstream_error, 500, error status) and attempt 2 (b,
        gpt-4o-b, completed, its tokens), in order, inside the request's time.
        """
        from tests.routing.helpers import CHAT, DONE, E1, USAGE
        from tests.routing.test_attempts import JSON, answer

        gw = self.gw
        gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(0.25)
        answer(gw, 0, 500, JSON)
        gw.clock.advance(0.5)
        r = answer(gw, 1)
        gw.clock.advance(0.125)
        r.send(E1)
        r.send(USAGE + DONE)
        r.end()
        gw.clock.advance(0)
        top, [first, second] = self.by_parent()
        a, b = first.attributes, second.attributes
        self.assertEqual(first.name, "chat gpt-4o-a")
        self.assertEqual(
            (a["llmgate.attempt"], a["llmgate.provider"], a["gen_ai.provider.name"], a["gen_ai.request.model"],
             a["llmgate.outcome"], a["http.response.status_code"], a["error.type"], a["llmgate.phase"]),
            (1, "a", "openai", "gpt-4o-a", "upstream_error", 500, "upstream_error", "headers"),
        )
        self.assertNotIn("gen_ai.usage.output_tokens", a)
        self.assertEqual(first.status.status_code, StatusCode.ERROR)
        self.assertEqual(first.kind, SpanKind.CLIENT)
        self.assertEqual(second.name, "chat gpt-4o-b")
        self.assertEqual(
            (b["llmgate.attempt"], b["llmgate.provider"], b["gen_ai.request.model"], b["llmgate.outcome"],
             b["http.response.status_code"], b["gen_ai.usage.input_tokens"], b["gen_ai.usage.output_tokens"]),
            (2, "b", "gpt-4o-b", "completed", 200, 3, 1),
        )
        self.assertNotIn("error.type", b)
        self.assertEqual(second.status.status_code, StatusCode.UNSET)
        # Times: the request 0.875 s; attempt 1 its first 0.25 s, attempt 2 the rest.
        self.assertAlmostEqual((top.end_time - top.start_time) / 1e9, 0.875, places=6)
        self.assertEqual(first.start_time, top.start_time)
        self.assertAlmostEqual((first.end_time - first.start_time) / 1e9, 0.25, places=6)
        self.assertEqual(second.start_time, first.end_time)
        self.assertEqual(second.end_time, top.end_time)
        self.assertEqual(self.telemetry._waiting, {})

    def test_single_attempt(self) -> None:
        """A request served at once: one attempt span, attempt 1, with the served model and tokens."""
        from tests.routing.helpers import CHAT, DONE, E1, USAGE
        from tests.routing.test_attempts import answer

        gw = self.gw
        gw.post("/v1/chat/completions", CHAT)
        r = answer(gw, 0)
        r.send(E1)
        r.send(USAGE + DONE)
        r.end()
        gw.clock.advance(0)
        top, [only] = self.by_parent()
        self.assertEqual((only.attributes["llmgate.attempt"], only.attributes["llmgate.provider"]), (1, "a"))
        self.assertEqual((only.start_time, only.end_time), (top.start_time, top.end_time))

    def test_attempt_reported_after_its_request(self) -> None:
        """
        An attempt reported once its request has ended (a hedge lost and
        recorded late) still gets its span under the request's, at once;
        one whose request is unknown waits, bounded.
        """
        from llmgate.ops import otel
        from tests.routing.helpers import CHAT, DONE, E1, USAGE
        from tests.routing.test_attempts import answer

        gw = self.gw
        gw.post("/v1/chat/completions", CHAT)
        r = answer(gw, 0)
        r.send(E1)
        r.send(USAGE + DONE)
        r.end()
        gw.clock.advance(0)
        top, [served] = self.by_parent()
        [final] = gw.accounting.exchanges
        lost = dataclasses.replace(
            gw.accounting.ledger.records[-1], request_id=final.request_id + "-2",
            parent_request_id=final.request_id, attempt=2, outcome="hedge_lost", status=0,
        )
        self.telemetry.attempt(lost, "openai", final.started, final.started + 0.5)
        top2, [_, late] = self.by_parent()
        self.assertEqual(top2.context.span_id, top.context.span_id)
        self.assertEqual((late.attributes["llmgate.outcome"], late.attributes["error.type"]), ("hedge_lost", "hedge_lost"))
        self.assertEqual(late.start_time, top.start_time)
        self.patch(otel, "MAX_WAITING", 2)
        for i in range(3):
            self.telemetry.attempt(dataclasses.replace(lost, parent_request_id=f"unknown-{i}"), "openai", 0.0, 1.0)
        self.assertEqual(list(self.telemetry._waiting), ["unknown-1", "unknown-2"])


class ResourceTests(SynchronousTestCase):
    """The exported resource names the process."""

    def test_instance_id_per_process_start(self) -> None:
        """
        service.instance.id is a UUID of its own each time an exporter is
        set up (each worker, each restart), beside the service name, host
        name and pid.
        """
        import socket
        import uuid

        from llmgate.ops.otel import resource_attributes

        a, b = resource_attributes("gw"), resource_attributes("gw")
        self.assertNotEqual(a["service.instance.id"], b["service.instance.id"])
        self.assertEqual(uuid.UUID(a["service.instance.id"]).version, 4)
        self.assertEqual(
            {k: v for k, v in a.items() if k != "service.instance.id"},
            {"service.name": "gw", "host.name": socket.gethostname(), "process.pid": os.getpid()},
        )


class OtelConfigTests(SynchronousTestCase):
    """[otel] in config.parse, the one path check-config uses too."""

    def test_off_by_default(self) -> None:
        """No [otel] table: telemetry is off."""
        self.assertIsNone(make_config().otel_endpoint)

    def test_endpoint_and_service(self) -> None:
        """endpoint (trailing slash dropped) and service_name are read."""
        cfg = make_config(otel={"endpoint": "http://127.0.0.1:4318/", "service_name": "gw-1"})
        self.assertEqual((cfg.otel_endpoint, cfg.otel_service_name), ("http://127.0.0.1:4318", "gw-1"))

    def test_bad_settings(self) -> None:
        """Unknown keys, a missing endpoint, a non-http URL are errors naming the setting."""
        for table, where in (
            ({"endpoint": "http://x:4318", "port": 1}, "otel.port"),
            ({"service_name": "x"}, "otel.endpoint"),
            ({"endpoint": "grpc://x:4317"}, "otel.endpoint"),
        ):
            with self.assertRaises(configmod.ConfigError) as e:
                make_config(otel=table)
            self.assertIn(where, str(e.exception))

    def test_not_installed(self) -> None:
        """Configured without the packages: an error saying to pip install llmgate[otel]."""
        import importlib.util

        real = importlib.util.find_spec
        self.patch(importlib.util, "find_spec", lambda name, *a: None if name.startswith("opentelemetry") else real(name, *a))
        with self.assertRaises(configmod.ConfigError) as e:
            make_config(otel={"endpoint": "http://127.0.0.1:4318"})
        self.assertIn("pip install 'llmgate[otel]'", str(e.exception))


_MAKE_SERVICE = textwrap.dedent(
    """
    import json, sys
    from twisted.internet.testing import MemoryReactorClock
    from llmgate import config, tap
    o = tap.Options()
    o["loaded"] = config.parse(json.loads(sys.argv[1]), {})
    o["demo"] = False
    o["ports"] = ["tcp:0"]
    tap.tokens.load_encodings = lambda: None
    tap._tune_gc = lambda tree: None
    svc = tap.makeService(o, reactor=MemoryReactorClock())
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")))
    """
)


class ImportCostTests(SynchronousTestCase):
    """Off means not imported: makeService without [otel] loads no opentelemetry module."""

    def modules(self, doc: dict[str, Any]) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", _MAKE_SERVICE, json.dumps(doc)],
            capture_output=True, text=True, timeout=120, cwd=os.getcwd(),
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))},
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def test_off_imports_nothing(self) -> None:
        """Without [otel], no opentelemetry module is in sys.modules after makeService."""
        self.assertEqual(self.modules({}), [])

    def test_on_imports_sdk(self) -> None:
        """With [otel], the SDK and the exporter are loaded (the check above can fail)."""
        got = self.modules({"otel": {"endpoint": "http://127.0.0.1:9"}})
        self.assertIn("opentelemetry.sdk.trace", got)
        self.assertIn("opentelemetry.exporter.otlp.proto.http.trace_exporter", got)

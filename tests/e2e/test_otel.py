"""
End to end: a gateway with [otel] exports its GenAI spans and metrics over
OTLP/HTTP (protobuf) to a collector on 127.0.0.1, and the token sums it
exports equal the ledger's.
"""

from __future__ import annotations

import os
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from tests.e2e.procs import Daemon, gateway_config


class _Collector(BaseHTTPRequestHandler):
    """Keeps each POST's path, content type and body; answers 200 as OTLP/HTTP does."""

    got: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.got.append((self.path, self.headers.get("content-type", ""), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a: Any) -> None:
        pass


def _attrs(kvs: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value"))
    return out


def _capture(test: SynchronousTestCase) -> tuple[list[tuple[str, str, bytes]], int]:
    """An OTLP/HTTP capture on 127.0.0.1 for C{test}: what it got, and its port."""
    got: list[tuple[str, str, bytes]] = []
    handler = type("H", (_Collector,), {"got": got})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    return got, server.server_address[1]


class OTLPExportTests(SynchronousTestCase):

    def test_instance_per_worker(self) -> None:
        """
        --workers 2, both workers serving: every export names its process
        by service.instance.id, one id per worker pid and a different one
        for each, so a collector keeps the workers' cumulative metrics apart.
        """
        from tests.e2e.test_workers import _finite_stream, _owners, _wait
        from tests.e2e.test_kill import GATEWAY_KEY, _wait_for_event

        got, port = _capture(self)
        tmp = tempfile.mkdtemp()
        mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], tmp)
        self.addCleanup(mock.stop)
        ledger = os.path.join(tmp, "usage.db")
        conf = os.path.join(tmp, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(gateway_config(
                mock.port,
                f'[ledger]\npath = "{ledger}"\n[keys.team-e2e]\napi_key_env = "E2E_GW_KEY"\n'
                f'[otel]\nendpoint = "http://127.0.0.1:{port}"\nservice_name = "gw-e2e"\n',
            ))
        gw = Daemon("llmgate", ["--config", conf, "--workers", "2", "--port", "tcp:0:interface=127.0.0.1"], tmp,
                    env={"E2E_UPSTREAM_KEY": "k", "E2E_GW_KEY": GATEWAY_KEY})
        self.addCleanup(gw.stop)
        pids = {gw.wait_for(rf"worker {i} \(pid (\d+)\) is serving").group(1) for i in (0, 1)}
        # Streams held open until both workers relay some (the kernel picks who accepts).
        socks = []
        for _ in range(60):
            s = _finite_stream(gw.port, tokens=20, delay_ms=50)
            self.addCleanup(s.close)
            _wait_for_event(s)
            socks.append(s)
            rows = _wait(lambda: _owners(ledger) if len(_owners(ledger)) == len(socks) else None, "open rows")
            if len({owner for _, owner in rows.values()}) == 2:
                break
        for s in socks:
            while s.recv(65536):
                pass
        _wait(lambda: all(o == "completed" for o, _ in _owners(ledger).values()), "the streams' records")
        gw.stop()
        self.assertEqual({owner for _, owner in _owners(ledger).values()}, pids)

        by_pid: dict[int, set[str]] = {}
        for path, _, body in got:
            cls = ExportTraceServiceRequest if path == "/v1/traces" else ExportMetricsServiceRequest
            req = cls.FromString(body)
            for r in getattr(req, "resource_spans", None) or req.resource_metrics:
                a = _attrs(r.resource.attributes)
                self.assertEqual(a["service.name"], "gw-e2e")
                by_pid.setdefault(a["process.pid"], set()).add(a["service.instance.id"])
        self.assertEqual(set(map(str, by_pid)), pids)
        self.assertEqual([len(ids) for ids in by_pid.values()], [1, 1])
        self.assertEqual(len(set.union(*by_pid.values())), 2)

    def test_spans_and_metrics_reach_the_collector(self) -> None:
        """
        Two chat requests: the collector receives protobuf traces with two
        "chat public-name" CLIENT spans under the configured service name,
        and gen_ai.client.token.usage whose sums equal the ledger's.
        """
        got: list[tuple[str, str, bytes]] = []
        handler = type("H", (_Collector,), {"got": got})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)

        tmp = tempfile.mkdtemp()
        mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], tmp)
        self.addCleanup(mock.stop)
        ledger = os.path.join(tmp, "usage.db")
        conf = os.path.join(tmp, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(gateway_config(
                mock.port,
                f'[ledger]\npath = "{ledger}"\n'
                f'[otel]\nendpoint = "http://127.0.0.1:{server.server_address[1]}"\nservice_name = "gw-e2e"\n',
            ))
        gw = Daemon("llmgate", ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"], tmp,
                    env={"E2E_UPSTREAM_KEY": "k"})
        self.addCleanup(gw.stop)
        oai = openai.OpenAI(base_url=gw.url("/v1"), api_key="unused", max_retries=0, timeout=20)
        msgs = [{"role": "user", "content": "hello there"}]
        list(oai.chat.completions.create(model="public-name", messages=msgs, stream=True))
        oai.chat.completions.create(model="public-name", messages=msgs)
        # Shutting down flushes both exporters.
        gw.stop()
        records = read_records(ledger)
        self.assertEqual(len(records), 2)

        spans = []
        tokens: dict[str, int] = {}
        for path, ctype, body in got:
            self.assertEqual(ctype, "application/x-protobuf")
            if path == "/v1/traces":
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    self.assertEqual(_attrs(rs.resource.attributes)["service.name"], "gw-e2e")
                    for ss in rs.scope_spans:
                        spans.extend(ss.spans)
            elif path == "/v1/metrics":
                req = ExportMetricsServiceRequest.FromString(body)
                for rm in req.resource_metrics:
                    for sm in rm.scope_metrics:
                        for m in sm.metrics:
                            if m.name == "gen_ai.client.token.usage":
                                for p in m.histogram.data_points:
                                    t = _attrs(p.attributes)["gen_ai.token.type"]
                                    tokens[t] = tokens.get(t, 0) + int(p.sum)
            else:
                self.fail(f"unexpected path {path}")
        requests = [s for s in spans if not s.parent_span_id]
        self.assertEqual([s.name for s in requests], ["chat public-name"] * 2)
        # One attempt each, under its request.
        self.assertEqual([s.name for s in spans if s.parent_span_id], ["chat upstream-name"] * 2)
        self.assertEqual({s.kind for s in spans}, {3})  # SPAN_KIND_CLIENT
        self.assertEqual(
            tokens,
            {"input": sum(r["input_tokens"] for r in records), "output": sum(r["output_tokens"] for r in records)},
        )
        self.assertGreater(tokens["output"], 0)


class AttemptSpansTests(SynchronousTestCase):
    def test_retried_request_shows_each_attempt(self) -> None:
        """
        A request whose first deployment answers 500 and whose fallback
        serves: the collector gets the request's span and, under it in the
        same trace, one span per attempt (bad: 500, upstream_error; good:
        200, completed, the ledger's tokens), in order.
        """
        from tests.e2e.test_routing import KEY, provider

        got, port = _capture(self)
        tmp = tempfile.mkdtemp()
        good = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], tmp)
        self.addCleanup(good.stop)
        bad = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1", "--fault", "status-500"], tmp)
        self.addCleanup(bad.stop)
        ledger = os.path.join(tmp, "usage.db")
        conf = os.path.join(tmp, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(
                provider("good", good.port) + provider("bad", bad.port)
                + '[models."gpt-4o"]\ndeployments = [{provider = "bad", upstream_model = "gpt-4o-bad"}]\n'
                'fallbacks = ["gpt-4o-mini"]\n'
                '[models."gpt-4o-mini"]\nprovider = "good"\nupstream_model = "mini-good"\n'
                f'[ledger]\npath = "{ledger}"\n'
                f'[otel]\nendpoint = "http://127.0.0.1:{port}"\n'
            )
        gw = Daemon("llmgate", ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"], tmp,
                    env={"E2E_UPSTREAM_KEY": KEY})
        self.addCleanup(gw.stop)
        oai = openai.OpenAI(base_url=gw.url("/v1"), api_key="unused", max_retries=0, timeout=20)
        list(oai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_headers={"x-mock-tokens": "5"},
        ))
        gw.stop()
        [served] = [r for r in read_records(ledger) if not r["parent_request_id"]]

        spans = []
        for path, _, body in got:
            if path == "/v1/traces":
                for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                    for ss in rs.scope_spans:
                        spans.extend(ss.spans)
        [top] = [s for s in spans if not s.parent_span_id]
        self.assertEqual(_attrs(top.attributes)["llmgate.request_id"], served["request_id"])
        attempts = sorted((s for s in spans if s.parent_span_id), key=lambda s: s.start_time_unix_nano)
        self.assertEqual({(s.parent_span_id, s.trace_id) for s in attempts}, {(top.span_id, top.trace_id)})
        got_attrs = [_attrs(s.attributes) for s in attempts]
        self.assertEqual(
            [(a["llmgate.attempt"], a["llmgate.provider"], a["gen_ai.request.model"], a["http.response.status_code"],
              a["llmgate.outcome"], a.get("gen_ai.usage.output_tokens")) for a in got_attrs],
            [(1, "bad", "gpt-4o-bad", 500, "upstream_error", None), (2, "good", "mini-good", 200, "completed", 5)],
        )
        self.assertEqual(served["output_tokens"], 5)
        self.assertEqual([s.name for s in attempts], ["chat gpt-4o-bad", "chat mini-good"])
        self.assertEqual([s.status.code for s in attempts], [2, 0])  # STATUS_CODE_ERROR, UNSET
        self.assertLessEqual(attempts[0].end_time_unix_nano, attempts[1].start_time_unix_nano)
        self.assertGreaterEqual(attempts[0].start_time_unix_nano, top.start_time_unix_nano)
        self.assertEqual(attempts[1].end_time_unix_nano, top.end_time_unix_nano)

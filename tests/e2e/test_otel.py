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


class OTLPExportTests(SynchronousTestCase):
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
        self.assertEqual([s.name for s in spans], ["chat public-name"] * 2)
        self.assertEqual({s.kind for s in spans}, {3})  # SPAN_KIND_CLIENT
        self.assertEqual(
            tokens,
            {"input": sum(r["input_tokens"] for r in records), "output": sum(r["output_tokens"] for r in records)},
        )
        self.assertGreater(tokens["output"], 0)

"""
End to end, real sockets on 127.0.0.1: a connection the gateway closed to
throw an upstream body away is never reused for the next request.

The mock provider's C{x-mock-fault: html-200} answers a stream request
with a small HTML page, which arrives whole in one read; the gateway
answers 502 and closes that upstream connection. Healthy streams sent at
the same time go over the same upstream pool and must all succeed.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.procs import Daemon, gateway_config
from tests.fakes import parse_response

UPSTREAM_KEY = "sk-e2e-pool-secret"


def stream(port: int, fault: str = "") -> tuple[int, bytes, bool]:
    """One streamed chat completion over a fresh client connection: status, body, complete."""
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    extra = f"x-mock-fault: {fault}\r\n" if fault else ""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nx-mock-tokens: 5\r\n"
            + extra.encode()
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        raw = b""
        while True:
            got = s.recv(65536)
            if not got:
                break
            raw += got
    finally:
        s.close()
    status, _, payload, complete = parse_response(raw)
    return status, payload, complete


class ClosedUpstreamConnectionReuseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmgate-e2e-pool-")
        self.mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], self.dir)
        self.addCleanup(self.mock.stop)
        conf = os.path.join(self.dir, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(gateway_config(self.mock.port, "[ledger]\nenabled = false\n"))
        self.gw = Daemon(
            "llmgate",
            ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"],
            self.dir,
            env={"E2E_UPSTREAM_KEY": UPSTREAM_KEY},
        )
        self.addCleanup(self.gw.stop)

    def test_html_answers_never_cost_a_healthy_stream(self) -> None:
        """
        600 requests, alternating html-200 and healthy streams, 16 at a
        time: every html-200 gets the gateway's 502 and every healthy
        stream a complete 200 (none the 502 "upstream request failed" of a
        request sent on a pooled connection the gateway had closed).
        """
        kinds = ["html-200" if i % 2 else "" for i in range(600)]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda k: (k, stream(self.gw.port, k)), kinds))
        html = [r for k, r in results if k]
        healthy = [r for k, r in results if not k]
        self.assertEqual({status for status, _, _ in html}, {502})
        failed = [(status, body[:120]) for status, body, complete in healthy if status != 200 or not complete]
        self.assertEqual(failed, [], f"{len(failed)} of {len(healthy)} healthy streams failed")
        self.assertTrue(all(body.rstrip().endswith(b"data: [DONE]") for _, body, _ in healthy))

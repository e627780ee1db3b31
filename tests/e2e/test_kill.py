# -*- test-case-name: tests.e2e.test_kill -*-
"""
End to end: a real gateway killed with SIGKILL while streams are relaying
leaves one ledger row per request in flight, marked interrupted when it
starts again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from tests.e2e.procs import Daemon, gateway_config

STREAMS = 30
GATEWAY_KEY = "gw-e2e-secret"


def _open_stream(port: int) -> socket.socket:
    body = json.dumps({"model": "public-name", "stream": True, "messages": []}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + GATEWAY_KEY.encode() + b"\r\n"
        # 2000 tokens 50 ms apart: relaying for 100 s, far beyond the test.
        b"x-mock-tokens: 2000\r\nx-mock-delay-ms: 50\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    return s


def _wait_for_event(s: socket.socket) -> None:
    s.settimeout(20)
    got = b""
    while b"data:" not in got:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError("stream closed before its first event: %r" % (got,))
        got += chunk


class KillNineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmgate-e2e-")

    def gateway(self, conf: str) -> Daemon:
        env = {"E2E_UPSTREAM_KEY": "k", "E2E_GW_KEY": GATEWAY_KEY}
        gw = Daemon("llmgate", ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"], self.dir, env=env)
        self.addCleanup(gw.stop)
        return gw

    def test_streams_in_flight_survive_sigkill_as_interrupted(self) -> None:
        """
        With STREAMS streams relaying, SIGKILL leaves an open row for each
        (with the progress recorded about once a second); the restarted
        gateway marks every one interrupted, keeping its route, key, model
        and provider: exactly one row per request.
        """
        mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], self.dir)
        self.addCleanup(mock.stop)
        ledger = os.path.join(self.dir, "usage.db")
        conf = os.path.join(self.dir, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(gateway_config(
                mock.port,
                f'[ledger]\npath = "{ledger}"\n[keys.team-e2e]\napi_key_env = "E2E_GW_KEY"\n',
            ))
        gw = self.gateway(conf)
        socks = [_open_stream(gw.port) for _ in range(STREAMS)]
        for s in socks:
            self.addCleanup(s.close)
        for s in socks:
            _wait_for_event(s)
        # Every stream is relaying; give the ledger a progress tick (1 s).
        time.sleep(1.5)
        os.kill(gw.pid, signal.SIGKILL)
        self.assertEqual(gw.proc.wait(10), -signal.SIGKILL)

        left = read_records(ledger)
        self.assertEqual([r["outcome"] for r in left], ["open"] * STREAMS)

        again = self.gateway(conf)
        again.wait_for(r"marked interrupted")
        rows = read_records(ledger)
        self.assertEqual(len(rows), STREAMS)
        self.assertEqual(len({r["request_id"] for r in rows}), STREAMS)
        self.assertEqual({r["request_id"] for r in rows}, {r["request_id"] for r in left})
        for r in rows:
            self.assertEqual(
                (r["outcome"], r["phase"], r["route"], r["key_name"], r["model"], r["upstream_model"], r["provider"], r["streamed"], r["status"]),
                ("interrupted", "body", "/v1/chat/completions", "team-e2e", "public-name", "upstream-name", "mock", True, 200),
            )
            self.assertGreater(r["bytes_out"], 0)
            self.assertGreater(r["output_tokens"], 0)
            self.assertEqual(r["source"], "estimated")
        self.assertIn(f"{STREAMS} requests were in flight", again.output())
        self.assertNotIn(GATEWAY_KEY, again.output())

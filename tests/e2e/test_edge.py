"""
End to end against a real twistd gateway with gateway keys: clients without
a valid key that announce large bodies are answered before their body is
read, and the process's memory does not grow with what they send.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from typing import Callable

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.procs import Daemon, gateway_config, get_json

CLIENTS = 20
BODY = 8 * 1024 * 1024


def _head(length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )


def _read_all(s: socket.socket) -> bytes:
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except OSError:
        pass
    return got


def _peak_rss_kb(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _in_threads(n: int, client: Callable[[], bytes]) -> list[bytes]:
    results: list[bytes] = [b""] * n

    def run(i: int) -> None:
        try:
            results[i] = client()
        except OSError as e:
            results[i] = repr(e).encode()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


class UnauthenticatedUploadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmgate-e2e-")
        conf = os.path.join(self.dir, "llmgate.toml")
        with open(conf, "w") as f:
            # The upstream is never called: nothing here is admitted.
            f.write(gateway_config(9, '[keys.team]\napi_key_env = "E2E_GW_KEY"\n[ledger]\nenabled = false\n'))
        self.gw = Daemon(
            "llmgate",
            ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"],
            self.dir,
            env={"E2E_UPSTREAM_KEY": "k", "E2E_GW_KEY": "gw-secret"},
        )
        self.addCleanup(self.gw.stop)

    def test_answered_before_the_body_and_memory_flat(self) -> None:
        """
        20 clients without a valid key announcing 8 MiB each: those that
        send only their headers get the 401 and the close; those that send
        the whole body before reading still get the 401, and the gateway's
        RSS, and its peak, grow by far less than the 160 MiB they sent.
        """
        get_json(self.gw.url("/healthz"))
        before = self.gw.rss_kb()
        peak_before = _peak_rss_kb(self.gw.pid)

        def polite() -> bytes:
            with socket.create_connection(("127.0.0.1", self.gw.port), timeout=5) as s:
                s.sendall(_head(BODY))
                return _read_all(s)

        for got in _in_threads(CLIENTS, polite):
            self.assertTrue(got.startswith(b"HTTP/1.1 401 "), got[:100])
            self.assertIn(b"Connection: close", got)

        body = b"x" * BODY

        def pushy() -> bytes:
            with socket.create_connection(("127.0.0.1", self.gw.port), timeout=10) as s:
                s.sendall(_head(BODY) + body)
                return _read_all(s)

        for got in _in_threads(CLIENTS, pushy):
            self.assertTrue(got.startswith(b"HTTP/1.1 401 "), got[:100])
        grown_mib = (self.gw.rss_kb() - before) / 1024
        self.assertLess(grown_mib, 32, f"RSS grew by {grown_mib:.0f} MiB")
        # The peak too: a body buffered and freed again leaves RSS flat
        # afterwards but raises the high-water mark.
        peak_mib = (_peak_rss_kb(self.gw.pid) - peak_before) / 1024
        self.assertLess(peak_mib, 32, f"peak RSS grew by {peak_mib:.0f} MiB")
        self.assertEqual(get_json(self.gw.url("/healthz")), {"status": "ok"})

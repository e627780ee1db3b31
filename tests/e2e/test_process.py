"""
End to end, one process set per test: start-up and configuration, the
ledger across a real SIGTERM, cancellation timing against a raw upstream
socket, and memory under backpressure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import anthropic
import openai
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from llmgate.mock.provider import mock_text
from tests.e2e.procs import Daemon, gateway_config, get_json


def _request(port: int, body: dict, headers: str = "") -> socket.socket:  # type: ignore[type-arg]
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + headers.encode()
        + b"Content-Length: %d\r\n\r\n" % len(data)
        + data
    )
    return s


class RawUpstream:
    """
    A one-connection upstream on a raw socket that records when the gateway
    closes its connection.
    """

    def __init__(self, respond: bool) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.respond = respond
        self.got_request = threading.Event()
        self.closed_at: float | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += conn.recv(65536)
        self.got_request.set()
        if self.respond:
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            ev = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":" hi"}}]}\n\n'
            conn.sendall(b"%x\r\n%s\r\n" % (len(ev), ev))
        conn.settimeout(10)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        self.closed_at = time.monotonic()
        conn.close()
        self.sock.close()


class ProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmgate-e2e-")

    def daemon(self, plugin: str, *args: str, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(plugin, [*args, "--port", "tcp:0:interface=127.0.0.1"], self.dir, env=env)
        self.addCleanup(d.stop)
        return d

    def config(self, text: str) -> str:
        path = os.path.join(self.dir, "llmgate.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def stack_with_ledger(self) -> tuple[Daemon, str]:
        """A mock provider and a gateway writing its ledger in the test's directory."""
        mock = self.daemon("llmgate-mock")
        ledger = os.path.join(self.dir, "usage.db")
        conf = self.config(gateway_config(mock.port, f'[ledger]\npath = "{ledger}"\n'))
        gw = Daemon("llmgate", ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"], self.dir, env={"E2E_UPSTREAM_KEY": "k"})
        self.addCleanup(gw.stop)
        return gw, ledger

    def test_demo_serves_with_no_keys(self) -> None:
        """--demo streams a completion with no keys and no network."""
        gw = self.daemon("llmgate", "--demo")
        client = openai.OpenAI(base_url=gw.url("/v1"), api_key="none", max_retries=0)
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model="gpt-4o-mini", messages=[], stream=True)
        )
        self.assertEqual(text, mock_text(16))
        m = anthropic.Anthropic(base_url=gw.url(), api_key="none", max_retries=0).messages.create(
            model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
        self.assertEqual(m.content[0].text, mock_text(16))

    def test_bad_config_exits_before_listening(self) -> None:
        """
        An invalid config stops twistd with a non-zero status and one line
        naming the setting, before it listens.
        """
        path = self.config('[providers.p]\nkind = "openai"\napi_key_env = "LLMGATE_E2E_UNSET"\n')
        d = Daemon("llmgate", ["--config", path, "--port", "tcp:0"], self.dir, wait=False)
        self.assertNotEqual(d.proc.wait(30), 0)
        d.stop()
        out = d.output()
        self.assertIn("providers.p.api_key_env", out)
        self.assertIn("LLMGATE_E2E_UNSET", out)
        self.assertNotIn("starting on", out)

    def test_check_config(self) -> None:
        """llmgate check-config accepts a good file and names a bad setting."""
        good = self.config('[providers.p]\nkind = "openai"\n')
        run = [sys.executable, "-m", "llmgate.cli", "check-config"]
        ok = subprocess.run(run + [good], capture_output=True, text=True, timeout=60)
        self.assertEqual(ok.returncode, 0, ok.stderr)
        bad = self.config('[providers.p]\nkind = "gemini"\n')
        no = subprocess.run(run + [bad], capture_output=True, text=True, timeout=60)
        self.assertEqual(no.returncode, 1)
        self.assertIn("providers.p.kind", no.stderr)

    def test_ledger_survives_sigterm_with_exact_usage(self) -> None:
        """
        Fixture streams through real processes: the client gets the bytes,
        and after SIGTERM the ledger holds one record per request with the
        usage the fixtures declare.
        """
        gw, ledger = self.stack_with_ledger()
        oai = openai.OpenAI(base_url=gw.url("/v1"), api_key="c", max_retries=0)
        chunks = list(
            oai.chat.completions.create(
                model="gpt-4o",
                messages=[],
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-mock-fixture": "openai_chat_stream.sse"},
            )
        )
        self.assertEqual(chunks[-1].usage.completion_tokens, 17)
        ant = anthropic.Anthropic(base_url=gw.url(), api_key="c", max_retries=0)
        with ant.messages.stream(
            model="claude-sonnet-4", max_tokens=5, messages=[], extra_headers={"x-mock-fixture": "anthropic_messages_stream.sse"}
        ) as s:
            final = s.get_final_message()
        self.assertEqual(final.usage.output_tokens, 48)
        # twistd re-raises the signal that stopped it after a clean shutdown,
        # so systemd sees a SIGTERM exit (which it counts as success).
        self.assertEqual(gw.stop(), -signal.SIGTERM)
        self.assertIn("Server Shut Down", gw.output())
        recs = sorted(read_records(ledger), key=lambda r: r["route"])
        self.assertEqual(len(recs), 2)
        chat, msg = recs
        self.assertEqual((chat["input_tokens"], chat["output_tokens"], chat["source"]), (24, 17, "reported"))
        self.assertEqual((msg["input_tokens"], msg["output_tokens"], msg["cache_creation_tokens"]), (1573, 48, 1536))
        self.assertTrue(all(r["outcome"] == "completed" for r in recs))

    def cancel_latency(self, respond: bool) -> float:
        up = RawUpstream(respond)
        conf = self.config(f'[providers.raw]\nkind = "openai"\nbase_url = "http://127.0.0.1:{up.port}/v1"\ndefault = true\n')
        gw = self.daemon("llmgate", "--config", conf)
        s = _request(gw.port, {"model": "m", "stream": True, "messages": []})
        self.assertTrue(up.got_request.wait(10))
        if respond:
            got = b""
            while b"data:" not in got:
                got += s.recv(65536)
        else:
            time.sleep(0.2)  # the gateway is now waiting for upstream headers
        s.close()
        t0 = time.monotonic()
        up.thread.join(10)
        assert up.closed_at is not None
        return up.closed_at - t0

    def test_cancel_mid_stream_reaches_upstream_in_100ms(self) -> None:
        """A client leaving mid-stream closes the upstream socket within 100 ms."""
        self.assertLess(self.cancel_latency(respond=True), 0.1)

    def test_cancel_before_headers_reaches_upstream_in_100ms(self) -> None:
        """
        A client leaving while the upstream has not answered yet closes the
        upstream socket within 100 ms.
        """
        self.assertLess(self.cancel_latency(respond=False), 0.1)

    def test_backpressure_keeps_memory_flat(self) -> None:
        """
        A fast upstream sending 50 MB to a client that does not read does
        not grow the gateway by more than a few MB: the upstream is paused.
        """
        mock = self.daemon("llmgate-mock")
        conf = self.config(gateway_config(mock.port))
        gw = self.daemon("llmgate", "--config", conf, env={"E2E_UPSTREAM_KEY": "k"})
        # Warm up the code paths so their one-off allocations are counted out.
        openai.OpenAI(base_url=gw.url("/v1"), api_key="c").chat.completions.create(model="m", messages=[])
        before = gw.rss_kb()
        s = _request(gw.port, {"model": "m", "stream": True, "messages": []}, "x-mock-bytes: 50000000\r\n")
        got = b""
        while b"data:" not in got:
            chunk = s.recv(4096)
            self.assertTrue(chunk, "connection closed before the first event")
            got += chunk
        time.sleep(3)  # far longer than the mock needs to send 50 MB unpaused
        grown_mb = (gw.rss_kb() - before) / 1024
        stats = get_json(mock.url("/mock/stats"))
        s.close()
        self.assertLess(grown_mb, 8, f"gateway grew by {grown_mb:.1f} MB")
        self.assertEqual(stats["streams_completed"], 0)

    def test_sigterm_lets_streams_in_flight_finish(self) -> None:
        """
        SIGTERM with a stream in flight: the listener closes, the stream
        completes byte-exact, and its record reaches the ledger.
        """
        gw, ledger = self.stack_with_ledger()
        oai = openai.OpenAI(base_url=gw.url("/v1"), api_key="c", max_retries=0)
        stream = oai.chat.completions.create(
            model="m", messages=[], stream=True, extra_headers={"x-mock-tokens": "20", "x-mock-delay-ms": "50"}
        )
        text = ""
        for i, chunk in enumerate(stream):
            if i == 2:
                os.kill(gw.pid, signal.SIGTERM)
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        self.assertEqual(text, mock_text(20))
        gw.proc.wait(30)
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", gw.port), timeout=2)
        [rec] = read_records(ledger)
        self.assertEqual((rec["outcome"], rec["output_tokens"]), ("completed", 20))

    def test_every_fixture_through_the_gateway_into_the_ledger(self) -> None:
        """
        Every provider fixture, replayed by the mock in small random slices
        through the real gateway, reaches the client byte for byte (streams)
        and leaves the usage its README declares in the ledger, reported:
        completed, or an upstream error for a stream whose error chunk
        carries the billed usage.
        """
        from tests.accounting.test_recorder import BODIES, ERROR_STREAMS, STREAMS, fixture

        gw, ledger = self.stack_with_ledger()
        expected = {}
        outcomes = {}
        for name, route, body, want in STREAMS + ERROR_STREAMS + BODIES:
            outcomes[want] = "upstream_error" if (name, route, body, want) in ERROR_STREAMS else "completed"
            data = json.dumps(body).encode()
            s = socket.create_connection(("127.0.0.1", gw.port))
            s.sendall(
                f"POST {route} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                f"x-mock-fixture: {name}\r\nConnection: close\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            raw = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                raw += chunk
            s.close()
            head, _, rest = raw.partition(b"\r\n\r\n")
            self.assertIn(b" 200 ", head.split(b"\r\n")[0], name)
            if name.endswith(".sse"):
                relayed = b""
                while rest:
                    size, _, rest = rest.partition(b"\r\n")
                    n = int(size, 16)
                    if n == 0:
                        break
                    relayed += rest[:n]
                    rest = rest[n + 2:]
                self.assertEqual(relayed, fixture(name), name)
            expected[route, body["model"], name] = want
        gw.stop()
        recs = read_records(ledger)
        self.assertEqual(len(recs), len(expected))
        got = sorted(
            (r["input_tokens"], r["output_tokens"], r["cached_input_tokens"], r["cache_creation_tokens"], r["reasoning_tokens"])
            for r in recs
        )
        self.assertEqual(got, sorted(expected.values()))
        got_outcomes = sorted(
            (r["input_tokens"], r["output_tokens"], r["cached_input_tokens"], r["cache_creation_tokens"], r["reasoning_tokens"], r["source"], r["outcome"])
            for r in recs
        )
        self.assertEqual(got_outcomes, sorted(want + ("reported", outcomes[want]) for want in expected.values()))

"""
End to end against a hostile upstream: a real gateway process in front of
a scripted raw-socket provider on 127.0.0.1 that compresses unasked,
floods response headers, echoes the gateway's key and reads the headers it
is sent. The request's model picks the script.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import tempfile
import threading
import time
import zlib
from typing import Any

import openai
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from tests.e2e.procs import Daemon

UPSTREAM_KEY = "sk-e2e-hostile-Xy7Qk29LmPz"
ORG = "org-HostileOrg42"

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "llmgate", "mock", "fixtures")


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class ScriptedUpstream:
    """
    A provider on a raw socket, one thread per connection, that answers
    by the script named by the request body's model and records what it
    was sent and, for floods, how much it sent and whether the gateway hung
    up on it.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        self.requests: dict[str, dict[bytes, bytes]] = {}
        self.flood: dict[str, tuple[int, bool]] = {}
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                got = conn.recv(65536)
                if not got:
                    return
                buf += got
            head, _, body = buf.partition(b"\r\n\r\n")
            headers: dict[bytes, bytes] = {}
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            n = int(headers.get(b"content-length", b"0"))
            while len(body) < n:
                body += conn.recv(65536)
            model = json.loads(body)["model"]
            self.requests[model] = headers
            getattr(self, "reply_" + model.replace("-", "_"))(conn, model)
        except OSError:
            pass
        finally:
            conn.close()

    def reply_gzip_sse(self, conn: socket.socket, model: str) -> None:
        """The chat fixture as a gzip stream, flushed per event as a streaming server does."""
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        z = zlib.compressobj(wbits=31)
        *events, last = fixture("openai_chat_stream.sse").split(b"\n\n")[:-1]
        for event in events:
            conn.sendall(_chunk(z.compress(event + b"\n\n") + z.flush(zlib.Z_SYNC_FLUSH)))
            time.sleep(0.002)
        # The last event with the gzip trailer and the end of the body.
        conn.sendall(_chunk(z.compress(last + b"\n\n") + z.flush()) + b"0\r\n\r\n")

    def reply_br(self, conn: socket.socket, model: str) -> None:
        body = b"\x1b\x2a\x00\xf8" * 8  # not decodable by the gateway
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: br\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def _flood(self, conn: socket.socket, model: str, piece: bytes, limit: int) -> None:
        """Send header bytes until the gateway hangs up or C{limit} is reached."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        sent = 0
        hung_up = False
        try:
            while sent < limit:
                conn.sendall(piece)
                sent += len(piece)
        except OSError:
            hung_up = True
        if not hung_up:
            # Wait for the gateway to close (or give up).
            try:
                conn.settimeout(5)
                hung_up = conn.recv(1) == b""
            except OSError as e:
                hung_up = not isinstance(e, socket.timeout)
        self.flood[model] = (sent, hung_up)

    def reply_many_headers(self, conn: socket.socket, model: str) -> None:
        # Header after header, up to 64 MB: never a blank line.
        line = b"X-Pad: " + b"a" * 100 + b"\r\n"
        self._flood(conn, model, line * 600, 64 << 20)

    def reply_huge_header(self, conn: socket.socket, model: str) -> None:
        # One 1 MB header line.
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Huge: ")
        self._flood(conn, model, b"b" * 65536, 1 << 20)

    def reply_echo_key(self, conn: socket.socket, model: str) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": f"Incorrect API key provided: {UPSTREAM_KEY} for organization {ORG}.",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            }
        ).encode()
        conn.sendall(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            + f"X-Echo-Authorization: Bearer {UPSTREAM_KEY}\r\nOpenAI-Organization: {ORG}\r\n".encode()
            + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def reply_record(self, conn: socket.socket, model: str) -> None:
        body = json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        ).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: X-Upstream-Hop\r\n"
            b"X-Upstream-Hop: 1\r\nLocation: http://provider.internal/x\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )


class _Stack:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmgate-e2e-hostile-")
        self.up = ScriptedUpstream()
        self.ledger = os.path.join(self.dir, "usage.db")
        conf = os.path.join(self.dir, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(
                "[providers.hostile]\n"
                'kind = "openai"\n'
                f'base_url = "http://127.0.0.1:{self.up.port}/v1"\n'
                'api_key_env = "E2E_HOSTILE_KEY"\n'
                "default = true\n"
                "[providers.hostileant]\n"
                'kind = "anthropic"\n'
                f'base_url = "http://127.0.0.1:{self.up.port}"\n'
                'api_key_env = "E2E_HOSTILE_KEY"\n'
                "default = true\n"
                f'[ledger]\npath = "{self.ledger}"\n'
            )
        self.gw = Daemon(
            "llmgate",
            ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"],
            self.dir,
            env={"E2E_HOSTILE_KEY": UPSTREAM_KEY},
        )

    def stop(self) -> None:
        self.gw.stop()
        self.up.sock.close()


_shared: list[_Stack] = []


def shared_stack() -> _Stack:
    if not _shared:
        _shared.append(_Stack())
        atexit.register(_shared[0].stop)
    return _shared[0]


def post(port: int, path: str, body: dict[str, Any], headers: str = "", timeout: float = 15) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """A raw HTTP/1.1 request read to the close; status, headers, de-chunked body."""
    from tests.fakes import parse_response

    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\n{headers}"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    raw = b""
    while True:
        got = s.recv(65536)
        if not got:
            break
        raw += got
    s.close()
    status, hdrs, payload, _ = parse_response(raw)
    return status, hdrs, payload


def peak_rss_kb(pid: int) -> int:
    """The process's peak resident size (VmHWM): what a flood cost at its height."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def ledger_record(path: str, model: str, timeout: float = 10) -> list[dict[str, Any]]:
    """The final ledger records of C{model} (not rows still open), once there is at least one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            recs = [r for r in read_records(path) if r["model"] == model and r["outcome"] != "open"]
        except FileNotFoundError:  # no record written yet
            recs = []
        if recs or time.monotonic() > deadline:
            return recs
        time.sleep(0.1)


class HostileUpstreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stack = shared_stack()
        self.gw = self.stack.gw
        self.up = self.stack.up

    def test_gzip_stream_reaches_client_plain_and_ledger_counts_it(self) -> None:
        """
        An upstream that gzips its event stream unasked: the SDK gets plain
        events with the text and usage, and the ledger has the reported
        tokens (not 0).
        """
        oai = openai.OpenAI(base_url=self.gw.url("/v1"), api_key="c", max_retries=0, timeout=20)
        chunks = list(
            oai.chat.completions.create(
                model="gzip-sse", messages=[], stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertTrue(text.startswith("Lighthouse keepers"), text)
        self.assertEqual(chunks[-1].usage.completion_tokens, 17)
        self.assertEqual(self.up.requests["gzip-sse"][b"accept-encoding"], b"identity")
        [rec] = ledger_record(self.stack.ledger, "gzip-sse")
        self.assertEqual((rec["outcome"], rec["input_tokens"], rec["output_tokens"]), ("completed", 24, 17))

    def test_brotli_is_502_in_dialect(self) -> None:
        """
        A br-encoded body is refused with a 502 in the client's dialect
        (OpenAI and Anthropic), recorded as an upstream error.
        """
        status, headers, body = post(self.gw.port, "/v1/chat/completions", {"model": "br", "stream": True, "messages": []})
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"]["type"], "upstream_error")
        self.assertNotIn(b"content-encoding", headers)
        status, _, body = post(self.gw.port, "/v1/messages", {"model": "br", "max_tokens": 5, "stream": True, "messages": []})
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["type"], "error")
        recs = ledger_record(self.stack.ledger, "br")
        self.assertTrue(recs and all(r["outcome"] == "upstream_error" and r["status"] == 502 for r in recs), recs)

    def check_flood(self, model: str, path: str = "/v1/chat/completions") -> tuple[int, str]:
        before = peak_rss_kb(self.gw.pid)
        t0 = time.monotonic()
        status, _, body = post(self.gw.port, path, {"model": model, "stream": True, "messages": [], "max_tokens": 5})
        elapsed = time.monotonic() - t0
        grown_mb = (peak_rss_kb(self.gw.pid) - before) / 1024
        self.assertEqual(status, 502, body)
        self.assertLess(elapsed, 2.0)
        self.assertLess(grown_mb, 8, f"gateway grew by {grown_mb:.1f} MB")
        for _ in range(100):
            if model in self.up.flood:
                break
            time.sleep(0.05)
        sent, hung_up = self.up.flood[model]
        self.assertTrue(hung_up, "the gateway kept the upstream connection open")
        # What the kernel buffers on loopback before a close is seen, not 64 MB.
        self.assertLess(sent, 16 << 20)
        [rec] = ledger_record(self.stack.ledger, model)
        self.assertEqual((rec["outcome"], rec["status"]), ("upstream_error", 502))
        return status, body.decode()

    def test_endless_headers_are_502_promptly(self) -> None:
        """
        An upstream sending header after header: 502 in dialect within 2 s,
        the upstream connection closed, the gateway not grown, one record.
        """
        _, body = self.check_flood("many-headers")
        self.assertIn("headers too large", body)

    def test_one_megabyte_header_is_502_promptly(self) -> None:
        """The same for a single 1 MB header line, on the Anthropic route."""
        _, body = self.check_flood("huge-header", "/v1/messages")
        err = json.loads(body)
        self.assertEqual(err["type"], "error")
        self.assertIn("headers too large", err["error"]["message"])

    def test_echoed_key_and_org_are_redacted(self) -> None:
        """
        An upstream 400 quoting the gateway's key and organization in its
        body and a header: the client sees the error, without either.
        """
        status, headers, body = post(self.gw.port, "/v1/chat/completions", {"model": "echo-key", "messages": []})
        self.assertEqual(status, 400)
        raw = body + b"".join(v for vs in headers.values() for v in vs)
        self.assertNotIn(UPSTREAM_KEY.encode(), raw)
        self.assertNotIn(ORG.encode(), raw)
        self.assertNotIn(b"Xy7Qk29LmPz", raw)
        self.assertEqual(
            json.loads(body)["error"]["message"], "Incorrect API key provided: [redacted] for organization [redacted]."
        )
        self.assertEqual(headers[b"x-echo-authorization"], [b"Bearer [redacted]"])

    def test_client_billing_headers_never_reach_upstream(self) -> None:
        """
        The client's OpenAI-Organization and OpenAI-Project are not sent to
        the provider; the upstream's Location and the headers its Connection
        header names are not relayed back.
        """
        status, headers, _ = post(
            self.gw.port,
            "/v1/chat/completions",
            {"model": "record", "messages": []},
            "OpenAI-Organization: org-ClientChosen\r\nOpenAI-Project: proj_ClientChosen1\r\nAccept-Encoding: gzip\r\n",
        )
        self.assertEqual(status, 200)
        sent = self.up.requests["record"]
        self.assertNotIn(b"openai-organization", sent)
        self.assertNotIn(b"openai-project", sent)
        self.assertEqual(sent[b"accept-encoding"], b"identity")
        self.assertEqual(sent[b"authorization"], f"Bearer {UPSTREAM_KEY}".encode())
        self.assertNotIn(b"location", headers)
        self.assertNotIn(b"x-upstream-hop", headers)

"""
The edge over real sockets on 127.0.0.1: what a client that sends a
malformed or unauthenticated request head sees on the wire, and how soon
the connection closes.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.trial.unittest import TestCase

from llmgate.edge.site import GatewaySite
from tests.fakes import Gateway, make_config, parse_response

# How long a client waits for an answer before it gives up (a hold).
PATIENCE = 5.0


class _Raw(Protocol):
    """Sends C{data}, then reads until the server closes."""

    def __init__(self, data: bytes, done: Deferred[tuple[bytes, float]]) -> None:
        self.data = data
        self.done = done
        self.got = b""
        self.sent_at = 0.0
        self.giveup: Any = None

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        self.sent_at = reactor.seconds()
        self.giveup = reactor.callLater(PATIENCE, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def connectionLost(self, reason: Any) -> None:
        if self.giveup.active():
            self.giveup.cancel()
        self.done.callback((self.got, reactor.seconds() - self.sent_at))


class EdgeSocketTests(TestCase):
    def listen(self, keyed: bool = False) -> int:
        cfg = make_config(keys={"team": {"api_key_env": "GW_KEY"}}) if keyed else None
        gw = Gateway(cfg)
        site = GatewaySite(gw.resource, reactor, gw.cfg.max_body_bytes)
        channels: list[Any] = []
        build = site.buildProtocol
        site.buildProtocol = lambda addr: channels.append(build(addr)) or channels[-1]  # type: ignore[method-assign]
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self.closed, channels)
        return port.getHost().port

    def closed(self, channels: list[Any]) -> Deferred[None]:
        """Fires once the server side of every connection is closed."""
        done: Deferred[None] = Deferred()

        def poll() -> None:
            if all(c._lost for c in channels):
                done.callback(None)
            else:
                reactor.callLater(0.01, poll)

        poll()
        return done

    def exchange(self, data: bytes, keyed: bool = False) -> Deferred[tuple[bytes, float]]:
        port = self.listen(keyed)
        done: Deferred[tuple[bytes, float]] = Deferred()
        factory = ClientFactory()
        factory.protocol = lambda: _Raw(data, done)  # type: ignore[assignment]
        reactor.connectTCP("127.0.0.1", port, factory)
        return done

    @inlineCallbacks
    def assertAnswered(self, data: bytes, status: int, keyed: bool = False) -> Any:
        got, elapsed = yield self.exchange(data, keyed)
        self.assertTrue(got, f"closed without a response after {elapsed:.1f}s")
        code, headers, body, complete = parse_response(got)
        self.assertEqual(code, status)
        self.assertTrue(complete)
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertLess(elapsed, 2.0, "the connection was held open")
        return json.loads(body)

    def test_bare_lf(self) -> None:
        """A head in bare LFs: 400 and close at once, not a silent hold."""
        return self.assertAnswered(b"POST /v1/chat/completions HTTP/1.1\nHost: localhost\nContent-Length: 2\n\n", 400)

    def test_absurd_chunk_size(self) -> None:
        """A chunk size of 18 hex digits: 400 and close at once."""
        return self.assertAnswered(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            400,
        )

    def test_huge_header_line(self) -> None:
        """One 64 KiB header line: 431 (Twisted closes without a word)."""
        return self.assertAnswered(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n", 431
        )

    def test_obs_fold_on_framing_headers(self) -> None:
        """obs-fold on Content-Length or Transfer-Encoding: 400 and close."""
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        d = self.assertAnswered(head + b"Content-Length:\r\n 2\r\n\r\n{}", 400)
        d.addCallback(lambda _: self.assertAnswered(head + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400))
        return d

    @inlineCallbacks
    def test_unauthenticated_answered_before_body(self) -> Any:
        """
        A client without a valid key that announces 8 MiB and sends only
        its headers sees the 401 (Anthropic dialect on /v1/messages) and the
        close without sending a byte of the body.
        """
        body = yield self.assertAnswered(
            b"POST /v1/messages HTTP/1.1\r\nHost: gw.example\r\nx-api-key: wrong\r\n"
            b"Content-Type: application/json\r\nContent-Length: 8388608\r\n\r\n",
            401,
            keyed=True,
        )
        self.assertEqual(body["error"]["type"], "authentication_error")

    @inlineCallbacks
    def test_refused_body_does_not_destroy_the_answer(self) -> Any:
        """
        A client that writes its whole 8 MiB body before reading (as HTTP
        client libraries do) still reads the 401: the refused bytes are
        read and dropped while it sends, rather than the connection reset
        under the answer.
        """
        port = self.listen(keyed=True)
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Type: application/json\r\nContent-Length: 8388608\r\n\r\n"
        )
        got = yield threads.deferToThread(_send_all_then_read, port, head + b"x" * 8388608)
        self.assertTrue(got.startswith(b"HTTP/1.1 "), got[:200])
        status, headers, body, _ = parse_response(got)
        self.assertEqual(status, 401)
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_api_key")


def _send_all_then_read(port: int, data: bytes) -> bytes:
    """A blocking client: send everything, then read until the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as s:
        try:
            s.sendall(data)
        except OSError as e:
            return repr(e).encode()
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError as e:
            return got or repr(e).encode()
        return got

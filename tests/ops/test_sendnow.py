"""
Transports that send a write at once when nothing is queued, queue the
rest the usual way, and are switched in only for Twisted's plain TCP
classes (or the TCP transport under a TLS layer).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmgate.ops import sendnow


class _Queueing:
    """The write side of a TCP connection: the kernel takes C{accept} bytes per send; the rest is queued."""

    connected = 1
    _writeDisconnected = False
    offset = 0
    dataBuffer = b""
    SEND_LIMIT = 8

    def __init__(self, accept: int) -> None:
        self.accept = accept
        self.sent: list[bytes] = []
        self.queued: list[bytes] = []
        self._tempDataLen = 0
        self.socket = self

    def send(self, data: bytes) -> int:
        n = min(len(data), self.accept)
        self.sent.append(data[:n])
        return n

    def writeSomeData(self, data: bytes) -> Any:
        return self.send(data)

    def write(self, data: bytes) -> None:
        if data:
            self.queued.append(data)
            self._tempDataLen += len(data)


class _Sending(sendnow.SendNow, _Queueing):
    pass


class SendNowTests(SynchronousTestCase):
    def test_sent_at_once_when_nothing_is_queued(self) -> None:
        """With an empty queue a write goes straight to the socket and nothing is queued."""
        t = _Sending(accept=100)
        t.write(b"hello")
        self.assertEqual((t.sent, t.queued), ([b"hello"], []))

    def test_what_the_kernel_refuses_is_queued(self) -> None:
        """A partial send queues the rest, and later writes queue behind it, in order."""
        t = _Sending(accept=3)
        t.write(b"hello")
        t.write(b"world")
        self.assertEqual(t.sent, [b"hel"])
        self.assertEqual(t.queued, [b"lo", b"world"])

    def test_nothing_sent_while_disconnected(self) -> None:
        """Without a connection, or after the write side was closed, the usual path decides (Twisted drops it)."""
        for attr, value in (("connected", 0), ("_writeDisconnected", True)):
            t = _Sending(accept=100)
            setattr(t, attr, value)
            t.write(b"x")
            self.assertEqual((t.sent, t.queued), ([], [b"x"]))

    def test_a_sequence_is_one_send(self) -> None:
        """writeSequence joins the pieces into one send (over the send limit too)."""
        t = _Sending(accept=100)
        t.writeSequence([b"GET / HTTP/1.1\r\n", b"\r\n"])
        self.assertEqual(t.sent, [b"GET / HTTP/1.1\r\n\r\n"])

    def test_a_refused_send_is_queued(self) -> None:
        """A send the socket refuses (EAGAIN, a dead connection) queues the write for Twisted's own path."""

        class Refusing(_Sending):
            def send(self, data: bytes) -> int:
                raise BlockingIOError()

        t = Refusing(accept=100)
        t.write(b"abc")
        self.assertEqual((t.sent, t.queued), ([], [b"abc"]))

    def test_only_twisted_tcp_classes_are_switched(self) -> None:
        """Plain tcp.Client and tcp.Server are switched, a TLS-like wrapper's TCP transport too; other transports are left alone."""

        class Bare:
            pass

        client = tcp.Client.__new__(tcp.Client)
        server = tcp.Server.__new__(tcp.Server)
        self.assertTrue(sendnow.adopt(client))
        self.assertTrue(sendnow.adopt(server))
        self.assertIs(type(client), sendnow.SendNowClient)
        self.assertIs(type(server), sendnow.SendNowServer)
        under = tcp.Client.__new__(tcp.Client)
        wrapper = Bare()
        wrapper.transport = under  # type: ignore[attr-defined]
        self.assertTrue(sendnow.adopt(wrapper))
        self.assertIs(type(under), sendnow.SendNowClient)
        self.assertFalse(sendnow.adopt(Bare()))


class _Collect(Protocol):
    def __init__(self, got: Deferred[bytes]) -> None:
        self.got = got

    def dataReceived(self, data: bytes) -> None:
        self.got.callback(data)


class UpstreamConnectionTests(TestCase):
    @inlineCallbacks
    def test_upstream_connections_send_in_the_same_turn(self) -> None:
        """
        Over a real loopback socket, a connection made by the upstream
        client's endpoint sends a write before the call returns: nothing is
        left in Twisted's queue for the next turn.
        """
        from llmgate.relay.client import _NoDelayEndpoint

        got: Deferred[bytes] = Deferred()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: _Collect(got))
        )
        self.addCleanup(port.stopListening)
        ep = _NoDelayEndpoint(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        proto = yield ep.connect(Factory.forProtocol(Protocol))
        self.addCleanup(proto.transport.loseConnection)
        self.assertIsInstance(proto.transport, sendnow.SendNowClient)
        self.assertEqual(proto.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        proto.transport.write(b"request")
        self.assertEqual((proto.transport._tempDataLen, proto.transport.dataBuffer), (0, b""))
        data = yield got
        self.assertEqual(data, b"request")

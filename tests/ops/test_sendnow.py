"""
Transports that send a write at once when nothing is queued, queue the
rest the usual way, and are switched in only for Twisted's plain TCP
classes (or the TCP transport under a TLS layer).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import error, reactor, tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
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


class _Closable:
    """What SendNow's closing reads and calls on a TCP connection, recorded."""

    connected = 1
    disconnected = 0
    disconnecting = 0
    _writeDisconnected = False
    _tempDataLen = 0
    offset = 0
    dataBuffer = b""
    producer: Any = None
    streamingProducer = True
    producerPaused = False
    SEND_LIMIT = 1 << 20

    def __init__(self, clock: Clock) -> None:
        self.reactor = clock
        self.calls: list[Any] = []
        self.socket = self

    def send(self, data: bytes) -> int:
        return len(data)

    def stopReading(self) -> None:
        self.calls.append("stopReading")

    def startReading(self) -> None:
        self.calls.append("startReading")

    def startWriting(self) -> None:
        self.calls.append("startWriting")

    def stopWriting(self) -> None:
        self.calls.append("stopWriting")

    def loseConnection(self, *args: Any) -> None:
        self.calls.append("twisted loseConnection")

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def write(self, data: bytes) -> None:
        self._tempDataLen += len(data)
        self.calls.append(("queued", data))

    def connectionLost(self, reason: Any) -> None:
        self.disconnected, self.connected = 1, 0
        self.calls.append(("connectionLost", reason.type))


class _Closing(sendnow.SendNow, _Closable):
    pass


class CloseTests(SynchronousTestCase):
    def test_idle_connection_closes_next_turn_without_waiting_to_write(self) -> None:
        """
        With nothing queued, loseConnection stops reading, marks the
        connection disconnecting and closes it at the next turn with
        ConnectionDone; it never registers for writing.
        """
        clock = Clock()
        t = _Closing(clock)
        t.loseConnection()
        self.assertEqual(t.calls, ["stopReading"])
        self.assertTrue(t.disconnecting)
        clock.advance(0)
        self.assertEqual(t.calls, ["stopReading", "stopWriting", ("connectionLost", error.ConnectionDone)])

    def test_connections_closed_in_one_turn_share_one_timer(self) -> None:
        """Many idle closes in a turn schedule one call, which closes them all."""
        clock = Clock()
        ts = [_Closing(clock) for _ in range(5)]
        for t in ts:
            t.loseConnection()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertTrue(all(t.disconnected for t in ts))

    def test_queued_bytes_take_twisteds_path(self) -> None:
        """Bytes still queued, or a paused producer, leave the close to Twisted (it flushes first)."""
        for attr, value in (("_tempDataLen", 3), ("dataBuffer", b"abc"), ("producerPaused", True)):
            t = _Closing(Clock())
            t.producer = object()
            setattr(t, attr, value)
            t.loseConnection()
            self.assertEqual(t.calls, ["twisted loseConnection"], attr)

    def test_write_refused_after_close_is_flushed_before_closing(self) -> None:
        """A write the kernel does not take after loseConnection is left to Twisted's writer, which closes after it."""
        clock = Clock()
        t = _Closing(clock)
        t.loseConnection()
        t.SEND_LIMIT = 0
        t.writeSomeData = lambda data: 0  # type: ignore[attr-defined]
        t.write(b"late")
        clock.advance(0)
        self.assertEqual(t.calls, ["stopReading", ("queued", b"late"), "startWriting"])
        self.assertFalse(t.disconnected)

    def test_lost_or_aborted_meanwhile_is_not_lost_twice(self) -> None:
        """A connection lost (or being aborted) before the turn ends gets no second connectionLost."""
        for attr in ("disconnected", "_aborting"):
            clock = Clock()
            t = _Closing(clock)
            t.loseConnection()
            setattr(t, attr, True)
            clock.advance(0)
            self.assertEqual(t.calls, ["stopReading"], attr)


class HeldPauseTests(SynchronousTestCase):
    def test_pause_cancelled_by_resume_while_held(self) -> None:
        """A pause then a resume while held reach the transport as a resume only (no stop/start pair)."""
        t = _Closing(Clock())
        t.holdPauses()
        t.pauseProducing()
        t.resumeProducing()
        t.releasePauses()
        self.assertEqual(t.calls, ["resume"])

    def test_pause_left_held_takes_effect_on_release(self) -> None:
        """A pause not cancelled happens at the release, once."""
        t = _Closing(Clock())
        t.holdPauses()
        t.pauseProducing()
        self.assertEqual(t.calls, [])
        t.releasePauses()
        t.pauseProducing()
        self.assertEqual(t.calls, ["pause", "pause"])

    def test_no_pause_on_a_lost_connection(self) -> None:
        """A held pause is dropped if the connection was lost meanwhile."""
        t = _Closing(Clock())
        t.holdPauses()
        t.pauseProducing()
        t.disconnected = 1
        t.releasePauses()
        self.assertEqual(t.calls, [])


class HeldWriteTests(SynchronousTestCase):
    def test_held_writes_leave_as_one_send(self) -> None:
        """Writes between holdWrites and releaseWrites are joined into one send."""
        t = _Sending(accept=100)
        t.holdWrites()
        t.write(b"head ")
        t.writeSequence([b"more ", b""])
        t.write(b"body")
        self.assertEqual(t.sent, [])
        t.releaseWrites()
        self.assertEqual(t.sent, [b"head more body"])
        t.write(b"after")
        self.assertEqual(t.sent, [b"head more body", b"after"])


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


class _WriteAndClose(Protocol):
    """On connection: switch to sending at once, write C{data}, lose the connection."""

    def __init__(self, data: bytes, seen: list[Any]) -> None:
        self.data = data
        self.seen = seen

    def connectionMade(self) -> None:
        sendnow.adopt(self.transport)
        self.transport.write(self.data)
        self.transport.loseConnection()
        self.seen.append(self.transport in reactor.getWriters())

    def connectionLost(self, reason: Any) -> None:
        self.seen.append(reason.type)


class _ReadAll(Protocol):
    def __init__(self, done: Deferred[tuple[bytes, Any]]) -> None:
        self.done = done
        self.got: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback((b"".join(self.got), reason.type))


class RealCloseTests(TestCase):
    """Over real loopback sockets, a connection closed with nothing queued (and with a lot queued)."""

    @inlineCallbacks
    def _serve(self, data: bytes) -> Any:
        seen: list[Any] = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: _WriteAndClose(data, seen))
        )
        self.addCleanup(port.stopListening)
        done: Deferred[tuple[bytes, Any]] = Deferred()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(lambda: _ReadAll(done))
        )
        got = yield done
        return got, seen

    @inlineCallbacks
    def test_idle_close_delivers_everything_then_a_clean_close(self) -> None:
        """The peer reads every byte and a clean close; the server side never waited to write."""
        (got, reason), seen = yield self._serve(b"response")
        self.assertEqual((got, reason), (b"response", error.ConnectionDone))
        self.assertEqual(seen[0], False)

    @inlineCallbacks
    def test_close_after_more_than_the_kernel_takes(self) -> None:
        """8 MB written then closed: Twisted's path flushes it all before closing."""
        data = bytes(range(256)) * (8 * 4096)
        (got, reason), seen = yield self._serve(data)
        self.assertEqual(len(got), len(data))
        self.assertEqual(got, data)
        self.assertEqual(reason, error.ConnectionDone)
        self.assertEqual(seen[0], True)

"""
Tests for L{llmgate.policy.resp}: RESP2 encoding and parsing, replies in
order, a deadline on every call, and failures without a connection.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from llmgate.policy.resp import RedisClient, RedisError, RedisTimeout, RedisUnavailable, RESPProtocol, encode


def connected(timeout: float = 0.05) -> tuple[RESPProtocol, StringTransport, Clock]:
    clock = Clock()
    proto = RESPProtocol(clock, timeout)
    tr = StringTransport()
    proto.makeConnection(tr)
    return proto, tr, clock


class RESPTests(SynchronousTestCase):
    def test_encode(self) -> None:
        """Commands go out as arrays of bulk strings; numbers as their text."""
        self.assertEqual(encode(("SET", b"k", 3, 0.5)), b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n3\r\n$3\r\n0.5\r\n")

    def test_replies_in_order_split_anywhere(self) -> None:
        """Pipelined replies (status, int, bulk, nil, nested array) fire their calls in order, however the bytes are split."""
        proto, tr, _ = connected()
        got: list[object] = []
        for _ in range(5):
            proto.call("X").addCallback(got.append)
        wire = b"+OK\r\n:-7\r\n$5\r\nab\r\nc\r\n$-1\r\n*2\r\n$1\r\na\r\n*1\r\n:1\r\n"
        for i in range(len(wire)):
            proto.dataReceived(wire[i:i + 1])
        self.assertEqual(got, [b"OK", -7, b"ab\r\nc", None, [b"a", [1]]])

    def test_error_reply(self) -> None:
        """An error reply fails its call with L{RedisError} carrying the message."""
        proto, _, _ = connected()
        d = proto.call("EVALSHA", "x")
        proto.dataReceived(b"-NOSCRIPT No matching script\r\n")
        f = self.failureResultOf(d, RedisError)
        self.assertTrue(str(f.value).startswith("NOSCRIPT"))

    def test_timeout_and_late_reply(self) -> None:
        """A call unanswered by its deadline fails with L{RedisTimeout}; its late reply is dropped, not given to the next call."""
        proto, _, clock = connected(timeout=0.05)
        d1 = proto.call("A")
        clock.advance(0.049)
        self.assertNoResult(d1)
        clock.advance(0.002)
        self.failureResultOf(d1, RedisTimeout)
        d2 = proto.call("B")
        proto.dataReceived(b"+late\r\n+mine\r\n")
        self.assertEqual(self.successResultOf(d2), b"mine")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connection_lost_fails_pending(self) -> None:
        """Calls in flight when the connection drops fail with L{RedisUnavailable} at once."""
        proto, _, clock = connected()
        d = proto.call("A")
        proto.connectionLost(None)
        self.failureResultOf(d, RedisUnavailable)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_garbage_drops_connection(self) -> None:
        """Bytes that are not RESP abort the connection (and fail its calls) instead of desynchronising replies."""
        proto, tr, _ = connected()
        d = proto.call("A")
        tr.abortConnection = lambda: proto.connectionLost(None)  # type: ignore[method-assign]
        proto.dataReceived(b"?what\r\n")
        self.failureResultOf(d, RedisUnavailable)

    def test_no_connection_fails_now(self) -> None:
        """Without a connection a call fails at once: callers apply their policy instead of waiting."""
        client = RedisClient(Clock(), "127.0.0.1", 1)
        self.failureResultOf(client.call("PING"), RedisUnavailable)


class ReconnectTests(SynchronousTestCase):
    def test_backoff_then_reset(self) -> None:
        """Failed connects are retried after 0.05 s, doubling up to 2 s; a connection (PING answered) resets the delay, and a lost one reconnects."""
        from twisted.internet.error import ConnectionRefusedError
        from twisted.internet.testing import MemoryReactorClock

        r = MemoryReactorClock()
        client = RedisClient(r, "127.0.0.1", 6379, timeout=0.05)
        client.start()
        delays = []
        for _ in range(8):
            self.assertEqual(len(r.tcpClients), len(delays) + 1)
            factory = r.tcpClients[-1][2]
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            (call,) = r.getDelayedCalls()
            delays.append(round(call.getTime() - r.seconds(), 3))
            r.advance(call.getTime() - r.seconds())
        self.assertEqual(delays, [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
        self.assertFalse(client.connected)
        # Connected: the handshake's PING answered.
        proto = r.tcpClients[-1][2].buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        self.assertIn(b"PING", tr.value())
        proto.dataReceived(b"+PONG\r\n")
        self.assertTrue(client.connected)
        self.assertEqual(client.connects, 1)
        proto.connectionLost(None)
        self.assertFalse(client.connected)
        (call,) = r.getDelayedCalls()
        self.assertAlmostEqual(call.getTime() - r.seconds(), 0.05)
        client.stop()
        self.assertEqual(r.getDelayedCalls(), [])

    def test_select_and_auth(self) -> None:
        """The URL's password and database are sent (AUTH, SELECT) before the connection is used."""
        from twisted.internet.testing import MemoryReactorClock

        r = MemoryReactorClock()
        client = RedisClient(r, "127.0.0.1", 6379, db=3, password="pw")
        client.start()
        proto = r.tcpClients[-1][2].buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        self.assertEqual(tr.value(), encode(("AUTH", "pw")) + encode(("SELECT", 3)) + encode(("PING",)))
        proto.dataReceived(b"+OK\r\n+OK\r\n+PONG\r\n")
        self.assertTrue(client.connected)

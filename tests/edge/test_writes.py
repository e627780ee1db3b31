"""
The write-through transport (L{llmgate.ops.sendnow}: the edge's and the
upstream connections') over a real TCP connection on 127.0.0.1: a write goes out in the call when
nothing is queued, and whatever the kernel does not take (a full socket
buffer, a dead connection) is queued and handled by Twisted's own write
path, in order.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops.sendnow import SendNowServer


class WriteThroughTests(SynchronousTestCase):
    def setUp(self) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.peer = socket.create_connection(listener.getsockname())
        ours, addr = listener.accept()
        listener.close()
        ours.setblocking(False)
        self.addCleanup(self.peer.close)
        self.reactor = MemoryReactor()
        self.protocol = Protocol()
        self.transport = tcp.Server(ours, self.protocol, addr, None, 1, self.reactor)
        self.transport.__class__ = SendNowServer
        self.protocol.makeConnection(self.transport)
        self.addCleanup(ours.close)

    def read_all(self, n: int) -> bytes:
        """Read C{n} bytes at the peer, letting the transport send its queue as the reactor would."""
        self.peer.settimeout(0.05)
        got = b""
        for _ in range(10000):
            if len(got) >= n:
                break
            if self.transport in self.reactor.getWriters():
                self.transport.doWrite()
            try:
                got += self.peer.recv(1 << 20)
            except TimeoutError:
                pass
        return got

    def test_sent_in_the_call(self) -> None:
        """
        A write with nothing queued reaches the peer before the call
        returns: nothing queued, the socket not registered for writing.
        """
        self.transport.write(b"event one")
        self.transport.writeSequence([b"event ", b"two"])
        self.assertNotIn(self.transport, self.reactor.getWriters())
        self.assertEqual(self.transport._tempDataLen, 0)
        self.peer.settimeout(1)
        got = b""
        while len(got) < 18:
            got += self.peer.recv(100)
        self.assertEqual(got, b"event oneevent two")

    def test_full_buffer_queues_the_rest_in_order(self) -> None:
        """
        Writes the kernel cannot take at once, small ones and one larger
        than Twisted's send limit, are queued and leave in order once the
        peer reads.
        """
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        pieces = [bytes([65 + i % 26]) * 1000 for i in range(300)]
        pieces.insert(150, b"z" * (self.transport.SEND_LIMIT * 2 + 7))
        for piece in pieces:
            self.transport.write(piece)
        self.assertIn(self.transport, self.reactor.getWriters())
        want = b"".join(pieces)
        self.assertEqual(self.read_all(len(want)), want)

    def test_dead_connection_is_queued_then_lost(self) -> None:
        """
        A write to a connection the peer reset does not raise: it is
        queued, and Twisted's write path then finds the connection lost.
        """
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.peer.close()
        lost: Any = None
        for _ in range(200):
            self.transport.write(b"x" * 100)
            if self.transport in self.reactor.getWriters():
                lost = self.transport.doWrite()
                break
        self.assertIsInstance(lost, ConnectionLost)

# -*- test-case-name: tests.ops.test_sendnow,tests.edge.test_writes -*-
"""
TCP transports that send a write at once when nothing is queued.

Twisted's TCP transport queues every write until the next reactor turn,
then registers the socket for writing, sends, and unregisters it: two
C{epoll_ctl} calls and a reactor dispatch per write, and the bytes leave
one turn later. Under load a turn is several milliseconds of other
streams' events, so on the upstream side a request went out one turn late
and its answer (the time to first token) came back a turn later too.
Sending straight away when the queue is empty (the common case: the peer
keeps up) skips all of that; whatever the kernel does not take is queued
the usual way, so backpressure and producers work as before.

L{adopt} switches a connected transport's class to the sending one; only
Twisted's own plain TCP classes are switched (TLS writes end up on the TCP
transport below it, which is found and switched), anything else is left
as it is.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


class SendNow:
    """Mixin for a C{tcp.Connection}: L{write} sends at once when nothing is queued."""

    connected: int
    _writeDisconnected: bool
    _tempDataLen: int
    offset: int
    dataBuffer: bytes

    def write(self, data: bytes) -> None:
        if data and self.connected and not self._writeDisconnected and not self._tempDataLen and self.offset == len(self.dataBuffer):
            if len(data) > self.SEND_LIMIT:  # type: ignore[attr-defined]
                sent = self.writeSomeData(data)  # type: ignore[attr-defined]
                if not isinstance(sent, int) or sent < 0:
                    sent = 0
            else:
                # Connection.writeSomeData without its two calls per send
                # (a lazy slice, an EINTR loop that Python's socket module
                # already does): whatever the socket refuses (EAGAIN, or
                # a dead connection) is queued, and Twisted's own write
                # path then sends it or finds the connection lost.
                try:
                    sent = self.socket.send(data)  # type: ignore[attr-defined]
                except OSError:
                    sent = 0
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))


class SendNowClient(SendNow, tcp.Client):
    """An outgoing TCP connection that sends at once."""


class SendNowServer(SendNow, tcp.Server):
    """An accepted TCP connection that sends at once."""


_SWITCH = {tcp.Client: SendNowClient, tcp.Server: SendNowServer}


def adopt(transport: Any) -> bool:
    """
    Switch C{transport}, or the TCP transport under its TLS layer, to the
    class that sends at once; whether one was switched.
    """
    for _ in range(3):
        to = _SWITCH.get(type(transport))
        if to is not None:
            transport.__class__ = to
            return True
        transport = getattr(transport, "transport", None)
        if transport is None:
            return False
    return False

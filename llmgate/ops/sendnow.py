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

Closing works the same way. Twisted's C{loseConnection} registers the
socket for writing even when nothing is queued, waits a turn for epoll to
say it is writable, sends zero bytes, unregisters it and only then
closes: three C{epoll_ctl} calls, an empty send and a dispatch for every
connection a response ends. With nothing queued (and no paused producer
to wait for) the connection here is closed at the next reactor turn by one
timer shared by every connection closed in that turn, exactly as
Twisted's own path would close it (C{connectionLost} with
C{ConnectionDone}); a write made in between, or an abort, still goes the
usual way. The C{shutdown} Twisted calls before C{close} is skipped: the
descriptor is close-on-exec and never shared, so C{close} alone ends the
connection the same way (its own comment says so).

The upstream client writes a request's head and its body in two calls;
L{SendNow.holdWrites} and L{SendNow.releaseWrites} make them one send
(and one packet for the upstream to read).

While the upstream client parses a response head it pauses the
connection and resumes it a few calls later, in the same read, when the
relay takes the body: two C{epoll_ctl} calls per request that cancel out.
L{SendNow.holdPauses} lets the parser hold a pause until
L{SendNow.releasePauses}, and a resume in between cancels it.

L{adopt} switches a connected transport's class to the sending one; only
Twisted's own plain TCP classes are switched (TLS writes end up on the TCP
transport below it, which is found and switched), anything else is left
as it is.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet import main, tcp
from twisted.python.failure import Failure

from llmgate.ops.nextturn import NextTurn

# One Failure for every connection closed here, as the reactor shares its
# own for ConnectionDone: building one per close captures nothing useful.
_DONE = Failure(main.CONNECTION_DONE)


# Per reactor: the connections whose loseConnection found nothing to
# send, closed at the next turn by one timer for all of them.
_closing: "weakref.WeakKeyDictionary[Any, NextTurn[Any]]" = weakref.WeakKeyDictionary()


def _closing_for(clock: Any) -> "NextTurn[Any]":
    closing = _closing.get(clock)
    if closing is None:
        closing = _closing[clock] = NextTurn(clock, _close_idle)
    return closing


def _close_idle(transport: Any) -> None:
    transport._closeIdle()


class SendNow:
    """Mixin for a C{tcp.Connection}: L{write} sends at once when nothing is queued."""

    connected: int
    _writeDisconnected: bool
    _tempDataLen: int
    offset: int
    dataBuffer: bytes

    # Writes held by holdWrites() until releaseWrites(): a list, or None.
    _held: Any = None

    def holdWrites(self) -> None:
        """Hold writes until L{releaseWrites}, which sends them as one."""
        if self._held is None:
            self._held = []

    def releaseWrites(self) -> None:
        held, self._held = self._held, None
        if held:
            self.write(b"".join(held))

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            if data:
                held.append(data)
            return
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

    # -- closing ---------------------------------------------------------------

    def _idle(self) -> bool:
        """Nothing queued, and no paused producer that Twisted would resume first."""
        producer = self.producer  # type: ignore[attr-defined]
        return (
            not self._tempDataLen
            and self.offset == len(self.dataBuffer)
            and (producer is None or (self.streamingProducer and not self.producerPaused))  # type: ignore[attr-defined]
        )

    def loseConnection(self, *args: Any) -> None:
        if self.connected and not self.disconnecting and not self._writeDisconnected and self._idle():  # type: ignore[attr-defined]
            # What Twisted's loseConnection does, minus the wait to be
            # told the socket is writable: stop reading now, close next turn.
            self.stopReading()  # type: ignore[attr-defined]
            self.disconnecting = 1
            _closing_for(self.reactor).add(self)  # type: ignore[attr-defined]
            return
        super().loseConnection(*args)  # type: ignore[misc]

    def _closeIdle(self) -> None:
        if self.disconnected or getattr(self, "_aborting", False):  # type: ignore[attr-defined]
            # Already lost (a read found the peer gone) or being aborted:
            # its own path calls connectionLost.
            return
        if not self._idle():
            # Written to after loseConnection and the kernel did not take
            # it all: Twisted's path sends the rest, then closes (the
            # connection is marked disconnecting).
            self.startWriting()  # type: ignore[attr-defined]
            return
        self.stopWriting()  # type: ignore[attr-defined]
        self.connectionLost(_DONE)  # type: ignore[attr-defined]

    # -- pauses held over a response head ----------------------------------------

    _holding = False
    _pauseHeld = False

    def holdPauses(self) -> None:
        """Until L{releasePauses}, a pause is only noted, and a resume cancels it."""
        self._holding = True

    def releasePauses(self) -> None:
        """Stop holding; a pause still noted takes effect now."""
        self._holding = False
        if self._pauseHeld:
            self._pauseHeld = False
            if not self.disconnected:  # type: ignore[attr-defined]
                super().pauseProducing()  # type: ignore[misc]

    def pauseProducing(self) -> None:
        if self._holding:
            self._pauseHeld = True
            return
        super().pauseProducing()  # type: ignore[misc]

    def resumeProducing(self) -> None:
        # A held pause never reached the reactor; Twisted's resume (start
        # reading unless closing) then costs no system call.
        self._pauseHeld = False
        super().resumeProducing()  # type: ignore[misc]


class SendNowClient(SendNow, tcp.Client):
    """An outgoing TCP connection that sends at once."""

    _shouldShutdown = False


class SendNowServer(SendNow, tcp.Server):
    """An accepted TCP connection that sends at once."""

    _shouldShutdown = False


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

# -*- test-case-name: tests.edge.test_site -*-
"""
The client-facing HTTP side: a Request that caps the body it will accept
and keeps it in memory, and the Site that builds it.

twisted.web reads the whole body before rendering and spools bodies over
100 kB to a temporary file (synchronous disk I/O on the reactor thread); we
keep bodies in memory, bounded by the cap, and refuse an oversized body from
its Content-Length before reading it, or as soon as a chunked body passes
the cap.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet import tcp
from twisted.internet.task import LoopingCall
from twisted.web import http, server

from llmgate import dialects

# A client gets this long to send a request's headers, and this long for
# its body, however it trickles: Twisted's own timer restarts on every byte,
# so one byte a minute would hold a connection forever (slowloris).
HEADER_DEADLINE = 10.0
BODY_DEADLINE = 120.0


class GatewayRequest(server.Request):
    """A request whose body is held in memory up to C{maxBody} bytes."""

    maxBody = 32 * 1024 * 1024
    # Bodies are JSON: skip twisted.web's form parsing, whose content-type
    # parse goes through the email package on every POST.
    _parsePOSTFormSubmission = False
    # Body bytes received so far; the request's size for the ledger.
    received = 0
    _rejected = False

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > self.maxBody:
            self._reject()

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self.received += len(data)
        if self.received > self.maxBody:
            self._reject()
            return
        self.content.write(data)

    def _reject(self) -> None:
        """
        Answer 413 before reading the body, then close: reading on would
        make us pay for the bytes we refuse.
        """
        self._rejected = True
        self.content = BytesIO()
        path = getattr(self.channel, "_path", b"") or b""
        kind = dialects.kind_for_path(path.split(b"?", 1)[0])
        body = dialects.error_body(
            kind,
            413,
            f"request body is larger than the limit of {self.maxBody} bytes",
            code="request_too_large",
        )
        self.channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        self.channel.loseConnection()
        site = getattr(self.channel, "site", None)
        accounting = getattr(getattr(site, "resource", None), "accounting", None)
        if accounting is not None:
            accounting.rejected(path.split(b"?", 1)[0].decode("latin-1"), 413)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        super().requestReceived(command, path, version)


class _WriteThrough(tcp.Server):
    """
    A TCP server transport that sends at once when nothing is queued.

    Twisted queues every write until the next reactor turn, then registers
    the socket for writing, sends, and unregisters it: two epoll_ctl calls
    and a reactor dispatch per relayed event. Sending straight away when the
    queue is empty (the common case: the client keeps up) skips all three;
    anything the kernel does not take is queued the usual way, so
    backpressure and producers work as before.
    """

    def write(self, data: bytes) -> None:
        if data and self.connected and not self._writeDisconnected and not self._tempDataLen and self.offset == len(self.dataBuffer):
            sent = self.writeSomeData(data)
            if isinstance(sent, int) and sent >= 0:
                if sent == len(data):
                    return
                data = data[sent:]
        super().write(data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))


class GatewayChannel(http.HTTPChannel):
    """
    HTTP/1.1 with deadlines: the whole header block within
    C{headerDeadline} seconds of its first byte, the whole body within
    C{bodyDeadline}; 408 and close otherwise.
    """

    headerDeadline = HEADER_DEADLINE
    bodyDeadline = BODY_DEADLINE
    _deadline: Any = None  # when the current deadline passes (a time)

    def connectionMade(self) -> None:
        if type(self.transport) is tcp.Server:
            self.transport.__class__ = _WriteThrough
        super().connectionMade()

    def _arm(self, seconds: float) -> None:
        # A time and a set entry, checked by the site's sweep: a DelayedCall
        # set and cancelled twice per request costs heap work per request.
        self._deadline = self.site.clock.seconds() + seconds
        self.site.waiting.add(self)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline = None
            self.site.waiting.discard(self)

    def check(self, now: float) -> None:
        """Called by the site's sweep: answer 408 once the deadline passed."""
        if self._deadline is not None and now >= self._deadline:
            self._disarm()
            self._too_slow()

    def lineReceived(self, line: bytes) -> None:
        if self._deadline is None and not self._handlingRequest and line:
            # The first line of a new request starts its header clock.
            self._arm(self.headerDeadline)
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        if self.length == 0:
            self._disarm()
        else:
            self._arm(self.bodyDeadline)

    def _send100Continue(self) -> None:
        # Never invite the body of a request already refused (413).
        if self.requests and getattr(self.requests[-1], "_rejected", False):
            return
        super()._send100Continue()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _too_slow(self) -> None:
        if self.transport is None:
            return
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        self.transport.loseConnection()


class GatewaySite(server.Site):
    """
    The Site for the gateway: plain HTTP/1.1 channels with deadlines,
    bodies capped, no tracebacks to clients, and no Combined Log lines (the
    gateway writes its own access log).
    """

    displayTracebacks = False

    def __init__(self, resource: Any, reactor: Any, max_body: int) -> None:
        limit = max_body

        class _Request(GatewayRequest):
            maxBody = limit

        super().__init__(resource, requestFactory=_Request, reactor=reactor)
        self.protocol = GatewayChannel
        self.clock = reactor
        # Channels with a header or body deadline running, swept once a
        # second while the site listens.
        self.waiting: set[GatewayChannel] = set()
        self._sweep = LoopingCall(self._check_deadlines)
        self._sweep.clock = reactor
        # Requests copy this from the site (Twisted >= 25): bodies are JSON,
        # so skip the form parsing whose content-type parse goes through the
        # email package on every POST (10% of the CPU at 1,000 streams).
        self._parsePOSTFormSubmission = False

    def log(self, request: Any) -> None:
        pass

    def startFactory(self) -> None:
        super().startFactory()
        if not self._sweep.running:
            self._sweep.start(1.0, now=False)

    def stopFactory(self) -> None:
        if self._sweep.running:
            self._sweep.stop()
        super().stopFactory()

    def _check_deadlines(self) -> None:
        now = self.clock.seconds()
        for channel in list(self.waiting):
            channel.check(now)

# -*- test-case-name: tests.edge.test_site,tests.edge.test_writes -*-
"""
The client-facing HTTP side: a channel that holds every client to
deadlines and answers every malformed request at once, a Request that
decides from the headers whether to read the body at all and keeps the body
in memory, and the Site that builds them.

twisted.web reads the whole body before rendering and spools bodies over
100 kB to a temporary file (synchronous disk I/O on the reactor thread); we
keep bodies in memory, bounded by the per-request cap and a site-wide budget,
and decide before reading a byte of a body: a client without a valid key, an
oversized C{Content-Length} or a full budget is answered and the connection
closed with the body unread.

Whatever the gateway refuses at this stage is answered with a status and an
error body in the dialect of the route, then closed: never a silent close and
never a hold until some idle timer fires.
"""

from __future__ import annotations

from io import BytesIO
from urllib.parse import unquote_to_bytes as _unquote
from typing import Any, Optional

from twisted.internet.interfaces import ITCPTransport
from twisted.python import failure
from twisted.web import http, resource, server

from llmgate import dialects
from llmgate.edge.requestid import ids_for
from llmgate.edge import admission
from llmgate.edge.budget import MAX_BUFFERED_BYTES, BodyBudget
from llmgate.ops import sendnow
from llmgate.ops.periodic import Periodic

# A client gets this long to send a request's headers, counted from the
# connection (or the end of the previous response on a kept-alive one), and
# this long for its body from the end of its headers, however it trickles:
# Twisted's own timer restarts on every byte, so one byte a minute would hold
# a connection forever (slowloris).
HEADER_DEADLINE = 10.0
BODY_DEADLINE = 120.0

# After a refusal, how long the rest of a refused body is read and dropped
# while the client reads the answer, before the connection is reset.
LINGER = 2.0

# The request line or one header line; the request line and headers
# together; the number of header fields.
MAX_LINE_BYTES = 16384
MAX_HEAD_BYTES = 16384
MAX_HEADERS = 100

# 16 hex digits hold any 64-bit size; a longer chunk size is an attempt to
# overflow some parser on the way.
MAX_CHUNK_SIZE_DIGITS = 16

_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}

_HEX = frozenset(b"0123456789abcdefABCDEF")

# Looked up once: twisted.web.http is a deprecation proxy module, and an
# attribute read through it per header line was ~1.5% of the CPU per
# request.
_ChunkedTransferDecoder = http._ChunkedTransferDecoder
_datetimeToString = http.datetimeToString
_SERVER = server.version


class _DateHeader:
    """
    The C{Date} header's value, formatted once per second: it names the
    second, so the requests of a second share one string (Twisted formats
    it again for every request, ~1% of the CPU per short request).
    """

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._value = _datetimeToString(second)
            self._second = second
        return self._value


_date = _DateHeader()


class _ChunkTooLarge(Exception):
    """A chunk size above the body cap: refused with 413 before its bytes."""


class _StrictChunkedDecoder(http._ChunkedTransferDecoder):
    """
    Twisted's chunked decoder, refusing at once what it would otherwise wait
    on: an oversized chunk size (it would read on until the body cap or the
    deadline), and bare LF line ends (it waits for a CRLF that never comes).
    """

    def __init__(self, data: Any, finish: Any, max_size: int) -> None:
        super().__init__(data, finish)
        self._max_size = max_size

    def _bare_lf(self) -> bool:
        # Only the bytes not searched before (see _start in the base class).
        lf = self._buffer.find(b"\n", self._start)
        if lf == -1:
            return False
        crlf = self._buffer.find(b"\r\n", self._start)
        return crlf == -1 or lf < crlf + 1

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        if self._bare_lf():
            raise http._MalformedChunkedDataError("chunk size line ends with a bare LF")
        eol = self._buffer.find(b"\r\n")
        line = self._buffer if eol == -1 else self._buffer[:eol]
        size = line.split(b";", 1)[0]
        if eol == -1 and size.endswith(b"\r"):
            size = size[:-1]
        if len(size) > MAX_CHUNK_SIZE_DIGITS or not _HEX.issuperset(size):
            raise http._MalformedChunkedDataError("chunk size is not a hex number of at most 16 digits")
        done = super()._dataReceived_CHUNK_LENGTH()
        if done and self.length > self._max_size:
            raise _ChunkTooLarge()
        return done

    def _dataReceived_CRLF(self) -> bool:
        if self._buffer[:1] == b"\n":
            raise http._MalformedChunkedDataError("chunk ends with a bare LF")
        return super()._dataReceived_CRLF()

    def _dataReceived_TRAILER(self) -> bool:
        if self._bare_lf():
            raise http._MalformedChunkedDataError("trailer line ends with a bare LF")
        return super()._dataReceived_TRAILER()


class GatewayRequest(server.Request):
    """
    A request whose body is held in memory up to C{maxBody} bytes, and read
    only once its headers have been admitted.
    """

    maxBody = 32 * 1024 * 1024
    # Bodies are JSON: skip twisted.web's form parsing, whose content-type
    # parse goes through the email package on every POST.
    _parsePOSTFormSubmission = False
    # Body bytes received so far; the request's size for the ledger.
    received = 0
    _rejected = False
    _chunked = False
    # Bytes of the site's body budget this request holds, and the budget.
    _held = 0
    _budget: Optional[BodyBudget] = None

    def gotLength(self, length: Optional[int]) -> None:
        """
        The headers are complete: admit the request (key, or the keyless
        checks), then its announced size against the cap and the site's
        budget, before a byte of the body is read.
        """
        self.content = BytesIO()
        self._chunked = length is None
        channel = self.channel
        refusal = admission.admit(channel._command, self._route(), self, channel.site.resource)
        if refusal is not None:
            self._refuse(*refusal)
        elif length is not None and length > self.maxBody:
            self.too_large()
        elif length and not self._hold(length):
            self._busy()

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self.received += len(data)
        if self.received > self.maxBody:
            self.too_large()
            return
        if self._chunked and not self._hold(len(data)):
            self._busy()
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        # Handed to the resource: from here the body is the relay's to bound.
        self._release()
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """
        Twisted's C{server.Request.process}, with the C{Date} header of the
        site's clock taken from a per-second cache instead of formatted anew
        for each request.
        """
        site = self.site = self.channel.site
        headers = self.responseHeaders
        headers.setRawHeaders(b"Server", [_SERVER])
        headers.setRawHeaders(b"Date", [_date(site.clock.seconds())])
        self.prepath = []
        self.postpath = list(map(_unquote, self.path[1:].split(b"/")))
        if self.path == b"*":
            self._handleStar()
            return
        try:
            resrc = site.getResourceFor(self)
            if resource._IEncodingResource.providedBy(resrc):
                encoder = resrc.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(resrc)
        except BaseException:
            self.processingFailed(failure.Failure())

    def connectionLost(self, reason: Any) -> None:
        self._release()
        super().connectionLost(reason)

    def too_large(self) -> None:
        """
        Answer 413 before reading (more of) the body, then close: reading on
        would make us pay for the bytes we refuse.
        """
        self._refuse(413, f"request body is larger than the limit of {self.maxBody} bytes", "request_too_large")

    def _busy(self) -> None:
        self._refuse(
            503,
            "the gateway is receiving too many request bodies at once; retry shortly",
            "overloaded",
            ((b"Retry-After", b"1"),),
        )

    def _refuse(self, status: int, message: str, code: Optional[str] = None, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer in the route's dialect, close, and leave one ledger record."""
        self._rejected = True
        self._release()
        self.content = BytesIO()
        route = self._route().decode("latin-1")
        channel = self.channel
        ids = ids_for(self)
        channel.refuse(status, message, code, headers + ((b"X-Request-Id", ids.visible.encode("ascii")),))
        accounting = getattr(getattr(channel.site, "resource", None), "accounting", None)
        if accounting is not None:
            accounting.rejected(
                route, status, "", "", self.received, request_id=ids.gateway, client_request_id=ids.client,
                method=(channel._command or b"-").decode("latin-1"),
                client=getattr(self.getClientAddress(), "host", "") or "",
            )

    def _route(self) -> bytes:
        path = (getattr(self.channel, "_path", b"") or b"").split(b"?", 1)[0]
        if len(path) > 1:
            path = path.rstrip(b"/") or b"/"
        return path

    def _hold(self, n: int) -> bool:
        budget = self.channel.site.budget
        if not budget.take(n):
            return False
        self._budget = budget
        self._held += n
        return True

    def _release(self) -> None:
        if self._held and self._budget is not None:
            self._budget.give(self._held)
            self._held = 0


class GatewayChannel(http.HTTPChannel):
    """
    HTTP/1.1 with deadlines and strict framing.

    Deadlines: the whole header block within C{headerDeadline} seconds of
    the connection (or of the end of the previous response), the whole body
    within C{bodyDeadline} of the headers; 408 and close otherwise (a
    connection that sent nothing is closed without a response, as an idle
    keep-alive connection is).

    Framing: a bare LF, obs-fold, a bad chunk size, too long a line or too
    many headers are answered (400, 414, 431) and closed at once, where
    Twisted would wait for a CRLF, close without a word, or read on.
    """

    headerDeadline = HEADER_DEADLINE
    bodyDeadline = BODY_DEADLINE
    MAX_LENGTH = MAX_LINE_BYTES
    totalHeadersSize = MAX_HEAD_BYTES
    maxHeaders = MAX_HEADERS
    _deadline: Any = None  # when the current deadline passes (a time)
    # Whether a byte of the next request has arrived since the header
    # deadline was armed.
    _heard = False
    # Whether the channel has answered with an error and is closing: read
    # nothing more.
    _answered = False
    _lost = False

    # Writes held by cork() until uncork(): a list, or None when not corked.
    _corked: Optional[list[bytes]] = None

    # -- corking -------------------------------------------------------------

    def cork(self) -> None:
        """
        Hold this channel's writes until L{uncork}: the relay corks around
        what it writes in one go (the status line and the first events; the
        last events and the chunked terminator), so that they leave in one
        send instead of one each (the transport writes through at once).
        """
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        """Send what was held since L{cork}, as one write."""
        held, self._corked = self._corked, None
        if held and self.transport is not None:
            self.transport.write(b"".join(held))

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        held = self._corked
        if held is None:
            super().writeHeaders(version, code, reason, headers)
            return
        # HTTPChannel.writeHeaders, into the held list (Request always
        # passes a Headers, whose values are already sanitized).
        held.extend((version, b" ", code, b" ", reason, b"\r\n"))
        for name, values in headers.getAllRawHeaders():
            for value in values:
                held.extend((name, b": ", value, b"\r\n"))
        held.append(b"\r\n")

    def write(self, data: bytes) -> None:
        held = self._corked
        if held is None:
            self.transport.write(data)
        elif data:
            held.append(data)

    def writeSequence(self, iovec: Any) -> None:
        held = self._corked
        if held is None:
            self.transport.writeSequence(iovec)
        else:
            held.extend(iovec)

    def connectionMade(self) -> None:
        # Writes sent at once when nothing is queued (llmgate.ops.sendnow).
        sendnow.adopt(self.transport)
        super().connectionMade()
        self._arm(self.headerDeadline)

    # -- deadlines -----------------------------------------------------------

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

    def _too_slow(self) -> None:
        if self.transport is None or self._answered:
            return
        if self.line_mode and not self._heard:
            # Nothing of a request: close quietly, as for an idle keep-alive
            # connection (a 408 there could be read as the answer to a
            # request the client is just sending).
            self._answered = True
            self._close()
            return
        if not self.line_mode and not self._handlingRequest and self.requests:
            # Headers in, body too slow: a request, so a ledger record.
            self.requests[-1]._refuse(408, "the request body was not received in time", "request_timeout")
            return
        self.refuse(408, "the request headers were not received in time", "request_timeout")

    # -- parsing -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        if data:
            self._heard = True
        super().dataReceived(data)
        if self.line_mode and not self._answered and b"\n" in self._buffer:
            # An unfinished line holding a LF: lines end with a bare LF, and
            # the CRLF Twisted waits for may never come.
            self.refuse(400, "request lines must end with CRLF, not a bare LF", "bad_line_ending")

    def lineReceived(self, line: bytes) -> None:
        if self._answered:
            return
        if b"\n" in line or b"\r" in line:
            self.refuse(400, "request lines must end with CRLF, not a bare LF or CR", "bad_line_ending")
            return
        if line[:1] in (b" ", b"\t"):
            # obs-fold: joined or not, another parser on the way may see a
            # different Content-Length or Transfer-Encoding than we do.
            self.refuse(400, "header lines may not start with whitespace (obsolete line folding)", "obs_fold")
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self.refuse(431, f"the request line and headers exceed {self.totalHeadersSize} bytes", "headers_too_large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted closes here without a response.
        if self._receivedHeaderSize:
            self.refuse(431, f"a header line exceeds {self.MAX_LENGTH} bytes", "headers_too_large")
        else:
            self.refuse(414, f"the request line exceeds {self.MAX_LENGTH} bytes", "uri_too_long")

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self.refuse(431, f"more than {self.maxHeaders} header fields", "headers_too_large")
            return False
        return bool(super().headerReceived(line))

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        ok = bool(super()._maybeChooseTransferDecoder(header, data))
        if ok and type(self._transferDecoder) is _ChunkedTransferDecoder:
            request = self.requests[-1]
            self._transferDecoder = _StrictChunkedDecoder(
                request.handleContentChunk, self._finishRequestBody, request.maxBody
            )
        return ok

    def rawDataReceived(self, data: bytes) -> None:
        if self._answered:
            return
        try:
            super().rawDataReceived(data)
        except _ChunkTooLarge:
            self.requests[-1].too_large()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's: a bare status line with no length or body.
        self.refuse(400, "malformed HTTP request", "bad_request")

    def refuse(self, status: int, message: str, code: Optional[str] = None, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """
        Answer C{status} with an error body in the dialect of the request's
        route (OpenAI when unknown), then close: used for everything refused
        before a request reaches the resource.
        """
        if self._answered or self.transport is None:
            return
        self._answered = True
        self._disarm()
        path = (getattr(self, "_path", b"") or b"").split(b"?", 1)[0]
        body = dialects.error_body(dialects.kind_for_path(path), status, message, code=code)
        head = [
            b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        head.extend(b"%s: %s" % kv for kv in headers)
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._close()

    def _close(self) -> None:
        # Twisted's idle timer has nothing left to time.
        self.setTimeout(None)
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            # Half-close: the answer and a FIN go out, and what the client
            # still sends (the body we refused) is read and dropped, never
            # kept, until it closes or LINGER passes. Closing with its bytes
            # unread would reset the connection, and a reset can destroy the
            # answer before the client reads it.
            self._networkProducer.unregisterProducer()
            transport.loseWriteConnection()
            delay = LINGER
        else:
            self.loseConnection()
            delay = self.abortTimeout
        if self._abortingCall is None:
            self._abortingCall = self.callLater(delay, self._abort)

    def _abort(self) -> None:
        # Quietly: under a flood of refused uploads, a log line per
        # connection would be the flood's echo.
        self._abortingCall = None
        if self.transport is not None:
            self.transport.abortConnection()

    # -- request cycle -------------------------------------------------------

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        if self._answered:
            return
        if self.length == 0:
            self._disarm()
        else:
            self._arm(self.bodyDeadline)

    def _send100Continue(self) -> None:
        # Never invite the body of a request already refused.
        if self._answered:
            return
        super()._send100Continue()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # The response is whole: what a relay held goes out before the
        # channel closes or reads the next request.
        self.uncork()
        if self.persistent and not self._lost:
            # The next request's headers are due this long after the end of
            # this response.
            self._heard = False
            self._arm(self.headerDeadline)
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._lost = True
        self._corked = None
        self._disarm()
        super().connectionLost(reason)
        # A body decoder left mid-body (a refused upload) calls back into
        # this channel: a reference cycle Twisted leaves for the collector.
        self._transferDecoder = None


class GatewaySite(server.Site):
    """
    The Site for the gateway: plain HTTP/1.1 channels with deadlines,
    bodies capped one by one and together, no tracebacks to clients, and no
    Combined Log lines (the gateway writes its own access log).

    @param max_body: the largest request body accepted, in bytes.
    @param max_buffered: the most bytes of request bodies being received at
        once, across all connections; beyond it a request is answered 503.
    """

    displayTracebacks = False

    def __init__(self, resource: Any, reactor: Any, max_body: int, max_buffered: int = MAX_BUFFERED_BYTES) -> None:
        limit = max_body

        class _Request(GatewayRequest):
            maxBody = limit

        # timeout=None: no idle timer of Twisted's. It restarts on every byte
        # (no defence against a trickle) and would cut a body that pauses a
        # minute without a response; the deadlines below cover every phase.
        super().__init__(resource, requestFactory=_Request, reactor=reactor, timeout=None)
        self.protocol = GatewayChannel
        self.clock = reactor
        self.budget = BodyBudget(max_buffered)
        # Channels with a header or body deadline running, swept once a
        # second while the site listens.
        self.waiting: set[GatewayChannel] = set()
        self._sweep = Periodic(reactor, 1.0, self._check_deadlines)
        # Requests copy this from the site (Twisted >= 25): bodies are JSON,
        # so skip the form parsing whose content-type parse goes through the
        # email package on every POST (10% of the CPU at 1,000 streams).
        self._parsePOSTFormSubmission = False

    def log(self, request: Any) -> None:
        pass

    def startFactory(self) -> None:
        super().startFactory()
        self._sweep.start_timer()

    def stopFactory(self) -> None:
        self._sweep.stop_timer()
        super().stopFactory()

    def _check_deadlines(self) -> None:
        now = self.clock.seconds()
        for channel in list(self.waiting):
            channel.check(now)

# -*- test-case-name: tests.relay.test_stream,tests.relay.test_decode,tests.relay.test_redact -*-
"""
The relay: one upstream attempt of a client request, its body streamed to
the client as it arrives.

Where a relay is lives in one field, L{Relay.phase} (the moves in
L{_MOVES}). While routing may still act on the attempt after a 200 event
stream's headers (another attempt could follow, or a hedge races it), the
relay is GATED: the status line and the first events are held (bounded)
until the first content event, then go out together
(L{llmgate.relay.gate}); an Anthropic error event or a lost connection
before that is a failure before the first byte, handed to routing.

The upstream body transport is registered as the client request's streaming
producer, so a client that stops reading pauses the upstream read (memory
stays flat whatever the speed gap). A client that goes away cancels the
pending upstream Deferred or stops the upstream transport at once, in every
phase, so nobody pays for tokens no one reads. An upstream that fails after
the status line went out never looks like success: no synthetic C{[DONE]},
an in-band error event instead, and the partial event it cut off is dropped.

What the upstream sends is not trusted: a body compressed although identity
was asked for is decoded (gzip, deflate) or refused with a 502, so the client
and the accounting see the same plain bytes; an error (non-2xx) body is held
whole, up to L{MAX_ERROR_BODY}, and relayed with the provider's secrets
redacted, as are all relayed response headers.
"""

from __future__ import annotations

import re
import time
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol as TypingProtocol

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.server import Request as _ServerRequest
from zope.interface import implementer

from llmgate import dialects
from llmgate.config import Provider, Timeouts
from llmgate.ops.nextturn import NextTurn
from llmgate.relay.client import ResponseHeadersTooLarge
from llmgate.relay.decode import DECODABLE, BodyDecoder, DecodeError, content_encoding
from llmgate.relay.gate import CONTENT, ERROR, MAX_HELD, WAIT, Gate, error_message
from llmgate.relay.headers import copy_response_headers, release
from llmgate.relay.redact import redactor_for

log = Logger(namespace="llmgate.relay.stream")

# An upstream error body is held whole (to redact it) up to this size; a
# larger one is answered with a 502. Provider error bodies are well under 1 KiB.
MAX_ERROR_BODY = 64 * 1024

# Statuses that mean "this deployment could not answer now": another one
# may, and nothing reached the client yet (L{llmgate.routing.attempts}).
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})


def retry_after(headers: Headers) -> Optional[float]:
    """The seconds of a C{retry-after: N} header (an HTTP date is ignored)."""
    raw = headers.getRawHeaders(b"retry-after")
    if not raw:
        return None
    try:
        value = float(raw[0])
    except ValueError:
        return None
    return value if value >= 0 and value == value and value != float("inf") else None


def _is_sse(response: Any) -> bool:
    ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    return ctype.lower().startswith(b"text/event-stream")


class Attempts(TypingProtocol):
    """
    Told about the outcome of the relay's upstream attempt before anything
    reached the client (L{llmgate.routing.attempts.Attempts}).
    """

    def attempt_failed(self, relay: "Relay", status: int, phase: str, message: str, retry_after: Optional[float]) -> bool:
        """The attempt failed; True if another attempt takes the client over."""

    def attempt_answered(self, relay: "Relay") -> None:
        """
        The attempt is the client's answer (the upstream answered with a
        status that is not retried, or a gated stream reached its first
        content): no other attempt may follow, other attempts stop.
        """

    def gate(self, relay: "Relay") -> bool:
        """
        Whether routing may still act on this attempt, whose 200 event
        stream headers just came in: then the relay holds them and the
        first events until the first content (L{llmgate.relay.gate}).
        """


# -- the relay's phases ------------------------------------------------------
# Where one relay's exchange is; L{Relay._enter} is the only place that
# changes it, and L{_MOVES} says which moves exist.
NEW = "new"
# The upstream request is out; no response headers yet.
CONNECTING = "connecting"
# A 200 event stream's headers are in, but routing may still act (another
# attempt, a hedge): nothing was sent to the client; events are held until
# the first content event (L{llmgate.relay.gate}).
GATED = "gated"
# The response is this attempt's: the client gets what the upstream sends.
STREAMING = "streaming"
# The client's response is complete (or its connection was aborted); the
# upstream body may still be draining.
FINISHED = "finished"
# The client went away before its response was complete.
GONE = "gone"
# Recorded: nothing more happens.
ENDED = "ended"
# Another attempt took the client over (a retry, or the hedge that won):
# this relay writes and records nothing more.
DETACHED = "detached"

_MOVES: dict[str, frozenset[str]] = {
    NEW: frozenset({CONNECTING}),
    CONNECTING: frozenset({GATED, STREAMING, FINISHED, GONE, ENDED, DETACHED}),
    GATED: frozenset({STREAMING, FINISHED, GONE, ENDED, DETACHED}),
    STREAMING: frozenset({FINISHED, GONE, ENDED}),
    FINISHED: frozenset({GONE, ENDED}),
    GONE: frozenset({ENDED, DETACHED}),
    ENDED: frozenset(),
    DETACHED: frozenset(),
}
# The phases in which the relay still answers the client.
_RELAYING = frozenset({CONNECTING, GATED, STREAMING})
# The phases in which the client is gone or its response is over.
_OVER = frozenset({FINISHED, GONE, ENDED, DETACHED})


# Any line end followed by a line end: the blank line that ends an SSE event.
_BLANK_LINE = re.compile(rb"(?:\r\n|\r|\n)(?:\r\n|\r|\n)")


def event_boundary(data: bytes) -> int:
    """
    The index just past the last complete SSE event in C{data} (0 if none).

    Upstreams almost always send whole events ending in C{\\n\\n}, so that is
    checked first in constant time.
    """
    if data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n"):
        return len(data)
    if b"\r" not in data:
        i = data.rfind(b"\n\n")
        return i + 2 if i >= 0 else 0
    end = 0
    for m in _BLANK_LINE.finditer(data):
        end = m.end()
    return end


def _chunking_channel(request: Any) -> Any:
    """
    The client channel that L{Relay._send} frames body chunks for itself,
    or L{None} when Twisted's C{Request.write} must keep doing it.

    Once a twisted.web request has written its head on a chunked HTTP/1.1
    response, C{Request.write} does this for every chunk: check that the
    request is not finished nor disconnected, count the bytes, frame the
    chunk (a tuple of four pieces) and hand it to the channel's
    C{writeSequence}, which joins it again. The relay writes the same
    bytes in one call to the channel (still corked or written through as
    the channel decides). Only for a plain C{server.Request} (no C{write}
    of its own, no content encoder, not a HEAD or a body-less status,
    whose head leaves C{chunked} unset): anything else keeps Twisted's path.
    """
    if (
        type(request).write is _ServerRequest.write
        and request.startedWriting
        and request.chunked
        and not request.finished
        and getattr(request, "_encoder", None) is None
        and not getattr(request, "_inFakeHead", False)
    ):
        return getattr(request, "channel", None)
    return None


class Coalescer(NextTurn["Relay"]):
    """
    Holds each stream's client writes until the end of the current reactor
    turn, so the events one read brought for a stream leave in one chunk
    and one send instead of one per event. Nothing waits longer than the
    turn that read it: the flush runs before the reactor next polls. Under
    light load a read holds one event and this changes nothing; under heavy
    load reads hold several, and the savings grow with the load.
    """

    __slots__ = ()

    def __init__(self, clock: Any) -> None:
        super().__init__(clock, _end_turn)


def _end_turn(relay: "Relay") -> None:
    relay.end_turn()


class ActiveRelays:
    """
    The relays in flight, as a set kept in L{BUCKETS} parts by object
    identity, so the L{Watchdog} can check one part at a time.

    Checking every open stream in one go stopped the reactor for up to
    3 ms of CPU once a second at 5,000 streams; a part per tick stops it
    for about an eighth of that (1 ms measured), and each relay is still
    checked once a second. Parts by identity, not by a snapshot taken once a second: a
    snapshot would keep ended relays (and the request objects they hold)
    alive for up to a second.
    """

    BUCKETS = 8  # a power of two
    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[set[Any]] = [set() for _ in range(self.BUCKETS)]

    def _part(self, relay: Any) -> set[Any]:
        # Ids of objects of one size step by that size (a plain modulo put
        # 1,000 relays in two of eight parts): Fibonacci hashing mixes the
        # id's bits first.
        return self._parts[((id(relay) >> 4) * 0x9E3779B1 >> 16) & (self.BUCKETS - 1)]

    def add(self, relay: Any) -> None:
        self._part(relay).add(relay)

    def discard(self, relay: Any) -> None:
        self._part(relay).discard(relay)

    def __contains__(self, relay: Any) -> bool:
        return relay in self._part(relay)

    def __len__(self) -> int:
        return sum(map(len, self._parts))

    def __bool__(self) -> bool:
        return any(self._parts)

    def __iter__(self) -> Any:
        for part in self._parts:
            yield from part

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ActiveRelays):
            return set(self) == set(other)
        if isinstance(other, (set, frozenset)):
            return set(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ActiveRelays({set(self)!r})"

    def part(self, index: int) -> set[Any]:
        """Part C{index} (modulo L{BUCKETS}): the live set, not a copy."""
        return self._parts[index & (self.BUCKETS - 1)]


class Watchdog(Service):
    """
    One timer for the timeouts of every relay in flight: each relay is
    checked about once a second. A DelayedCall per stream (set, reset and
    cancelled per request) cost a fifth of the request set-up in heap
    operations with a few thousand streams; the check costs a method call
    per open stream per second, and a timeout fires at most one interval
    late.

    The interval is split into one tick per part of L{ActiveRelays}, each
    checking that part, so no tick holds the reactor for all the open
    streams at once.
    """

    def __init__(self, clock: Any, relays: ActiveRelays, interval: float = 1.0) -> None:
        self._relays = relays
        self._parts = relays.BUCKETS
        self._interval = interval
        self._next = 0
        self._loop = LoopingCall.withCount(self._sweep)
        self._loop.clock = clock
        self._clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval / self._parts, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _sweep(self, ticks: int = 1) -> None:
        # Ticks the reactor could not run on time (a busy or suspended
        # process) are made up for: every part they owed is checked.
        now = self._clock.seconds()
        for _ in range(min(max(ticks, 1), self._parts)):
            due = list(self._relays.part(self._next))
            self._next = (self._next + 1) % self._parts
            for relay in due:
                try:
                    relay.check(now)
                except Exception:
                    log.failure("timeout check failed")


class Counter(TypingProtocol):
    """
    What the relay feeds while it relays (L{llmgate.accounting.recorder.RequestCounter}):
    C{relay} every chunk of whole events (or body bytes) it is about to
    write, getting back what to write (without what the client did not ask
    for); C{feed} an unterminated last event at the end. The relay's
    framer is the only one that looks for event ends on the hot path.
    C{terminal}: the stream's terminal event (C{[DONE]}, C{message_stop},
    C{response.completed}) was fed.
    """

    sse: bool
    terminal: bool

    def relay(self, data: bytes) -> bytes: ...

    def feed(self, data: bytes) -> None: ...


@dataclass(slots=True)
class Exchange:
    """
    Everything known about one relayed request when it ends: the input of
    the usage ledger and the access log.
    """

    request_id: str
    wall_start: float
    started: float
    key_name: str
    endpoint: dialects.Endpoint
    model: str
    provider: Provider
    upstream_model: str
    # The parsed request body; once an attempt answered, the bytes sent
    # upstream instead (no objects for the collector to walk while the
    # stream is open: llmgate.routing.attempts).
    body: "dict[str, Any] | bytes"
    bytes_in: int
    streamed: bool
    counter: Optional[Counter] = None
    status: int = 0
    outcome: str = "completed"
    phase: Optional[str] = None
    error: Optional[str] = None
    first_byte_at: Optional[float] = None
    ended: Optional[float] = None
    bytes_out: int = 0
    upstream_request_id: Optional[str] = None
    # The client's own valid x-request-id, if it sent one (request_id is
    # always the gateway's unique id), and the client's address.
    client_request_id: Optional[str] = None
    client: str = ""
    # When the upstream's response headers arrived, and when the first
    # relayed bytes were written to the client (first_byte_at is when the
    # upstream read that brought them arrived): for the latency metrics.
    headers_at: Optional[float] = None
    first_write_at: Optional[float] = None
    # Which upstream attempt this is (L{llmgate.routing}); a failed
    # attempt's own record names the client-facing request as its parent.
    attempt: int = 1
    parent_request_id: Optional[str] = None
    # A hedge (a second attempt racing the first) was started for it.
    hedged: bool = False
    # The latency the gateway adds to later chunks (coalesced writes after
    # the first): the worst and the sum over the stream, and how many, kept
    # in plain numbers here and observed once when the request ends (not
    # per write, which would take a metric's lock on the hot path).
    added_max: float = 0.0
    added_sum: float = 0.0
    added_n: int = 0

    @property
    def ttft(self) -> Optional[float]:
        if self.first_byte_at is None:
            return None
        return self.first_byte_at - self.started

    @property
    def duration(self) -> float:
        return (self.ended or self.started) - self.started


def new_exchange(request_id: Optional[str] = None, **kw: Any) -> Exchange:
    # 128 random bits as hex, like uuid4().hex without building a UUID.
    return Exchange(request_id=request_id or os.urandom(16).hex(), wall_start=time.time(), **kw)


class _BodyRelay(Protocol):
    """
    Receives the upstream body and hands each piece to the relay: its
    C{dataReceived} is the relay's C{body_data} itself (no call of its own
    per read).
    """

    def __init__(self, relay: "Relay") -> None:
        self._relay = relay
        self.dataReceived = relay.body_data  # type: ignore[method-assign]

    def connectionMade(self) -> None:
        self._relay.body_started(self.transport)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The body is over: nothing here is needed again, and the upstream
        # transport may refer back to this protocol (a reference cycle).
        relay, self._relay = self._relay, None
        del self.dataReceived
        self.transport = None
        relay.body_ended(reason)


@implementer(IPushProducer)
class _Throttle:
    """
    The upstream body transport as the client request's producer, noting
    when the client's backpressure holds it paused (so a paused stream is
    not mistaken for a stalled upstream).
    """

    __slots__ = ("_transport", "_relay")

    def __init__(self, transport: Any, relay: "Relay") -> None:
        self._transport = transport
        self._relay = relay

    def pauseProducing(self) -> None:
        self._relay._paused_at = self._relay.clock.seconds()
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        relay = self._relay
        relay._paused_at = None
        relay._last_data = relay.clock.seconds()
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._transport.stopProducing()


class _Discard(Protocol):
    """Drops an unwanted upstream body and closes its connection at once."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The transport may refer back to this protocol (a reference cycle).
        self.transport = None


class Relay:
    """
    Relays one request to one upstream and its response back.

    @param request: the client's L{twisted.web.server.Request}.
    @param http: a treq L{HTTPClient} bound to the gateway's own pool.
    @param clock: an C{IReactorTime}: timestamps for TTFT and the timeouts
        that the L{Watchdog} enforces through L{check}.
    @param done: called once with the finished L{Exchange}.
    """

    __slots__ = (
        "_attempts",
        "_started",
        "_coalescer",
        "_corked",
        "_queued",
        "_cut_message",
        "_cut_quota",
        "_decoder",
        "_done",
        "_err_body",
        "_err_len",
        "_held",
        "_held_len",
        "_last_data",
        "_max_event",
        "_out",
        "_out_since",
        "_paused_at",
        "_pending_d",
        "_phase",
        "_gate",
        "_gate_held",
        "_gate_len",
        "_response",
        "_producing",
        "_sse",
        "_headers_late",
        "_upstream",
        "_wire",
        "clock",
        "exchange",
        "http",
        "request",
        "timeouts",
    )

    def __init__(
        self,
        request: Any,
        http: Any,
        clock: Any,
        timeouts: Timeouts,
        exchange: Exchange,
        done: Callable[[Exchange], None],
        max_event_bytes: int = 1 << 20,
        coalescer: Optional["Coalescer"] = None,
        attempts: Optional[Attempts] = None,
    ) -> None:
        self.request = request
        # Asked before a failure is relayed whether another attempt takes
        # over; L{None} when this is the only attempt.
        self._attempts = attempts
        # Where the exchange is (see L{_enter}): the only phase state.
        self._phase = NEW
        # While GATED: the scanner, the events held and their size, and the
        # upstream response whose status line and headers wait with them.
        self._gate: Optional[Gate] = None
        # (A list only while GATED: no allocation per ungated request.)
        self._gate_held: Any = ()
        self._gate_len = 0
        self._response: Any = None
        self._started = exchange.started
        self.http = http
        self.clock = clock
        self.timeouts = timeouts
        self.exchange = exchange
        self._done = done
        self._max_event = max_event_bytes
        self._pending_d: Any = None
        self._upstream: Any = None
        self._last_data = 0.0
        self._headers_late = False
        # Why the gateway itself cut the exchange short, if it did.
        self._cut_message: Optional[str] = None
        # Set when the gateway cut the stream for its key's budget.
        self._cut_quota = False
        self._sse = False
        self._held: list[bytes] = []
        self._held_len = 0
        self._producing = False
        self._paused_at: Optional[float] = None
        self._coalescer = coalescer
        self._out: list[bytes] = []
        self._out_since = 0.0
        # In the coalescer's list for the end of this turn.
        self._queued = False
        # The client channel corked by this relay (see _cork), if any.
        self._corked: Any = None
        # Set when the upstream body came compressed anyway.
        self._decoder: Optional[BodyDecoder] = None
        # An upstream error (non-2xx) body, held until its end to be redacted.
        self._err_body: Optional[list[bytes]] = None
        self._err_len = 0
        # The client channel body chunks are framed for (see _send), once
        # the head went out on a chunked response.
        self._wire: Any = None

    # -- phases ------------------------------------------------------------

    @property
    def phase(self) -> str:
        """Where the exchange is (C{NEW}, C{CONNECTING}, ... C{DETACHED})."""
        return self._phase

    def _enter(self, phase: str) -> None:
        """
        Move to C{phase}. A move L{_MOVES} does not list is a bug: logged,
        and not made (staying put is safer than a made-up phase).
        """
        if phase == self._phase:
            return
        if phase not in _MOVES[self._phase]:
            log.error("relay phase {old} cannot move to {new}", old=self._phase, new=phase)
            return
        self._phase = phase

    # -- start -------------------------------------------------------------

    def start(self, url: str, headers: Headers, body: bytes) -> None:
        # notifyFinish must be asked for before anything can finish the
        # request (a late call never fires).
        if self.exchange.attempt > 1:
            # A later attempt's headers timeout runs from its own start.
            self._started = self.clock.seconds()
        self._enter(CONNECTING)
        self.request.notifyFinish().addBoth(self._request_finished)
        d = self.http.request(
            "POST",
            url,
            headers=headers,
            data=body,
            unbuffered=True,
            allow_redirects=False,
        )
        self._pending_d = d
        d.addCallbacks(self._got_response, self._request_failed)
        d.addErrback(self._internal_error)

    def _headers_timeout(self) -> None:
        self._headers_late = True
        if self._pending_d is not None:
            self._pending_d.cancel()

    # -- upstream response -------------------------------------------------

    def _got_response(self, response: Any) -> None:
        self._pending_d = None
        ex = self.exchange
        ex.headers_at = self.clock.seconds()
        ex.status = response.code
        rid = response.headers.getRawHeaders(
            b"x-request-id"
        ) or response.headers.getRawHeaders(b"request-id")
        if rid:
            ex.upstream_request_id = rid[0].decode("latin-1")
        if self._phase is not CONNECTING:
            response.deliverBody(_Discard())
            self._record()
            return
        gated = False
        if self._attempts is not None:
            code = response.code
            if code not in RETRYABLE_STATUSES:
                gated = code == 200 and ex.streamed and _is_sse(response) and self._attempts.gate(self)
                if not gated:
                    self._attempts.attempt_answered(self)
            elif self._try_again(
                code, "headers", f"upstream answered {code}",
                retry_after(response.headers) if code in (429, 503) else None,
            ):
                # Its error body is not wanted: close that connection.
                response.deliverBody(_Discard())
                return
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        is_sse = ctype.lower().startswith(b"text/event-stream")
        if ex.streamed and response.code == 200 and not is_sse:
            response.deliverBody(_Discard())
            self._fail(
                502,
                "upstream answered a streaming request with "
                + (ctype.decode("latin-1") or "no content type"),
                "headers",
            )
            return
        if response.code in (401, 403):
            # The provider refused the gateway's own key: the client did
            # nothing wrong, and the body may quote part of that key.
            response.deliverBody(_Discard())
            log.warn(
                "provider {provider} refused the gateway's credential with {status}",
                provider=ex.provider.name,
                status=response.code,
            )
            self._fail(502, "the provider refused the gateway's credential", "headers", retry=False)
            return
        encoding = content_encoding(response.headers)
        if encoding is not None:
            if encoding not in DECODABLE:
                # Relayed as is, the client would get bytes it cannot read
                # (labelled as identity) and the ledger no tokens.
                response.deliverBody(_Discard())
                name = redactor_for(ex.provider.api_key)(encoding[:40]).decode("latin-1")
                self._fail(502, "upstream sent a body in an encoding the gateway cannot decode: " + name, "headers")
                return
            self._decoder = BodyDecoder(encoding)
        error = not 200 <= response.code < 300
        if error:
            # Held to its end and redacted: providers quote keys and
            # organization ids in error messages.
            self._err_body = []
            is_sse = False
        self._sse = is_sse
        if ex.counter is not None:
            ex.counter.sse = is_sse
        self._last_data = self.clock.seconds()
        if gated:
            # Nothing goes to the client before the first content: the
            # status line waits with the events (see L{_through_gate}).
            self._enter(GATED)
            self._gate = Gate(ex.endpoint.kind == "anthropic")
            self._gate_held = []
            self._response = response
            response.deliverBody(_BodyRelay(self))
            return
        self._enter(STREAMING)
        self._respond(response, is_sse)
        if response.code != 200:
            # An upstream error is relayed untouched but counted as no usage.
            ex.counter = None
            ex.outcome = "upstream_error"
            ex.phase = "headers"
        response.deliverBody(_BodyRelay(self))

    def _respond(self, response: Any, is_sse: bool) -> None:
        """Set the client's status line and headers from the upstream's."""
        ex = self.exchange
        req = self.request
        req.setResponseCode(response.code, response.phrase or None)
        copy_response_headers(response.headers, req.responseHeaders, redactor_for(ex.provider.api_key))
        if is_sse:
            req.responseHeaders.setRawHeaders(b"cache-control", [b"no-cache"])
            req.responseHeaders.setRawHeaders(b"x-accel-buffering", [b"no"])
            # Send the status line in this reactor turn: the SDK returns
            # from create() on it. With the coalescer it is held to the end
            # of the turn, so the events that came in the same read leave
            # with it, in one send.
            if self._coalescer is not None and self._cork():
                req.write(b"")
                self._queue()
            else:
                req.write(b"")
            self._wire = _chunking_channel(req)
            # The head is written: nothing reads these again, and the
            # stream may be open for minutes (see L{release}). Replaced
            # rather than emptied: an emptied dict stays tracked until a
            # collection of its generation looks at it again. The request's
            # path lists served the resource lookup, long done.
            req.responseHeaders = Headers()
            req.cookies = req.prepath = req.postpath = req.sitepath = ()
        # Copied: the upstream's head is not read again either.
        release(response.headers)

    # -- the first-content gate ----------------------------------------------

    def _through_gate(self, data: bytes) -> bytes:
        """
        Hold C{data} (whole events) while GATED; what to relay now: nothing
        while only preamble came, everything held once content came (or
        more than L{MAX_HELD} bytes of preamble): the attempt commits. An
        Anthropic C{error} event before any content is this attempt's
        failure before the first byte: another attempt takes over if
        routing allows, else it is relayed as before.
        """
        self._gate_held.append(data)
        self._gate_len += len(data)
        verdict = self._gate.scan(data) if self._gate is not None else CONTENT
        if verdict is WAIT and self._gate_len <= MAX_HELD:
            return b""
        if verdict is ERROR and self._try_again(self.exchange.status, "body", error_message(data), None):
            self.let_go()
            return b""
        return self._commit()

    def _commit(self) -> bytes:
        """
        The attempt becomes the client's answer: routing is told (a hedge
        racing it stops), the status line and headers are set, and the held
        events are returned to be relayed with them, in one write.
        """
        held = b"".join(self._gate_held)
        self._gate_held = ()
        self._gate_len = 0
        self._gate = None
        if self._attempts is not None:
            self._attempts.attempt_answered(self)
        self._enter(STREAMING)
        response, self._response = self._response, None
        self._respond(response, True)
        if self._upstream is not None:
            self._register(self._upstream)
        return held

    def let_go(self) -> bytes:
        """
        Another attempt took the client over (a retry after an error event,
        or a hedge that reached content first): stop this one's upstream at
        once, write and record nothing. What it held is returned (the
        ledger estimates a hedge loser's cost from it).
        """
        held = b"".join(self._gate_held)
        self._gate_held = ()
        self._gate_len = 0
        self._gate = None
        self._response = None
        if self._phase in (CONNECTING, GATED, GONE):
            # (GONE: the client left while attempts raced; the router
            # records this one now.)
            self._enter(DETACHED)
        self._attempts = None
        self._done = None
        if self._pending_d is not None:
            d, self._pending_d = self._pending_d, None
            d.cancel()
        self._abort_upstream()
        return held

    def _request_failed(self, failure: Failure) -> None:
        self._pending_d = None
        if self._phase is not CONNECTING:
            self._record()
            return
        if self._cut_message is not None:
            self._fail(503, self._cut_message, "headers")
            return
        if self._headers_late:
            status, message, phase = 504, "upstream sent no response headers in time", "headers"
        elif failure.check(TxTimeoutError):
            status, message, phase = 504, "timed out connecting to the upstream", "connect"
        elif failure.check(ConnectError, DNSLookupError, ConnectingCancelledError):
            status, message, phase = 502, "upstream unreachable", "connect"
        elif failure.check(ResponseFailed) and any(
            r.check(ResponseHeadersTooLarge) for r in failure.value.reasons
        ):
            log.warn(
                "provider {provider} sent response headers over the caps",
                provider=self.exchange.provider.name,
            )
            status, message, phase = 502, "upstream response headers too large", "headers"
        else:
            status, message, phase = 502, "upstream request failed", "headers"
        if not self._try_again(status, phase, message, None):
            self._fail(status, message, phase)

    def _try_again(self, status: int, phase: str, message: str, after: Optional[float]) -> bool:
        """
        Whether another attempt takes over from this failed one (nothing
        was written to the client yet): then this relay lets go of the
        request and records nothing (the router records the attempt).
        """
        attempts, self._attempts = self._attempts, None
        if attempts is None or self._phase not in _RELAYING or self._cut_message is not None:
            return False
        if not attempts.attempt_failed(self, status, phase, message, after):
            return False
        self._enter(DETACHED)
        self._done = None
        return True

    def _internal_error(self, failure: Failure) -> None:
        log.failure("relay error", failure)
        self._abort_upstream()
        if self._phase in _RELAYING:
            try:
                self._fail(500, "internal gateway error", self.exchange.phase or "body")
            except Exception:
                self._abort_client()
        self._record()

    def _fail(self, status: int, message: str, phase: str, retry: bool = True) -> None:
        """Answer with a gateway error in the route's dialect."""
        if self._attempts is not None:
            # This attempt answers the client now (e.g. cut short at
            # shutdown while a hedge raced it): the other one stops.
            self._attempts.attempt_answered(self)
        ex = self.exchange
        ex.status = status
        ex.outcome = "upstream_error"
        ex.phase = phase
        ex.error = message
        ex.counter = None
        req = self.request
        body = dialects.error_body(ex.endpoint.kind, status, message)
        req.setResponseCode(status)
        req.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        req.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        if not retry:
            # The SDKs retry every 5xx unless told otherwise.
            req.responseHeaders.setRawHeaders(b"x-should-retry", [b"false"])
        req.write(body)
        ex.bytes_out += len(body)
        self._finish()
        self._record()

    # -- body --------------------------------------------------------------

    def body_started(self, transport: Any) -> None:
        self._upstream = transport
        if self._phase is GONE or self._phase is DETACHED:
            transport.stopProducing()
            return
        if self._phase is GATED:
            # Registered as the client's producer at the commit (the
            # held bytes are bounded by MAX_HELD).
            return
        self._register(transport)

    def _register(self, transport: Any) -> None:
        try:
            self.request.registerProducer(_Throttle(transport, self), True)
            self._producing = True
        except AttributeError:
            # The channel is gone: the client left in the meantime.
            transport.stopProducing()
            return

    def body_data(self, data: bytes) -> None:
        self._last_data = self.clock.seconds()
        if self._phase in _OVER or self._cut_message is not None:
            # Stopping the upstream does not stop the rest of a read that
            # is already being parsed.
            return
        if self._decoder is not None:
            try:
                data = self._decoder.decode(data)
            except DecodeError as e:
                self._cut(str(e))
                return
            if not data:
                return
        if self._err_body is not None:
            self._err_len += len(data)
            if self._err_len > MAX_ERROR_BODY:
                self._err_body = None
                self._cut(f"upstream error body larger than {MAX_ERROR_BODY} bytes")
                return
            self._err_body.append(data)
            return
        if self._sse:
            # Most reads are whole events ending in a blank line, with
            # nothing held from before: relayed as they are.
            if self._held or data[-2:] != b"\n\n":
                data = self._whole_events(data)
                if not data:
                    return
            if self._phase is GATED:
                data = self._through_gate(data)
                if not data:
                    return
        self._relay_events(data)

    def _relay_events(self, data: bytes) -> None:
        """Relay C{data} (whole events, or body bytes) to the client."""
        ex = self.exchange
        counter = ex.counter
        if counter is not None:
            data = counter.relay(data)
            if not data:
                return
        if ex.first_byte_at is None:
            ex.first_byte_at = self._last_data
        ex.bytes_out += len(data)
        if self._coalescer is None:
            if ex.first_write_at is None:
                ex.first_write_at = self.clock.seconds()
            self._send(data)
            return
        if not self._queued:
            self._queued = True
            self._coalescer.add(self)
        out = self._out
        if not out:
            # The read that starts this turn's chunk: its wait is the chunk's.
            self._out_since = self._last_data
        out.append(data)

    def _queue(self) -> None:
        if not self._queued:
            self._queued = True
            self._coalescer.add(self)  # type: ignore[union-attr]

    def _cork(self) -> bool:
        """
        Hold the client channel's writes (L{GatewayChannel.cork}) until
        L{_uncork}; False if the channel cannot (gone, or a test double).
        """
        if self._corked is not None:
            return True
        channel = getattr(self.request, "channel", None)
        if channel is None or getattr(channel, "cork", None) is None:
            return False
        channel.cork()
        self._corked = channel
        return True

    def _uncork(self) -> None:
        channel, self._corked = self._corked, None
        if channel is not None:
            channel.uncork()

    def end_turn(self) -> None:
        """The reactor turn ends (the L{Coalescer}): send what it relayed."""
        self._queued = False
        self.flush()
        if self._corked is not None:
            self._uncork()

    def flush(self) -> None:
        """Write what this turn's reads relayed, as one chunk."""
        out = self._out
        if not out:
            return
        # The same list for the stream's life: a new one per flush would be
        # a young object per stream per event for the collector to walk.
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self._phase in _OVER:
            return
        ex = self.exchange
        if ex.first_write_at is None:
            ex.first_write_at = self.clock.seconds()
        else:
            # -- added latency of later chunks (Exchange.added_max) --
            added = self.clock.seconds() - self._out_since
            ex.added_sum += added
            ex.added_n += 1
            if added > ex.added_max:
                ex.added_max = added
        self._send(data)

    def _send(self, data: bytes) -> None:
        """
        Write body bytes to the client: framed here as one chunk once the
        head is out on a chunked response (see L{_chunking_channel}), else
        through the request. A request that finished or lost its
        connection meanwhile goes back to C{Request.write}, which raises
        after a finish and drops what is written to a lost connection.
        """
        wire = self._wire
        req = self.request
        if wire is None:
            req.write(data)
            self._wire = _chunking_channel(req)
            return
        if req.finished or req.channel is not wire:
            self._wire = None
            req.write(data)
            return
        if data:
            req.sentLength += len(data)
            wire.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _whole_events(self, data: bytes) -> bytes:
        """
        The complete events that C{data} finishes; the rest is held. Only
        the new bytes (and the held tail a line end may span) are searched,
        so a large event arriving in many reads costs linear time.
        """
        held = self._held
        if not held:
            cut = event_boundary(data)
            if cut == len(data):
                return data
            if cut:
                held.append(data[cut:])
                self._held_len = len(data) - cut
                return data[:cut]
            held.append(data)
            self._held_len = len(data)
        else:
            tail = held[-1][-3:]
            cut = event_boundary(tail + data) - len(tail)
            if cut > 0:
                held.append(data[:cut])
                out = b"".join(held)
                held.clear()
                rest = data[cut:]
                self._held_len = 0
                if rest:
                    return out + self._whole_events(rest)
                return out
            held.append(data)
            self._held_len += len(data)
        if self._held_len > self._max_event:
            held.clear()
            self._held_len = 0
            self._cut("upstream event larger than the event size cap")
        return b""

    def _cut(self, message: str) -> None:
        """Stop the upstream; L{body_ended} then tells the client why."""
        if self._cut_message is None:
            self._cut_message = message
        self._abort_upstream()

    def body_ended(self, reason: Failure) -> None:
        # The last events and the chunked terminator leave in one send.
        corked = self._phase is not GONE and self._cork()
        try:
            self._body_ended(reason)
        finally:
            if corked:
                self._uncork()

    def _body_ended(self, reason: Failure) -> None:
        if self._phase is GATED:
            if (
                self._cut_message is None
                and not reason.check(ResponseDone, PotentialDataLoss)
                and self._try_again(self.exchange.status, "body", "upstream connection lost before any content", None)
            ):
                self.let_go()
                self._upstream = None
                return
            held = self._commit()
            if held:
                self._relay_events(held)
        self.flush()
        self._upstream = None
        if self._producing:
            self._producing = False
            try:
                self.request.unregisterProducer()
            except AttributeError:
                # The channel is gone (the client left): Twisted's Request
                # would keep the producer, a reference cycle back to us.
                self.request.producer = None
        if self._phase is DETACHED:
            # Another attempt has the client (and recorded this one).
            return
        if self._phase is GONE:
            self._record()
            return
        if self._cut_message is not None:
            self._truncated(self._cut_message)
        elif reason.check(ResponseDone) or (
            reason.check(PotentialDataLoss) and self._looks_complete()
        ):
            if self._decoder is not None and not self._decoder.complete:
                self._truncated("upstream compressed body ended early")
            elif self._err_body is not None:
                self._relay_error_body()
            else:
                self._relay_end()
        else:
            self._truncated("upstream connection lost mid-stream")
        self._record()

    def _relay_error_body(self) -> None:
        """The held upstream error body, redacted, with its own length."""
        ex = self.exchange
        body = redactor_for(ex.provider.api_key)(b"".join(self._err_body or ()))
        self._err_body = None
        req = self.request
        req.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        if ex.first_byte_at is None:
            ex.first_byte_at = self.clock.seconds()
        ex.bytes_out += len(body)
        req.write(body)
        self._finish()

    def _relay_end(self) -> None:
        """A clean end of a relayed body."""
        if self._held:
            # An unterminated last event: relay it as is; the client's
            # decoder decides, as it would direct.
            ex = self.exchange
            tail = b"".join(self._held)
            self._held.clear()
            if ex.counter is not None:
                ex.counter.feed(tail)
            ex.bytes_out += len(tail)
            self._send(tail)
        self._finish()

    def _looks_complete(self) -> bool:
        """
        Whether a body that ended at connection close (no length, no
        chunking: a clean end and a reset look the same) was whole: for an
        event stream, only if its terminal event was seen.
        """
        counter = self.exchange.counter
        if not self._sse or counter is None:
            return True
        return bool(counter.acc.complete)

    def _truncated(self, message: str) -> None:
        """
        The upstream failed after the status line went out: make that
        visible to the client and never look complete.
        """
        ex = self.exchange
        # A budget cut is the gateway's doing, not the upstream's.
        ex.outcome = "gateway_error" if self._cut_quota else "upstream_error"
        ex.phase = "body"
        ex.error = message
        self._abort_upstream()
        if self._phase in _OVER:
            return
        self.flush()
        if self._sse:
            self._held.clear()
            event = dialects.stream_error_event(ex.endpoint.kind, message, quota=self._cut_quota)
            ex.bytes_out += len(event)
            self._send(event)
            self._finish()
        elif ex.bytes_out == 0 and not self.request.startedWriting:
            self._fail(502, message, "body")
        else:
            # A JSON body cut short: only a broken connection says so.
            self._abort_client()

    # -- timers ------------------------------------------------------------

    def check(self, now: float) -> None:
        """
        Enforce this exchange's timeouts; the L{Watchdog} calls it about
        once a second. Waiting for headers: the headers timeout. Paused by
        the client's backpressure: the write-stall timeout (a paused stream
        is the client's stall, not the upstream's). Otherwise: the idle gap
        between upstream bytes. A long stream is never cut for its length.
        """
        if self._phase not in _RELAYING and self._phase is not FINISHED:
            return
        t = self.timeouts
        if self._pending_d is not None:
            if now - self._started >= t.headers:
                self._headers_timeout()
            return
        if self._upstream is None:
            return
        if self._paused_at is not None:
            if now - self._paused_at >= t.write_stall:
                ex = self.exchange
                ex.outcome, ex.phase, ex.error = "client_cancelled", "body", "client stopped reading"
                self._abort_client()
            return
        if now - self._last_data >= t.idle:
            self._cut("upstream stalled mid-stream")

    def abort(self, message: str) -> None:
        """
        Cut the exchange short from the gateway's side (at shutdown): the
        client gets an error in its dialect, the upstream is closed, and the
        exchange is recorded.
        """
        if self._phase not in _RELAYING and self._phase is not FINISHED:
            return
        self._cut_message = message
        if self._pending_d is not None:
            self._pending_d.cancel()
        elif self._upstream is not None:
            self._abort_upstream()

    # -- the budget cut-off (llmgate.policy.cutoff) --
    def cut_for_budget(self, message: str) -> bool:
        """
        End a stream being relayed because its key's budget ran out: the
        upstream is closed and the client gets the dialect's error event
        (an insufficient_quota / rate_limit_error), no terminal event and
        no C{[DONE]}.  Only an event stream whose body is flowing is cut
        (a JSON body cannot be ended visibly).  Whether it was.
        """
        if self._phase not in _RELAYING and self._phase is not FINISHED or self._upstream is None or not self._sse or self._cut_message is not None:
            return False
        self._cut_quota = True
        self._cut(message)
        return True

    # -- the client side ---------------------------------------------------

    def _request_finished(self, result: Any) -> None:
        if not isinstance(result, Failure) or self._phase in (DETACHED, GONE):
            # (A detached relay's attempt is over: its exchange is the
            # next attempt's now.)
            return
        # The client went away before we finished: stop paying for it.
        was = self._phase
        if was is not ENDED:
            self._enter(GONE)
        ex = self.exchange
        if was in _RELAYING and not self._terminal_relayed():
            ex.outcome = "client_cancelled"
            ex.phase = (
                "body"
                if self._upstream is not None or ex.status
                else ("headers" if self._pending_d is not None else "connect")
            )
        if self._pending_d is not None:
            d, self._pending_d = self._pending_d, None
            d.cancel()
        self._abort_upstream()

    def _terminal_relayed(self) -> bool:
        """
        Whether the stream's terminal event was written to the client: then
        it is complete even if the client closes before the upstream's end
        of body reaches us (the openai SDK closes as soon as it reads
        C{[DONE]}). Everything fed to the counter is written once the
        coalesced output is empty.
        """
        counter = self.exchange.counter
        return counter is not None and getattr(counter, "terminal", False) and not self._out

    def _abort_upstream(self) -> None:
        up = self._upstream
        if up is not None:
            up.stopProducing()

    def _abort_client(self) -> None:
        if self._phase in _RELAYING:
            self._enter(FINISHED)
        channel = getattr(self.request, "channel", None)
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def _finish(self) -> None:
        if self._phase not in _RELAYING:
            return
        self._enter(FINISHED)
        self._wire = None
        self.request.finish()

    def _record(self) -> None:
        if self._phase in (ENDED, DETACHED):
            return
        self._enter(ENDED)
        self._wire = None
        self.exchange.ended = self.clock.seconds()
        # The callback usually refers back to this relay: let go of it.
        done, self._done = self._done, None
        if done is not None:
            done(self.exchange)

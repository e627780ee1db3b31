"""
In-memory doubles for unit tests: an upstream HTTP client whose responses
the test drives by hand, and a front-side client speaking HTTP/1.1 to a
Site over a StringTransport.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from llmgate import config as configmod
from llmgate.accounting.recorder import Accounting
from llmgate.edge.site import GatewaySite
from llmgate.api.resource import GatewayResource


@implementer(IPushProducer)
class FakeBodyTransport:
    """
    Stands for treq's TransportProxyProducer: records pause/resume/stop and,
    like the real one, ends the body with a failure when stopped: not at
    once, but on a later reactor turn (stopProducing is the TCP transport's
    loseConnection, and connectionLost comes from the reactor after it).
    C{clock} is set by L{FakeHTTP} when the response is delivered.
    """

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.stopped = False
        self.protocol: Any = None
        self.response: Any = None
        self.clock: Any = None

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.response is not None:
            self.clock.callLater(0, self.response.lost, Failure(ResponseFailed([Failure(ConnectionDone())])))


class FakeResponse:
    def __init__(self, code: int = 200, headers: Optional[dict[bytes, list[bytes]]] = None, phrase: bytes = b"OK") -> None:
        self.code = code
        self.phrase = phrase
        self.headers = Headers(headers or {})
        self.transport = FakeBodyTransport()
        self.transport.response = self
        self.protocol: Any = None
        self.ended = False

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lost(self, reason: Failure) -> None:
        """The body ends with C{reason}, once: a body never ends twice."""
        if self.ended:
            return
        self.ended = True
        # As treq's transport does, let go of the response once it ended.
        self.transport.response = None
        self.protocol.connectionLost(reason)

    def end(self) -> None:
        self.lost(Failure(ResponseDone()))

    def fail(self) -> None:
        self.lost(Failure(ResponseFailed([Failure(ConnectionLost())])))


SSE_HEADERS = {b"content-type": [b"text/event-stream; charset=utf-8"]}


class FakeHTTP:
    """
    A treq-like client: each request returns a Deferred the test fires. A
    L{FakeResponse} fired into it gets the clock its stopped body ends on.
    """

    def __init__(self, clock: Any = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.clock = clock

    def _bind(self, response: Any) -> Any:
        if isinstance(response, FakeResponse):
            response.transport.clock = self.clock
        return response

    def request(self, method: str, url: str, **kw: Any) -> Deferred[Any]:
        call: dict[str, Any] = {"method": method, "url": url, **kw, "cancelled": False}

        def cancel(d: Deferred[Any]) -> None:
            call["cancelled"] = True

        d: Deferred[Any] = Deferred(cancel)
        d.addCallback(self._bind)
        call["deferred"] = d
        self.calls.append(call)
        return d


def next_turn(clock: Any) -> Any:
    """
    An C{in_thread} runner for L{Accounting} as production's thread pool
    behaves for the caller: the result arrives on a later reactor turn,
    never before the call returns (run it with C{clock.advance(0)}).
    """

    def run(f: Any, *a: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()

        def call() -> None:
            try:
                result = f(*a)
            except BaseException:
                d.errback(Failure())
            else:
                d.callback(result)

        clock.callLater(0, call)
        return d

    return run


class RecordingAccounting(Accounting):
    """The real sink, remembering the exchanges it got."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock, in_thread=next_turn(clock))
        self.exchanges: list[Any] = []

    def finished(self, ex: Any) -> None:
        super().finished(ex)
        self.exchanges.append(ex)


def make_config(**doc: Any) -> configmod.Config:
    base: dict[str, Any] = {
        "providers": {
            "oai": {"kind": "openai", "base_url": "http://up.test/v1", "api_key_env": "OAI_KEY", "default": True},
            "ant": {"kind": "anthropic", "base_url": "http://ant.test", "api_key_env": "ANT_KEY", "default": True},
        },
        "models": {"public-model": {"provider": "oai", "upstream_model": "real-model"}},
    }
    base.update(doc)
    return configmod.parse(base, {"OAI_KEY": "sk-upstream-oai", "ANT_KEY": "sk-ant-upstream", "GW_KEY": "gw-secret"})


class Gateway:
    """
    A GatewayResource on a Site over in-memory transports, configured as
    C{twistd llmgate} runs it: writes coalesced to the end of the reactor
    turn (run the turn with C{clock.advance(0)}).
    """

    def __init__(self, cfg: Optional[configmod.Config] = None, max_body: Optional[int] = None, coalesce: bool = True) -> None:
        self.clock = MemoryReactorClock()
        self.cfg = cfg or make_config()
        self.http = FakeHTTP(self.clock)
        self.accounting = RecordingAccounting(self.clock)
        self.resource = GatewayResource(self.cfg, self.http, self.clock, self.accounting, coalesce=coalesce)
        self.resource.watchdog.startService()
        self.site = GatewaySite(self.resource, self.clock, max_body or self.cfg.max_body_bytes)
        self.site.doStart()

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def post(self, path: str, body: Any, headers: Optional[dict[str, str]] = None, raw: Optional[bytes] = None) -> tuple[Any, StringTransport]:
        channel, transport = self.connect()
        data = raw if raw is not None else json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        channel.dataReceived(head.encode() + b"\r\n" + data)
        return channel, transport


def parse_response(raw: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes, bool]:
    """
    Status, headers (lower-cased), de-chunked body and whether the body was
    complete (final zero-length chunk or full Content-Length seen).
    """
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        body = b""
        complete = False
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                complete = True
                break
            body += rest[:size]
            rest = rest[size + 2:]
        return status, headers, body, complete
    if b"content-length" in headers:
        n = int(headers[b"content-length"][0])
        return status, headers, rest[:n], len(rest) >= n
    return status, headers, rest, False

# -*- test-case-name: tests.relay.test_client -*-
"""
The gateway's own HTTP client for upstream providers.

treq's module-level API shares one global pool bound to the global reactor
and buffers whole responses; a proxy needs its own pool (closed when the
service stops), Nagle off on every upstream socket, no cookie jar shared
between clients, and request bodies written without a cooperator.
"""

from __future__ import annotations

import weakref
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

from treq.client import HTTPClient
from treq.response import _Response
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet import endpoints
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    URI,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.python.failure import Failure
from twisted.web._newclient import BODY, HEADER, HTTP11ClientProtocol, HTTPClientParser, Response, _ensureValidURI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from llmgate.ops import sendnow
from llmgate.relay.chunked import ChunkedDecoder


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written in one call: no cooperator
    task, no global reactor, and a known length for C{Content-Length}.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        # Written once (a POST is never retried on another connection):
        # the request object that holds this producer lives as long as the
        # response, a whole stream, and need not keep the body with it.
        body, self._body = self._body, b""
        consumer.write(body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _unwrap(proto: Any) -> bool:
    """
    Take the endpoint's C{_WrappingProtocol} out of a connected
    connection's read path: the TCP transport calls C{proto} (or, over TLS,
    the TLS protocol under it) itself.

    The wrapper only tells the endpoint's caller when the connection is
    made; from then on it passes every read, close and half-close straight
    on (and provides the same interfaces as the protocol it wraps): a call
    per read on every upstream connection for nothing. Whether it was taken
    out; a Twisted whose wrapper looks different is left as it is.
    """
    wrapper_type = getattr(endpoints, "_WrappingProtocol", None)
    inner = proto
    transport = getattr(proto, "transport", None)
    for _ in range(3):
        if transport is None:
            return False
        # The instance's own attribute: a TLS protocol passes unknown
        # attributes on to its transport (ProtocolWrapper.__getattr__).
        outer = getattr(transport, "__dict__", {}).get("protocol")
        if outer is not None:
            if type(outer) is wrapper_type and getattr(outer, "_wrappedProtocol", None) is inner:
                transport.protocol = inner
                return True
            return False
        # Over TLS the protocol's transport is the TLS protocol, which the
        # TCP transport under it calls through the wrapper.
        inner, transport = transport, getattr(transport, "transport", None)
    return False


@implementer(IStreamClientEndpoint)
class _NoDelayEndpoint:
    """
    Wraps an endpoint and tunes what it connects: Nagle off, so a request
    written in two pieces (head, body) is not held back for a delayed ACK;
    writes sent at once rather than a reactor turn later
    (L{llmgate.ops.sendnow}), so a request reaches the upstream in the turn
    that started it; and the endpoint's wrapper taken out of the read path
    (L{_unwrap}).
    """

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self._inner = inner

    def connect(self, factory: Any) -> Deferred[Any]:
        def nodelay(proto: Any) -> Any:
            try:
                proto.transport.setTcpNoDelay(True)
            except (AttributeError, OSError):
                pass
            sendnow.adopt(proto.transport)
            _unwrap(proto)
            return proto

        return self._inner.connect(factory).addCallback(nodelay)


class _EndpointFactory:
    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        ep: IStreamClientEndpoint
        if isIPAddress(host):
            # No name to resolve: skip HostnameEndpoint, whose every connect
            # resolves in a thread and builds classes on the fly.
            ep = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            ep = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            ep = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            ep = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), ep)
        return _NoDelayEndpoint(ep)


class _NoCookies(CookieJar):
    """
    A jar that never stores or sends anything. One client serves every
    gateway user, so an upstream's cookie must never be replayed on another
    user's request; and treq always wraps its agent in a CookieAgent, whose
    per-request jar work this skips.
    """

    def __init__(self) -> None:
        super().__init__(DefaultCookiePolicy(allowed_domains=[]))

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


class ProxyHTTPClient(HTTPClient):
    """
    treq's client with a fast path for what the relay asks: an unbuffered,
    non-redirected request with bytes for a body and an ASCII URL.

    treq's general path wraps every request in a redirect agent, a cookie
    agent (a fresh cookie jar per request), a gzip-decoding agent that asks
    upstreams to compress event streams, and a full IRI parse of the URL:
    about a fifth of the gateway's CPU per request, and each layer either
    unused or unwanted in a proxy. The response is still treq's.
    """

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._targets: dict[str, tuple[Any, Any, Any, bytes, bytes]] = {}

    def request(self, method: str, url: Any, **kw: Any) -> Deferred[Any]:
        headers = kw.pop("headers", None)
        data = kw.pop("data", None)
        unbuffered = kw.pop("unbuffered", False)
        redirects = kw.pop("allow_redirects", True)
        if kw or not unbuffered or redirects or not isinstance(url, str) or not isinstance(data, (bytes, type(None))):
            return super().request(
                method, url, headers=headers, data=data, unbuffered=unbuffered, allow_redirects=redirects, **kw
            )
        agent = self._agent
        target = self._targets.get(url)
        if target is None:
            target = self._target(url)
        uri, endpoint, key, host, path = target
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            # The relay's headers are built fresh for each request: add the
            # Host in place, where Agent would copy them first.
            headers.addRawHeader(b"host", host)
        d = agent._requestWithEndpoint(
            key,
            endpoint,
            method.encode("ascii"),
            uri,
            headers,
            None if data is None else BytesProducer(data),
            path,
        )
        return d.addCallback(_Response, self._cookiejar)

    # Upstream URLs seen (providers x routes): a handful; the cap only
    # bounds a configuration that would make them unbounded.
    _MAX_TARGETS = 512

    def _target(self, url: str) -> tuple[Any, Any, Any, bytes, bytes]:
        """
        The parsed URL, its endpoint (with its TLS options), pool key, Host
        value and request path (origin form): what Agent.request works out
        again for every request, kept per upstream URL.
        """
        agent = self._agent
        raw = _ensureValidURI(url.encode("ascii").strip())
        uri = URI.fromBytes(raw)
        endpoint = agent._getEndpoint(uri)
        key = (uri.scheme, uri.host, uri.port)
        host = agent._computeHostValue(uri.scheme, uri.host, uri.port)
        target = (uri, endpoint, key, host, uri.originForm)
        targets = self._targets
        if len(targets) >= self._MAX_TARGETS:
            targets.clear()
        targets[url] = target
        return target


# Caps on an upstream response head (status line, header lines, the blank
# line): the defaults of Envoy (60 KiB, 100 headers) and HAProxy, which both
# answer a response over them with 502. Twisted's own parser has none: it
# bounds one line (16 KiB) but not their number or total.
MAX_RESPONSE_HEADER_BYTES = 64 * 1024
MAX_RESPONSE_HEADERS = 100


class ResponseHeadersTooLarge(Exception):
    """An upstream response head went over the header caps."""


def _chunked_decoder(deliver: Any, finish: Any) -> ChunkedDecoder:
    """
    A L{ChunkedDecoder} for a response body that hands its payload to the
    body protocol directly once the response is connected to one.

    C{deliver} is C{Response._bodyDataReceived}, whose stateful dispatcher
    looks its state's method up by name for every read, to call the body
    protocol's C{dataReceived}. The relay connects its protocol before the
    first body byte is read, and once a response is connected only the end
    of its body (after which the decoder is handed nothing) changes that:
    so the first payload that finds it connected points the decoder at the
    body protocol's C{dataReceived} for good. Before that, Twisted's method
    runs (it buffers for a protocol not yet delivered).
    """
    decoder = ChunkedDecoder(deliver, finish)
    response = getattr(deliver, "__self__", None)
    if isinstance(response, Response):
        # Weak: the decoder holds this function, which must not hold the
        # decoder (a reference cycle for the collector).
        ref = weakref.ref(decoder)

        def data(chunk: bytes) -> None:
            if response._state == "CONNECTED":
                sink = response._bodyProtocol.dataReceived
                held = ref()
                if held is not None:
                    held.dataCallback = sink
                sink(chunk)
            else:
                deliver(chunk)

        decoder.dataCallback = data
    return decoder


class _CappedParser(HTTPClientParser):
    """
    Twisted's response parser with caps on the head, and the headers that
    the upstream's C{Connection} header names removed from the response
    (they describe its hop only; Twisted files C{Connection} itself apart,
    so the relay could not see those names).

    Raising from the parser makes L{HTTP11ClientProtocol.dataReceived} give
    up the connection (closed, never pooled) and fail the request with
    L{ResponseFailed} wrapping L{ResponseHeadersTooLarge}.
    """

    max_bytes = MAX_RESPONSE_HEADER_BYTES
    max_headers = MAX_RESPONSE_HEADERS
    # Event streams come chunked: decoded a read at a time (relay/chunked.py).
    _transferDecoders = {b"chunked": _chunked_decoder}
    # Class defaults: the instance is a plain HTTPClientParser whose class
    # is swapped before its first byte (see _CappedClientProtocol). Counts
    # run over interim 1xx heads too, so endless 100s are bounded as well.
    _head_bytes = 0
    _head_fields = 0

    def lineReceived(self, line: bytes) -> None:
        self._head_bytes += len(line) + 1
        if self.state == HEADER and line not in (b"", b"\r") and line[:1] not in b" \t":
            self._head_fields += 1
        if self._head_bytes > self.max_bytes:
            raise ResponseHeadersTooLarge(f"upstream response head over {self.max_bytes} bytes")
        if self._head_fields > self.max_headers:
            raise ResponseHeadersTooLarge(f"upstream response over {self.max_headers} headers")
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted would close quietly, which the relay could only call a
        # failed request.
        raise ResponseHeadersTooLarge(f"upstream response header line over {self.MAX_LENGTH} bytes")

    def _finished(self, rest: bytes) -> None:
        super()._finished(rest)
        # The body decoder calls back into this parser: a reference cycle
        # per response that only the collector would free.
        self.bodyDecoder = None

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.bodyDecoder = None

    def allHeadersReceived(self) -> None:
        for value in self.connHeaders.getRawHeaders(b"connection", ()):
            for token in value.split(b","):
                token = token.strip()
                if token:
                    self.headers.removeHeader(token)
        # The parser's transport is Twisted's TransportProxyProducer around
        # the connection's.
        transport = getattr(self.transport, "_producer", None)
        hold = getattr(transport, "holdPauses", None)
        if hold is None:
            super().allHeadersReceived()
            return
        # Twisted pauses the connection until the response's body has a
        # reader, and the relay gives it one before this call returns: the
        # pause is held, and that resume cancels it (no epoll_ctl pair).
        hold()
        try:
            super().allHeadersReceived()
        finally:
            transport.releasePauses()


class _CappedClientProtocol(HTTP11ClientProtocol):
    """
    L{HTTP11ClientProtocol} parsing each response with L{_CappedParser}.

    Twisted builds its parser inside C{request()} from a module-level name,
    with no hook; the parser it built has seen no byte when C{request()}
    returns (bytes only come from a later reactor read), so its class is
    swapped there for the capped subclass, which adds no state of its own.
    """

    def request(self, request: Any) -> Deferred[Any]:
        transport = self.transport
        hold = getattr(transport, "holdWrites", None)
        if hold is None:
            d = super().request(request)
        else:
            # The head and the in-memory body leave in one send.
            hold()
            try:
                d = super().request(request)
            finally:
                transport.releaseWrites()
        parser = self._parser
        if type(parser) is HTTPClientParser:
            parser.__class__ = _CappedParser
        if self._state == "WAITING":
            # Written whole (the body is in memory): the request object is
            # kept until the response ends, its headers are not read again
            # (see llmgate.relay.headers.release; replaced, not emptied:
            # an emptied dict stays tracked until a collection looks at it).
            request.headers = Headers()
        return d

    def dataReceived(self, data: bytes) -> None:
        """
        Body bytes go straight to the body decoder: Twisted's path to it
        (the parser's C{dataReceived}, the line receiver's buffer loop in
        raw mode, C{rawDataReceived}) does nothing else for them once the
        head is parsed and nothing is buffered, and it ran for every event.
        Anything else (the head, or a parser mid-call) takes Twisted's path.
        """
        parser = self._parser
        if (
            parser is not None
            and parser.state == BODY
            and not parser._buffer
            and not parser._busyReceiving
            and not parser.paused
        ):
            try:
                parser.bodyDecoder.dataReceived(data)
            except BaseException:
                self._giveUp(Failure())
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        transport = self.transport
        super().connectionLost(reason)
        _release_connector(transport)


def _release_connector(transport: Any) -> None:
    """
    Break the reference cycles Twisted leaves around every closed outgoing
    TCP connection (transport and connector refer to each other, and so do
    the connector and the endpoint's wrapping factory), so that an upstream
    connection closing (a reset, a cancelled request) leaves no garbage for
    the cyclic collector. Called from the protocol's C{connectionLost}: the
    connector's own C{connectionLost}, which runs next, uses neither link.
    """
    connector = getattr(transport, "connector", None)
    if connector is None:
        return
    if getattr(connector, "transport", None) is transport:
        connector.transport = None
    factory = getattr(connector, "factory", None)
    if getattr(factory, "_connector", None) is connector:
        factory._connector = None


def _closing(transport: Any) -> bool:
    """
    Whether a connection is on its way out: closed, or asked to close
    (C{loseConnection}, or C{stopProducing}, which is C{loseConnection} on
    a TCP transport) or to abort (C{abortConnection} flags TCP with
    C{_aborting} and TLS with C{_aborted}; neither sets C{disconnecting}).
    """
    return (
        transport is None
        or bool(getattr(transport, "disconnecting", False))
        or bool(getattr(transport, "disconnected", False))
        or bool(getattr(transport, "_aborting", False))
        or bool(getattr(transport, "_aborted", False))
    )


def _pool_unless_closing(put_back: Any) -> Any:
    """
    Wrap the pool's quiescent callback so a connection being closed is
    never put back as idle.

    The relay closes an upstream connection to throw a body away (an HTML
    answer to a stream request, a 401/403, a client gone after the
    headers). When the rest of that body came in the same read, Twisted's
    protocol still parses it to the end, calls the connection quiescent
    and hands it to the pool, which would give the closing connection to
    the next request: that one fails with C{ResponseNeverReceived} and,
    with C{retryAutomatically} off, the client gets a 502. Such a
    connection is left out of the pool; its close goes on.
    """

    def quiescent(protocol: HTTP11ClientProtocol) -> None:
        if _closing(protocol.transport):
            return
        put_back(protocol)

    return quiescent


class _QuietClientFactory(_HTTP11ClientFactory):
    # Twisted logs "Starting factory" for every new upstream connection:
    # a formatted repr per connection, 12% of the CPU while 200 streams
    # opened their connections.
    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _CappedClientProtocol(_pool_unless_closing(self._quiescentCallback))


class UpstreamClient(Service):
    """
    Owns the connection pool and the treq client; closing the service
    closes the pool's idle connections.
    """

    def __init__(self, reactor: Any, connect_timeout: float = 5.0, max_idle: int = 1024) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        # maxPersistentPerHost caps idle cached connections, not concurrency:
        # size it for bursts of thousands of streams finishing together.
        self.pool.maxPersistentPerHost = max_idle
        self.pool.cachedConnectionTimeout = 60
        self.pool.retryAutomatically = False
        self.pool._factory = _QuietClientFactory
        agent = Agent.usingEndpointFactory(
            reactor, _EndpointFactory(reactor, connect_timeout), pool=self.pool
        )
        self.http = ProxyHTTPClient(
            agent, cookiejar=_NoCookies(), data_to_body_producer=BytesProducer
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.pool.closeCachedConnections()

"""The gateway's upstream client: treq without the layers a proxy must not have."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from twisted.web.client import ResponseDone, ResponseFailed

from llmgate.ops import sendnow

from llmgate.relay.client import (
    BytesProducer,
    ResponseHeadersTooLarge,
    UpstreamClient,
    _CappedClientProtocol,
    _NoCookies,
    _QuietClientFactory,
)


class _CountingEndpoints:
    """An endpoint factory that counts what it is asked."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def endpointForURI(self, uri: Any) -> Any:
        self.asked.append(uri.toBytes())
        return object()


class RecordingAgent(Agent):
    """Twisted's Agent up to the pool: records each request it would send."""

    def __init__(self) -> None:
        self.endpoints = _CountingEndpoints()
        super().__init__(MemoryReactorClock())
        self._endpointFactory = self.endpoints
        self.calls: list[tuple[Any, ...]] = []

    def _requestWithEndpoint(
        self, key: Any, endpoint: Any, method: bytes, parsedURI: Any, headers: Any, bodyProducer: Any, requestPath: bytes
    ) -> Deferred[Any]:
        self.calls.append((method, parsedURI.toBytes(), headers, bodyProducer, key, endpoint, requestPath))
        return Deferred()


class ProxyClientTests(SynchronousTestCase):
    def test_fast_path_goes_straight_to_the_agent(self) -> None:
        """
        The relay's unbuffered, non-redirected requests reach the agent as
        given: no cookie, redirect or gzip agents in between, and no
        Accept-Encoding added (event streams must not be compressed).
        """
        client = UpstreamClient(MemoryReactorClock())
        # The agent the client really holds is treq's plain Agent: a wrapper
        # built in (cookies, redirects, gzip) would sit inside it and be
        # replaced, unseen, by the recording agent below.
        self.assertIs(type(client.http._agent), Agent)
        agent = RecordingAgent()
        client.http._agent = agent
        h = Headers({b"x-a": [b"1"]})
        client.http.request("POST", "http://up.test/v1/x", headers=h, data=b"{}", unbuffered=True, allow_redirects=False)
        [(method, uri, headers, producer, key, _, path)] = agent.calls
        self.assertEqual((method, uri, path, key), (b"POST", b"http://up.test/v1/x", b"/v1/x", (b"http", b"up.test", 80)))
        self.assertIs(headers, h)
        self.assertFalse(headers.hasHeader(b"accept-encoding"))
        self.assertEqual(headers.getRawHeaders(b"host"), [b"up.test"])
        self.assertEqual(producer.length, 2)

    def test_endpoint_once_per_upstream(self) -> None:
        """
        The endpoint (and its TLS options) of an upstream URL is made once
        and reused by later requests to it; another URL gets its own.
        """
        client = UpstreamClient(MemoryReactorClock())
        agent = RecordingAgent()
        client.http._agent = agent
        for url in ("https://up.test/v1/x", "https://up.test/v1/x", "https://up.test:8443/v1/x"):
            client.http.request("POST", url, headers=Headers(), data=b"{}", unbuffered=True, allow_redirects=False)
        self.assertEqual(agent.endpoints.asked, [b"https://up.test/v1/x", b"https://up.test:8443/v1/x"])
        first, second, third = agent.calls
        self.assertIs(first[5], second[5])
        self.assertIsNot(first[5], third[5])
        self.assertEqual([c[2].getRawHeaders(b"host") for c in agent.calls], [[b"up.test"], [b"up.test"], [b"up.test:8443"]])

    def test_request_path_once_per_upstream(self) -> None:
        """
        The request path (the URL's origin form) is worked out once per
        upstream URL, not per request, and each URL sends its own.
        """
        from twisted.web.client import URI

        made: list[bytes] = []
        origin = URI.originForm

        def counting(uri: Any) -> bytes:
            made.append(uri.path)
            return origin.fget(uri)  # type: ignore[attr-defined]

        self.patch(URI, "originForm", property(counting))
        client = UpstreamClient(MemoryReactorClock())
        agent = RecordingAgent()
        client.http._agent = agent
        for url in ("http://up.test/v1/x?a=1", "http://up.test/v1/x?a=1", "http://up.test/v1/y"):
            client.http.request("POST", url, headers=Headers(), data=b"{}", unbuffered=True, allow_redirects=False)
        self.assertEqual([c[6] for c in agent.calls], [b"/v1/x?a=1", b"/v1/x?a=1", b"/v1/y"])
        self.assertEqual(made, [b"/v1/x", b"/v1/y"])

    def test_body_producer_writes_once(self) -> None:
        """The body is written in one call with no cooperator."""
        t = StringTransport()
        d = BytesProducer(b"hello").startProducing(t)
        self.assertEqual(t.value(), b"hello")
        self.successResultOf(d)

    def test_body_producer_lets_go_of_the_body(self) -> None:
        """
        Once written, the producer holds no body: the request that keeps it
        lives as long as the response (a whole stream).
        """
        t = StringTransport()
        p = BytesProducer(b"hello")
        p.startProducing(t)
        self.assertEqual(t.value(), b"hello")
        self.assertEqual(p._body, b"")
        self.assertEqual(p.length, 5)

    def test_no_cookies_kept_or_sent(self) -> None:
        """One client serves all users: no upstream cookie is ever replayed."""
        from http.cookiejar import Cookie

        jar = _NoCookies()
        jar.set_cookie(Cookie(0, "s", "v", None, False, "up.test", True, False, "/", True, False, None, False, None, None, {}))

        class Req:
            headers: dict[str, str] = {}

            def add_unredirected_header(self, k: str, v: str) -> None:
                self.headers[k] = v

        r = Req()
        jar.add_cookie_header(r)
        self.assertEqual(r.headers, {})


def capped_connection() -> tuple[Any, StringTransport, Deferred[Any]]:
    """A pool connection's protocol over a StringTransport, with one request sent."""
    from twisted.web._newclient import Request

    proto = _QuietClientFactory(lambda p: None, None).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    d = proto.request(Request(b"POST", b"/v1/x", Headers({b"host": [b"up.test"]}), None, persistent=True))
    return proto, transport, d


def headers_too_large(failure: Any) -> bool:
    return any(r.check(ResponseHeadersTooLarge) for r in failure.value.reasons)


class ResponseHeaderCapTests(SynchronousTestCase):
    def test_pool_uses_the_capped_protocol(self) -> None:
        """The pool's connections parse responses with the header caps."""
        client = UpstreamClient(MemoryReactorClock())
        proto = client.pool._factory(lambda p: None, None).buildProtocol(None)
        self.assertIsInstance(proto, _CappedClientProtocol)

    def test_hundred_headers_pass(self) -> None:
        """A response with 100 headers is parsed as usual."""
        proto, t, d = capped_connection()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(99))
        proto.dataReceived(head + b"\r\n{}")
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders(b"x-h98"), [b"v"])
        self.assertFalse(t.disconnecting)

    def test_too_many_headers_fail_and_close(self) -> None:
        """
        Response 101 headers or more fail the request with
        ResponseHeadersTooLarge and close the connection (never pooled).
        """
        proto, t, d = capped_connection()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 200)
        f = self.failureResultOf(d, ResponseFailed)
        self.assertTrue(headers_too_large(f))
        self.assertTrue(t.disconnecting)

    def test_header_bytes_capped(self) -> None:
        """A head over 64 KiB in few headers fails the same way."""
        proto, t, d = capped_connection()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\n")
        for i in range(6):
            proto.dataReceived(b"X-Big%d: %s\r\n" % (i, b"v" * 12000))
        f = self.failureResultOf(d, ResponseFailed)
        self.assertTrue(headers_too_large(f))
        self.assertTrue(t.disconnecting)

    def test_one_huge_line_fails(self) -> None:
        """A 1 MB header line fails the request as too large, read in pieces."""
        proto, t, d = capped_connection()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nX-Huge: ")
        for _ in range(16):
            if t.disconnecting:
                break
            proto.dataReceived(b"v" * 65536)
        f = self.failureResultOf(d, ResponseFailed)
        self.assertTrue(headers_too_large(f))
        self.assertTrue(t.disconnecting)

    def test_endless_interim_responses_are_capped(self) -> None:
        """Interim 1xx heads count toward the caps, so an endless series ends."""
        proto, t, d = capped_connection()
        for _ in range(200):
            if t.disconnecting:
                break
            proto.dataReceived(b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n")
        f = self.failureResultOf(d, ResponseFailed)
        self.assertTrue(headers_too_large(f))

    def test_written_request_lets_go_of_its_headers(self) -> None:
        """
        A request written whole keeps no headers while its response streams
        (Twisted holds the request object until the response ends); the
        bytes on the wire still carry them all.
        """
        from twisted.web._newclient import Request

        proto = _QuietClientFactory(lambda p: None, None).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        headers = Headers({b"host": [b"up.test"], b"x-a": [b"1"], b"authorization": [b"Bearer sk-x"]})
        request = Request(b"POST", b"/v1/x", headers, BytesProducer(b"{}"), persistent=True)
        d = proto.request(request)
        wire = transport.value()
        self.assertIn(b"X-A: 1\r\n", wire)
        self.assertIn(b"Authorization: Bearer sk-x\r\n", wire)
        self.assertTrue(wire.endswith(b"\r\n\r\n{}"))
        self.assertEqual(list(request.headers.getAllRawHeaders()), [])
        # The response is read as before, and the connection kept.
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-B: 2\r\n\r\n{}")
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders(b"x-b"), [b"2"])
        self.assertFalse(transport.disconnecting)

    def test_headers_named_in_connection_are_removed(self) -> None:
        """
        Headers the upstream names in its Connection header describe its
        hop only and are not in the response the relay sees.
        """
        proto, t, d = capped_connection()
        proto.dataReceived(
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: 1\r\nX-Keep: 2\r\nContent-Length: 0\r\n\r\n"
        )
        response = self.successResultOf(d)
        self.assertFalse(response.headers.hasHeader(b"x-hop"))
        self.assertEqual(response.headers.getRawHeaders(b"x-keep"), [b"2"])

    def test_relay_answers_502_in_dialect(self) -> None:
        """
        The relay turns the failure into a 502 in the route's dialect naming
        the cause, recorded once as an upstream error.
        """
        import json

        from twisted.python.failure import Failure

        from tests.fakes import Gateway, parse_response

        gw = Gateway()
        _, t = gw.post("/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": []})
        gw.http.calls[0]["deferred"].errback(
            Failure(ResponseFailed([Failure(ResponseHeadersTooLarge("over"))]))
        )
        status, _, body, _ = parse_response(t.value())
        self.assertEqual(status, 502)
        err = json.loads(body)
        self.assertEqual(err["type"], "error")
        self.assertIn("headers too large", err["error"]["message"])
        [ex] = gw.accounting.exchanges
        self.assertEqual((ex.outcome, ex.phase), ("upstream_error", "headers"))


class TCPLikeTransport(StringTransport):
    """
    A StringTransport that closes the way a TCP connection does:
    C{stopProducing} is C{loseConnection} (as in
    L{twisted.internet.abstract.FileDescriptor}), and C{abortConnection}
    only sets C{_aborting} (as in L{twisted.internet.tcp.Connection}),
    leaving C{disconnecting} false. Like TCP, it lets the protocol pause
    and resume it after a close without raising.
    """

    _aborting = False

    def __init__(self) -> None:
        super().__init__(lenient=True)

    def stopProducing(self) -> None:
        self.loseConnection()

    def abortConnection(self) -> None:
        self._aborting = True


class CountingEndpoint:
    """Connects each factory's protocol to a new TCPLikeTransport, counting them."""

    def __init__(self) -> None:
        self.transports: list[TCPLikeTransport] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        from twisted.internet.defer import succeed

        proto = factory.buildProtocol(None)
        t = TCPLikeTransport()
        self.transports.append(t)
        proto.makeConnection(t)
        return succeed(proto)


class DiscardingBody:
    """
    A body consumer that throws the body away on its first bytes the way
    the relay does: by closing the upstream connection through the
    response's transport, with C{close(transport)}.
    """

    def __init__(self, close: Any) -> None:
        self._close = close
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        if self._close is not None:
            close, self._close = self._close, None
            close(self.transport)

    def connectionLost(self, reason: Any) -> None:
        pass


def abort_behind(proxy: Any) -> None:
    """
    Abort the connection behind a response's transport proxy (which has no
    abortConnection of its own), as code holding the real transport would.
    """
    proxy._producer.abortConnection()


HTML_200 = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n<html></html>"


class ClosedConnectionPoolingTests(SynchronousTestCase):
    """
    A connection the relay closed to throw a body away is never handed to
    the next request, even when the whole body was in the same read (so
    Twisted finished the response and called the connection quiescent).
    """

    def one_exchange(self, close: Any) -> tuple[UpstreamClient, CountingEndpoint]:
        """
        One request on the client's pool whose whole response arrives in
        one read, the body consumer closing the connection with C{close}
        (or not, for C{None}); then a second connection is asked for.
        """
        from twisted.web._newclient import Request

        client = UpstreamClient(MemoryReactorClock())
        ep = CountingEndpoint()
        proto = self.successResultOf(client.pool.getConnection(("http", b"up.test", 80), ep))
        d = proto.request(Request(b"POST", b"/v1/x", Headers({b"host": [b"up.test"]}), None, persistent=True))
        body = DiscardingBody(close)
        d.addCallback(lambda r: r.deliverBody(body))
        proto.dataReceived(HTML_200)
        self.successResultOf(d)
        self.idle_after_first = sum(len(c) for c in client.pool._connections.values())
        self.successResultOf(client.pool.getConnection(("http", b"up.test", 80), ep))
        return client, ep

    def test_open_connection_is_reused(self) -> None:
        """A response read to the end on an open connection leaves it pooled and reused."""
        _, ep = self.one_exchange(None)
        self.assertEqual(self.idle_after_first, 1)
        self.assertEqual(len(ep.transports), 1)

    def test_connection_stopped_by_the_relay_is_not_reused(self) -> None:
        """
        stopProducing on the body transport (the relay discarding an HTML
        answer to a stream request) keeps the connection out of the pool:
        the next request gets a new connection.
        """
        _, ep = self.one_exchange(lambda t: t.stopProducing())
        self.assertEqual(len(ep.transports), 2)
        self.assertTrue(ep.transports[0].disconnecting)
        self.assertFalse(ep.transports[1].disconnecting)

    def test_aborted_connection_is_not_reused(self) -> None:
        """
        abortConnection, which on TCP does not set C{disconnecting}, keeps
        the connection out of the pool as well.
        """
        _, ep = self.one_exchange(abort_behind)
        self.assertEqual(len(ep.transports), 2)
        self.assertTrue(ep.transports[0]._aborting)

    def test_closing_connection_is_not_cached(self) -> None:
        """The pool holds no idle connection after the closed one finished."""
        self.one_exchange(lambda t: t.stopProducing())
        self.assertEqual(self.idle_after_first, 0)

    def test_real_tcp_close_and_abort_are_seen(self) -> None:
        """
        A real TCP transport (over a socketpair, nothing sent) counts as
        closing after stopProducing and after abortConnection, which leaves
        its C{disconnecting} false: the flags TCPLikeTransport imitates are
        the ones Twisted's TCP transport sets.
        """
        import socket

        from twisted.internet import tcp

        from llmgate.relay.client import _closing

        for close in (lambda c: c.stopProducing(), lambda c: c.abortConnection()):
            a, b = socket.socketpair()
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            conn = tcp.Connection(a, None, MemoryReactorClock())
            conn.connected = True
            self.assertFalse(_closing(conn))
            close(conn)
            self.assertTrue(_closing(conn))


class _Collect(Protocol):
    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.reason: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason


_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class ChunkedBodyPathTests(SynchronousTestCase):
    """
    The pool's protocol decodes a chunked body a read at a time and hands
    it to the body protocol directly, with Twisted's behaviour kept before
    the body protocol is connected and on bad framing.
    """

    def connected(self) -> tuple[Any, StringTransport, Any, _Collect]:
        proto, transport, d = capped_connection()
        responses: list[Any] = []
        d.addCallback(responses.append)
        proto.dataReceived(_SSE_HEAD)
        body = _Collect()
        responses[0].deliverBody(body)
        return proto, transport, responses[0], body

    def test_one_delivery_per_read(self) -> None:
        """Three events in one read reach the body protocol in one call; the response's dispatcher is not used."""
        proto, transport, response, body = self.connected()
        from twisted.web._newclient import Response

        dispatched: list[bytes] = []
        original = Response._bodyDataReceived_CONNECTED
        self.patch(Response, "_bodyDataReceived_CONNECTED", lambda r, data: (dispatched.append(data), original(r, data)))
        proto.dataReceived(b"".join(_chunk(b"data: %d\n\n" % i) for i in range(3)))
        proto.dataReceived(_chunk(b"data: 3\n\n")[:9])
        self.assertEqual(body.reads, [b"data: 0\n\ndata: 1\n\ndata: 2\n\n", b"data: "])
        self.assertEqual(dispatched, [])
        proto.dataReceived(_chunk(b"data: 3\n\n")[9:] + b"0\r\n\r\n")
        self.assertEqual(b"".join(body.reads), b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\n")
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertFalse(transport.disconnecting)

    def test_bytes_before_deliver_body_are_kept(self) -> None:
        """Body bytes read with the head, before the relay connects its protocol, are delivered first, in order."""
        proto, transport, d = capped_connection()
        responses: list[Any] = []
        d.addCallback(responses.append)
        proto.dataReceived(_SSE_HEAD + _chunk(b"data: a\n\n"))
        proto.dataReceived(_chunk(b"data: b\n\n"))
        body = _Collect()
        responses[0].deliverBody(body)
        proto.dataReceived(_chunk(b"data: c\n\n") + b"0\r\n\r\n")
        self.assertEqual(b"".join(body.reads), b"data: a\n\ndata: b\n\ndata: c\n\n")
        self.assertTrue(body.reason.check(ResponseDone))

    def test_bad_framing_fails_the_body_and_closes(self) -> None:
        """A malformed chunk mid-stream: the payload before it is delivered, the body fails, the connection is closed."""
        proto, transport, response, body = self.connected()
        proto.dataReceived(_chunk(b"data: 1\n\n") + b"zz\r\n")
        self.assertEqual(body.reads, [b"data: 1\n\n"])
        self.assertTrue(body.reason.check(ResponseFailed))
        self.assertTrue(transport.disconnecting)

    def test_decoder_calls_the_body_protocol_itself(self) -> None:
        """
        Once the body protocol is connected, the decoder hands each read's
        payload to its dataReceived with no function of ours in between.
        """
        proto, transport, response, body = self.connected()
        proto.dataReceived(_chunk(b"data: 1\n\n"))
        self.assertEqual(proto._parser.bodyDecoder.dataCallback, body.dataReceived)
        proto.dataReceived(_chunk(b"data: 2\n\n"))
        self.assertEqual(body.reads, [b"data: 1\n\n", b"data: 2\n\n"])

    def test_decoder_freed_without_the_collector(self) -> None:
        """
        A body's decoder is freed as soon as its body ends, whether or not
        a body protocol was connected before the end: no reference cycle
        through it waits for the cyclic collector.
        """
        import gc
        import weakref

        gc.disable()
        self.addCleanup(gc.enable)
        for connect in (True, False):
            proto, transport, d = capped_connection()
            responses: list[Any] = []
            d.addCallback(responses.append)
            proto.dataReceived(_SSE_HEAD + _chunk(b"data: a\n\n"))
            decoder = weakref.ref(proto._parser.bodyDecoder)
            if connect:
                responses[0].deliverBody(_Collect())
                proto.dataReceived(_chunk(b"data: b\n\n") + b"0\r\n\r\n")
            else:
                proto.dataReceived(b"0\r\n\r\n")
            del responses, d
            self.assertIsNone(decoder(), f"decoder kept alive (connected: {connect})")

    def test_early_close_is_data_loss(self) -> None:
        """The connection lost before the last chunk fails the body (not a clean end)."""
        proto, transport, response, body = self.connected()
        proto.dataReceived(_chunk(b"data: 1\n\n"))
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(body.reason.check(ResponseFailed))


class _Recording(Protocol):
    def __init__(self) -> None:
        self.got = b""
        self.lost: Deferred[Any] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.lost.callback(None)


class EndpointWrapperTests(TestCase):
    """
    The endpoint's wrapper protocol is taken out of an upstream
    connection's read path once it is connected.
    """

    def test_real_connection_reads_straight_into_the_protocol(self) -> Any:
        """
        Over a real TCP connection on 127.0.0.1, the transport calls the
        connected protocol itself; reads and the close still reach it.
        """
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory
        from twisted.web.client import URI

        from llmgate.relay.client import _EndpointFactory

        class Hello(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"hello")
                self.transport.loseConnection()

        port = reactor.listenTCP(0, Factory.forProtocol(Hello), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        uri = URI.fromBytes(b"http://127.0.0.1:%d/" % port.getHost().port)
        endpoint = _EndpointFactory(reactor, 5.0).endpointForURI(uri)
        proto = _Recording()
        d = endpoint.connect(Factory.forProtocol(lambda: proto))

        def connected(p: Any) -> Any:
            self.assertIs(p, proto)
            self.assertIs(p.transport.protocol, p)
            return p.lost

        def closed(_: Any) -> None:
            self.assertTrue(proto.reason.check(ConnectionDone))
            self.assertEqual(proto.got, b"hello")

        return d.addCallback(connected).addCallback(closed)

    def test_real_tls_connection_reads_straight_into_tls(self) -> Any:
        """
        Over a real TLS connection on 127.0.0.1, the TCP transport calls
        the TLS protocol itself; the handshake, reads and the close still
        reach the connected protocol.
        """
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        from twisted.internet import reactor, ssl
        from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
        from twisted.internet.protocol import Factory

        from llmgate.relay.client import _NoDelayEndpoint

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        server = ssl.PrivateCertificate.loadPEM(pem)

        class Hello(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"hello over tls")
                self.transport.loseConnection()

        port = reactor.listenSSL(0, Factory.forProtocol(Hello), server.options(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        tls = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(pem))
        endpoint = _NoDelayEndpoint(wrapClientTLS(tls, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)))
        proto = _Recording()
        d = endpoint.connect(Factory.forProtocol(lambda: proto))

        def connected(p: Any) -> Any:
            tls_protocol = p.transport
            self.assertIs(tls_protocol.transport.protocol, tls_protocol)
            return p.lost

        def closed(_: Any) -> None:
            self.assertEqual(proto.got, b"hello over tls")

        return d.addCallback(connected).addCallback(closed)

    def test_tls_layer_unwrapped(self) -> None:
        """Over TLS, the TCP transport calls the TLS protocol itself."""
        from twisted.internet.endpoints import _WrappingProtocol

        from llmgate.relay.client import _unwrap

        tcp_transport = StringTransport()
        tls = Protocol()
        tls.transport = tcp_transport
        app = Protocol()
        app.transport = tls
        tcp_transport.protocol = _WrappingProtocol(Deferred(), tls)
        self.assertTrue(_unwrap(app))
        self.assertIs(tcp_transport.protocol, tls)

    def test_other_protocol_left_alone(self) -> None:
        """A transport calling anything but the endpoint's wrapper of this protocol is not touched."""
        from twisted.internet.endpoints import _WrappingProtocol

        from llmgate.relay.client import _unwrap

        for outer in (Protocol(), _WrappingProtocol(Deferred(), Protocol())):
            transport = StringTransport()
            transport.protocol = outer
            app = Protocol()
            app.transport = transport
            self.assertFalse(_unwrap(app))
            self.assertIs(transport.protocol, outer)


class _PauseRecording(StringTransport):
    """A StringTransport recording the pauses and resumes that reach it."""

    connected = 1
    disconnected = 0
    # SendNow's write-through is not under test here: writes take
    # StringTransport's path.
    _writeDisconnected = True

    def __init__(self) -> None:
        super().__init__()
        self.flow: list[str] = []

    def pauseProducing(self) -> None:
        self.flow.append("pause")
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self.flow.append("resume")
        super().resumeProducing()


class _HoldingTransport(sendnow.SendNow, _PauseRecording):
    """The upstream connection's transport as the gateway runs it: pauses can be held."""


class HeldPauseOverResponseHeadTests(SynchronousTestCase):
    """
    Twisted's parser pauses the connection at a response head until the
    body has a reader; when the relay gives it one before the read ends,
    the pause never reaches the reactor.
    """

    def connection(self) -> tuple[Any, _HoldingTransport, Deferred[Any]]:
        from twisted.web._newclient import Request

        proto = _QuietClientFactory(lambda p: None, None).buildProtocol(None)
        transport = _HoldingTransport()
        proto.makeConnection(transport)
        d = proto.request(Request(b"POST", b"/v1/x", Headers({b"host": [b"up.test"]}), None, persistent=True))
        return proto, transport, d

    def test_body_taken_at_once_means_no_pause(self) -> None:
        """The response's reader is given in the head's callback: only a (free) resume reaches the transport."""
        proto, t, d = self.connection()
        got: list[bytes] = []

        class Reader(Protocol):
            def dataReceived(self, data: bytes) -> None:
                got.append(data)

        d.addCallback(lambda r: r.deliverBody(Reader()))
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        self.assertEqual(t.flow, ["resume"])
        self.assertEqual(t.producerState, "producing")
        self.assertEqual(got, [b"hello"])

    def test_body_taken_later_pauses_until_then(self) -> None:
        """A reader given after the read leaves the connection paused until it comes, as in Twisted."""
        proto, t, d = self.connection()
        responses: list[Any] = []
        d.addCallback(responses.append)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(t.flow, ["pause"])
        self.assertEqual(t.producerState, "paused")
        responses[0].deliverBody(Protocol())
        self.assertEqual(t.flow, ["pause", "resume"])
        self.assertEqual(t.producerState, "producing")

    def test_request_head_and_body_are_one_write(self) -> None:
        """The request's head and in-memory body reach the transport in one write."""
        from twisted.web._newclient import Request

        from llmgate.relay.client import BytesProducer

        proto = _QuietClientFactory(lambda p: None, None).buildProtocol(None)
        transport = _HoldingTransport()
        writes: list[bytes] = []
        real_write = StringTransport.write

        def record(self: Any, data: bytes) -> None:
            writes.append(data)
            real_write(self, data)

        self.patch(StringTransport, "write", record)
        proto.makeConnection(transport)
        proto.request(Request(b"POST", b"/v1/x", Headers({b"host": [b"up.test"]}), BytesProducer(b'{"a":1}'), persistent=True))
        self.assertEqual(len(writes), 1)
        self.assertTrue(writes[0].startswith(b"POST /v1/x HTTP/1.1\r\n"))
        self.assertTrue(writes[0].endswith(b'\r\n\r\n{"a":1}'))

"""
The client-facing channel: deadlines that no trickle of bytes resets,
framing answered at once, and the budget for bodies being received.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from llmgate.accounting.recorder import Accounting
from llmgate.edge.site import BODY_DEADLINE, HEADER_DEADLINE, LINGER, _StrictChunkedDecoder
from tests.fakes import FakeResponse, Gateway, make_config, parse_response


class DeadlineTests(SynchronousTestCase):
    def test_slowloris_headers(self) -> None:
        """
        A client trickling header bytes is answered 408 and closed at the
        header deadline, although it never went quiet for long.
        """
        gw = Gateway()
        channel, t = gw.connect()
        channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\n")
        for _ in range(int(HEADER_DEADLINE)):
            gw.clock.advance(0.9)
            channel.dataReceived(b"X")
        gw.clock.advance(1)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 408"))
        self.assertTrue(t.disconnecting)

    def test_slow_body(self) -> None:
        """A body trickled past the body deadline is cut with 408."""
        gw = Gateway()
        channel, t = gw.connect()
        channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(int(BODY_DEADLINE / 5)):
            gw.clock.advance(5)
            channel.dataReceived(b"{")
        gw.clock.advance(5)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 408"))
        self.assertEqual(gw.http.calls, [])

    def test_prompt_request_not_cut(self) -> None:
        """A request sent promptly is served and leaves no deadline behind."""
        gw = Gateway()
        gw.post("/v1/chat/completions", {"model": "m"})
        self.assertEqual(len(gw.http.calls), 1)
        gw.clock.advance(HEADER_DEADLINE + 1)
        self.assertEqual(gw.http.calls[0]["cancelled"], False)
        self.assertEqual(gw.site.waiting, set())

    def test_no_100_continue_after_413(self) -> None:
        """A refused body is not invited with 100 Continue after the 413."""
        gw = Gateway(max_body=10)
        channel, t = gw.connect()
        channel.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
        )
        self.assertTrue(t.value().startswith(b"HTTP/1.1 413"))
        self.assertNotIn(b"100 Continue", t.value())


def _ledger_gateway(**kw: Any) -> tuple[Gateway, "ListLedger"]:
    """A Gateway whose accounting writes to a list, to count records."""
    gw = Gateway(**kw)
    ledger = ListLedger()
    gw.resource.accounting = Accounting(gw.clock, ledger=ledger)
    return gw, ledger


class ListLedger:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def record(self, rec: Any) -> None:
        self.records.append(rec)


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


class AbsoluteDeadlineTests(SynchronousTestCase):
    def test_trickle_from_the_first_byte(self) -> None:
        """
        The header deadline runs from the connection, not from the first
        full line: one byte every 2 s never extends it, and the client gets
        408 and a close 10 s after it connected.
        """
        gw = Gateway()
        channel, t = gw.connect()
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\n"[:5]:
            channel.dataReceived(bytes([byte]))
            gw.clock.advance(2 if gw.clock.seconds() < 8 else 1.99)
        self.assertEqual(gw.clock.seconds(), 9.99)
        self.assertEqual(t.value(), b"")
        self.assertFalse(t.disconnecting)
        gw.clock.advance(0.01)
        status, headers, body, _ = parse_response(t.value())
        self.assertEqual(status, 408)
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertEqual(json.loads(body)["error"]["code"], "request_timeout")
        self.assertTrue(t.disconnecting)

    def test_slow_body_leaves_one_record(self) -> None:
        """
        A request cut by the body deadline was a request: one "rejected"
        record with status 408 and the bytes it sent; header timeouts (no
        complete request) leave none.
        """
        gw, ledger = _ledger_gateway()
        channel, t = gw.connect()
        channel.dataReceived(HEAD + b"Content-Length: 100\r\n\r\n{\"mo")
        gw.clock.advance(BODY_DEADLINE)
        self.assertEqual(parse_response(t.value())[0], 408)
        self.assertEqual(
            [(r.route, r.status, r.outcome, r.bytes_in) for r in ledger.records], [("/v1/chat/completions", 408, "rejected", 4)]
        )
        channel, t = gw.connect()
        channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\n")
        gw.clock.advance(HEADER_DEADLINE)
        self.assertEqual(parse_response(t.value())[0], 408)
        self.assertEqual(len(ledger.records), 1)

    def test_body_pause_within_deadline_served(self) -> None:
        """
        A body that pauses for over a minute but arrives within the body
        deadline is served: Twisted's idle timer (60 s, silent close) is
        off, the absolute deadlines govern.
        """
        gw = Gateway()
        channel, t = gw.connect()
        channel.dataReceived(HEAD + b"Content-Length: 13\r\n\r\n")
        gw.clock.advance(61)
        self.assertFalse(t.disconnecting)
        channel.dataReceived(b'{"model":"m"}')
        self.assertEqual(len(gw.http.calls), 1)

    def test_silent_connection_closed_without_response(self) -> None:
        """
        A connection that sends nothing is closed at the header deadline
        without a response (nothing was asked).
        """
        gw = Gateway()
        channel, t = gw.connect()
        gw.clock.advance(HEADER_DEADLINE)
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value(), b"")

    def _served(self) -> tuple[Gateway, Any, StringTransport]:
        gw = Gateway()
        channel, t = gw.post("/v1/chat/completions", {"model": "m"})
        gw.clock.advance(50)
        r = FakeResponse(200, {b"content-type": [b"application/json"]})
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b'{"id":"x","choices":[]}')
        r.end()
        self.assertEqual(parse_response(t.value())[0], 200)
        self.assertFalse(t.disconnecting)
        t.clear()
        return gw, channel, t

    def test_keep_alive_deadline_from_end_of_response(self) -> None:
        """
        On a kept-alive connection the next request's headers are due
        HEADER_DEADLINE after the previous response ended (not after the
        connection opened, long ago, nor after their first byte).
        """
        gw, channel, t = self._served()
        gw.clock.advance(HEADER_DEADLINE - 1)
        channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\n")
        gw.clock.advance(0.99)
        self.assertFalse(t.disconnecting)
        gw.clock.advance(0.01)
        self.assertEqual(parse_response(t.value())[0], 408)
        self.assertTrue(t.disconnecting)

    def test_idle_keep_alive_closed_quietly(self) -> None:
        """
        A kept-alive connection with no next request is closed at the header
        deadline without a 408 a client could take for its next answer.
        """
        gw, channel, t = self._served()
        gw.clock.advance(HEADER_DEADLINE)
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value(), b"")


class FramingTests(SynchronousTestCase):
    """Ambiguous or oversized framing: a status and a close at once."""

    def refused(self, data: bytes, status: int, max_body: Optional[int] = None) -> dict[str, Any]:
        gw = Gateway(max_body=max_body)
        channel, t = gw.connect()
        channel.dataReceived(data)
        got, headers, body, _ = parse_response(t.value())
        self.assertEqual(got, status)
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertTrue(t.disconnecting)
        self.assertEqual(gw.http.calls, [])
        return json.loads(body)

    def test_headers_read_without_module_proxy_lookups(self) -> None:
        """
        Reading a request's header lines makes no attribute lookup through
        twisted.web.http's deprecation proxy (a slow path per lookup); the
        chunked body still gets the strict decoder.
        """
        from twisted.web import http

        looked: list[str] = []
        proxy = type(http)
        original = proxy.__getattribute__

        def counting(module: Any, name: str) -> Any:
            looked.append(name)
            return original(module, name)

        gw = Gateway()
        channel, t = gw.connect()
        self.patch(proxy, "__getattribute__", counting)
        channel.dataReceived(HEAD + b"X-A: 1\r\nX-B: 2\r\nX-C: 3\r\n")
        self.assertEqual(looked, [])
        channel.dataReceived(b"Transfer-Encoding: chunked\r\n\r\n")
        self.assertIsInstance(channel._transferDecoder, _StrictChunkedDecoder)

    def test_bare_lf_head(self) -> None:
        """A head whose lines end in a bare LF is answered 400 at once."""
        self.refused(b"POST /v1/chat/completions HTTP/1.1\nHost: localhost\nContent-Length: 2\n\n{}", 400)

    def test_bare_lf_after_crlf_request_line(self) -> None:
        """A bare LF among CRLF header lines is a 400 too."""
        self.refused(HEAD + b"Content-Length: 2\nX: y\r\n\r\n{}", 400)

    def test_absurd_chunk_size(self) -> None:
        """A chunk size of more than 16 hex digits is a 400, before its line ends."""
        body = self.refused(HEAD + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff", 400)
        self.assertEqual(body["error"]["code"], "bad_request")

    def test_chunk_size_over_cap(self) -> None:
        """A chunk announced larger than the body cap is a 413 before its bytes."""
        body = self.refused(HEAD + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n", 413)
        self.assertEqual(body["error"]["code"], "request_too_large")

    def test_bare_lf_chunk_line(self) -> None:
        """A chunk size line ending in a bare LF is a 400 at once."""
        self.refused(HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\n{}", 400)

    def test_huge_header_line(self) -> None:
        """A single 64 KiB header line is a 431 (Twisted closes silently)."""
        body = self.refused(HEAD + b"X-Big: " + b"a" * 65536, 431)
        self.assertEqual(body["error"]["code"], "headers_too_large")

    def test_huge_request_line(self) -> None:
        """A request line over 16 KiB is a 414."""
        self.refused(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n", 414)

    def test_headers_too_large_in_total(self) -> None:
        """Headers over 16 KiB in total are a 431, not Twisted's bare 400."""
        self.refused(HEAD + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20)), 431)

    def test_too_many_headers(self) -> None:
        """More than 100 header fields are a 431."""
        self.refused(HEAD + b"".join(b"X-%d: a\r\n" % i for i in range(101)) + b"\r\n", 431)

    def test_obs_fold_content_length(self) -> None:
        """obs-fold on Content-Length is a 400."""
        body = self.refused(HEAD + b"Content-Length:\r\n 2\r\n\r\n{}", 400)
        self.assertEqual(body["error"]["code"], "obs_fold")

    def test_obs_fold_transfer_encoding(self) -> None:
        """
        obs-fold on Transfer-Encoding is a 400 (Twisted joins the lines and
        takes the body as chunked).
        """
        self.refused(HEAD + b"Transfer-Encoding:\r\n\tchunked\r\n\r\n0\r\n\r\n", 400)

    def test_malformed_request_answered_in_dialect(self) -> None:
        """Twisted's own 400s get a length, a close and a dialect body."""
        body = self.refused(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: x\r\n\r\n", 400)
        self.assertEqual(body["type"], "error")

    def test_crlf_heads_still_served(self) -> None:
        """A well-formed chunked request with a chunk extension is relayed."""
        gw = Gateway()
        body = b'{"model":"m"}'
        channel, t = gw.connect()
        channel.dataReceived(HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x;x=y\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        self.assertEqual(t.value(), b"")
        self.assertEqual(len(gw.http.calls), 1)
        self.assertEqual(gw.http.calls[0]["data"], b'{"model":"m"}')


class BudgetTests(SynchronousTestCase):
    """The site-wide budget for request bodies being received."""

    def test_over_budget_is_503_then_released(self) -> None:
        """
        A body that would take the bodies being received past the budget is
        refused 503 with retry-after, before it is read; the budget is freed
        once the first body is handed off, and a new request fits again.
        """
        gw, ledger = _ledger_gateway()
        gw.site.budget.limit = 100
        a, ta = gw.connect()
        a.dataReceived(HEAD + b"Content-Length: 60\r\n\r\n")
        b, tb = gw.connect()
        b.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n")
        status, headers, body, _ = parse_response(tb.value())
        self.assertEqual(status, 503)
        self.assertEqual(headers[b"retry-after"], [b"1"])
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertEqual(json.loads(body)["error"]["type"], "overloaded_error")
        self.assertTrue(tb.disconnecting)
        self.assertEqual([(r.route, r.status, r.outcome) for r in ledger.records], [("/v1/messages", 503, "rejected")])
        doc = b'{"model":"m","x":"' + b"a" * 40 + b'"}'
        self.assertEqual(len(doc), 60)
        a.dataReceived(doc)
        self.assertEqual(len(gw.http.calls), 1)
        self.assertEqual(gw.site.budget.used, 0)
        c, tc = gw.connect()
        c.dataReceived(HEAD + b"Content-Length: 60\r\n\r\n")
        self.assertEqual(tc.value(), b"")
        self.assertEqual(gw.site.budget.used, 60)

    def test_disconnect_releases(self) -> None:
        """A client that goes away mid-body gives its share back."""
        gw = Gateway()
        gw.site.budget.limit = 100
        a, _ = gw.connect()
        a.dataReceived(HEAD + b"Content-Length: 90\r\n\r\n{")
        self.assertEqual(gw.site.budget.used, 90)
        a.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(gw.site.budget.used, 0)

    def test_chunked_bodies_counted_as_they_arrive(self) -> None:
        """A chunked body takes the budget chunk by chunk, and is refused when it runs out."""
        gw = Gateway()
        gw.site.budget.limit = 100
        a, ta = gw.connect()
        a.dataReceived(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        a.dataReceived(b"40\r\n" + b"x" * 64 + b"\r\n")
        self.assertEqual(gw.site.budget.used, 64)
        self.assertEqual(ta.value(), b"")
        a.dataReceived(b"40\r\n" + b"x" * 64 + b"\r\n")
        self.assertEqual(parse_response(ta.value())[0], 503)
        self.assertEqual(gw.site.budget.used, 0)


@implementer(ITCPTransport)
class _HalfClosable(StringTransport):
    """A StringTransport that, like TCP, can close its write half."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def abortConnection(self) -> None:
        self.aborted = True


class LingerTests(SynchronousTestCase):
    def test_refusal_half_closes_then_resets_after_linger(self) -> None:
        """
        Over TCP a refusal closes only the write half, so the answer is not
        destroyed by a reset while the client is still sending; what it
        sends is dropped unbuffered, and the connection is aborted LINGER
        seconds later.
        """
        gw = Gateway(make_config(keys={"team": {"api_key_env": "GW_KEY"}}))
        channel = gw.site.buildProtocol(None)
        t = _HalfClosable()
        channel.makeConnection(t)
        channel.dataReceived(HEAD + b"Content-Length: 1000000\r\n\r\n")
        self.assertEqual(parse_response(t.value())[0], 401)
        self.assertTrue(t.write_closed)
        self.assertFalse(t.disconnecting)
        channel.dataReceived(b"x" * 65536)
        self.assertEqual(channel.requests[-1].received, 0)
        gw.clock.advance(LINGER - 0.1)
        self.assertFalse(t.aborted)
        gw.clock.advance(0.1)
        self.assertTrue(t.aborted)


class DateHeaderTests(SynchronousTestCase):
    """The Date header: by the site's clock, formatted once per second."""

    def get(self, gw: Gateway) -> dict[bytes, list[bytes]]:
        channel, t = gw.connect()
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        gw.clock.advance(0)
        status, headers, body, _ = parse_response(t.value())
        self.assertEqual((status, body), (200, b'{"status":"ok"}'))
        return headers

    def test_date_of_the_site_clock(self) -> None:
        """
        A response's Date is the second of the site's clock (the RFC 9110
        example date here), and the next second's once the clock moves on;
        the Server header is still sent.
        """
        gw = Gateway()
        gw.clock.advance(784111777.25)
        headers = self.get(gw)
        self.assertEqual(headers[b"date"], [b"Sun, 06 Nov 1994 08:49:37 GMT"])
        self.assertTrue(headers[b"server"][0].startswith(b"TwistedWeb/"))
        gw.clock.advance(0.5)
        self.assertEqual(self.get(gw)[b"date"], [b"Sun, 06 Nov 1994 08:49:37 GMT"])
        gw.clock.advance(0.5)
        self.assertEqual(self.get(gw)[b"date"], [b"Sun, 06 Nov 1994 08:49:38 GMT"])

    def test_formatted_once_per_second(self) -> None:
        """Requests within one second share one formatting of the date."""
        from llmgate.edge import site

        calls: list[object] = []
        real = site._datetimeToString
        self.patch(site, "_datetimeToString", lambda t: calls.append(t) or real(t))
        self.patch(site, "_date", site._DateHeader())
        gw = Gateway()
        gw.clock.advance(1000.1)
        for _ in range(3):
            self.assertEqual(self.get(gw)[b"date"], [b"Thu, 01 Jan 1970 00:16:40 GMT"])
        gw.clock.advance(1)
        self.assertEqual(self.get(gw)[b"date"], [b"Thu, 01 Jan 1970 00:16:41 GMT"])
        self.assertEqual(calls, [1000, 1001])

"""
Unit tests for the relay, in memory: a Site over a StringTransport on the
front, a hand-driven fake of treq at the back, and a MemoryReactorClock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.testing import StringTransport

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmgate.relay.stream import event_boundary
from tests.fakes import SSE_HEADERS, FakeResponse, Gateway, make_config, parse_response

def relay_timers(clock: object) -> list[object]:
    """
    Pending timers other than the channel's idle timer and the watchdog's
    sweep: a relay must leave none behind.
    """
    from twisted.internet.task import LoopingCall

    return [
        c for c in clock.getDelayedCalls()  # type: ignore[attr-defined]
        if "TimeoutMixin" not in repr(c)
        and not isinstance(c.func, LoopingCall)
        and getattr(c.func, "__name__", "") != "_updateLogDateTime"
    ]


CHAT = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}

E1 = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
E2 = b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n'


class EventBoundaryTests(SynchronousTestCase):
    def test_whole_events(self) -> None:
        """A chunk of whole events is relayed whole."""
        self.assertEqual(event_boundary(E1 + E2), len(E1 + E2))

    def test_partial_tail(self) -> None:
        """An event cut off at the end is held back."""
        self.assertEqual(event_boundary(E1 + E2[:10]), len(E1))
        self.assertEqual(event_boundary(E2[:10]), 0)

    def test_crlf_and_cr(self) -> None:
        """CRLF and lone-CR blank lines end events too."""
        self.assertEqual(event_boundary(b"data: x\r\n\r\ndata: y"), 11)
        self.assertEqual(event_boundary(b"data: x\r\rdata: y"), 9)


class StreamingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = Gateway()
        self.channel, self.transport = self.gw.post("/v1/chat/completions", CHAT)
        self.call = self.gw.http.calls[0]

    def respond(self, code: int = 200, headers: dict[bytes, list[bytes]] | None = None) -> FakeResponse:
        r = FakeResponse(code, SSE_HEADERS if headers is None else headers)
        self.call["deferred"].callback(r)
        return r

    def test_each_chunk_reaches_the_client_as_it_arrives(self) -> None:
        """
        Every upstream event is written to the client by the end of the
        reactor turn that read it, before the next one arrives: no
        buffering beyond the turn.
        """
        r = self.respond()
        r.send(E1)
        self.gw.clock.advance(0)
        self.assertIn(E1, self.transport.value())
        self.assertNotIn(E2, self.transport.value())
        r.send(E2)
        self.gw.clock.advance(0)
        self.assertIn(E2, self.transport.value())

    def test_sse_headers(self) -> None:
        """
        Event streams go out unbuffered by intermediaries, uncached, and
        uncompressed even to a client that accepts gzip.
        """
        _, transport = self.gw.post("/v1/chat/completions", CHAT, headers={"Accept-Encoding": "gzip"})
        r = FakeResponse(200, SSE_HEADERS)
        self.gw.http.calls[1]["deferred"].callback(r)
        r.send(E1)
        self.gw.clock.advance(0)
        status, headers, body, _ = parse_response(transport.value())
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"cache-control"], [b"no-cache"])
        self.assertEqual(headers[b"x-accel-buffering"], [b"no"])
        self.assertNotIn(b"content-encoding", headers)
        self.assertEqual(body, E1)

    def test_split_event_is_joined(self) -> None:
        """An event split over reads is written once it is complete."""
        r = self.respond()
        r.send(E1[:7])
        r.send(E1[7:20])
        self.assertNotIn(b"data:", self.transport.value())
        r.send(E1[20:])
        r.end()
        _, _, body, complete = parse_response(self.transport.value())
        self.assertEqual(body, E1)
        self.assertTrue(complete)

    def test_backpressure_pauses_and_resumes_upstream(self) -> None:
        """
        The upstream body transport is the client request's producer: a
        client whose socket buffer fills pauses the upstream read.
        """
        r = self.respond()
        http_channel = self.channel
        http_channel.pauseProducing()
        self.assertEqual(r.transport.paused, 1)
        http_channel.resumeProducing()
        self.assertEqual(r.transport.resumed, 1)
        r.end()
        self.assertIsNone(http_channel._requestProducer)

    def test_client_gone_mid_stream_stops_upstream(self) -> None:
        """
        A client that disconnects mid-stream stops the upstream transport at
        once, and the exchange is recorded once as cancelled in the body.
        """
        r = self.respond()
        r.send(E1)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(r.transport.stopped)
        # The upstream's connectionLost comes on a later turn, as it does
        # after a real transport's loseConnection.
        self.gw.clock.advance(0)
        [ex] = self.gw.accounting.exchanges
        self.assertEqual((ex.outcome, ex.phase), ("client_cancelled", "body"))
        self.assertEqual(relay_timers(self.gw.clock), [])

    def test_client_gone_before_headers_cancels_request(self) -> None:
        """
        A client that leaves while the upstream has not answered cancels the
        pending upstream request Deferred.
        """
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.call["cancelled"])
        [ex] = self.gw.accounting.exchanges
        self.assertEqual(ex.outcome, "client_cancelled")
        self.gw.clock.advance(0)  # its estimate, counted off the reactor thread
        self.assertEqual(relay_timers(self.gw.clock), [])

    def test_upstream_reset_mid_stream_is_visible(self) -> None:
        """
        An upstream that dies mid-stream yields an in-band error event, never
        a [DONE]; the half event it cut off is dropped.
        """
        r = self.respond()
        r.send(E1 + E2[:12])
        r.fail()
        _, _, body, _ = parse_response(self.transport.value())
        self.assertTrue(body.startswith(E1))
        self.assertNotIn(b"[DONE]", body)
        self.assertEqual(body.count(b'"choices"'), 1)
        err = json.loads(body[len(E1):].split(b"data: ", 1)[1])
        self.assertEqual(err["error"]["code"], "stream_interrupted")
        [ex] = self.gw.accounting.exchanges
        self.assertEqual((ex.outcome, ex.phase), ("upstream_error", "body"))

    def test_idle_upstream_is_cut(self) -> None:
        """
        An upstream that goes quiet longer than the idle timeout is stopped
        and the client told; activity keeps a long stream alive.
        """
        r = self.respond()
        idle = self.gw.cfg.timeouts.idle
        for _ in range(5):
            self.gw.clock.advance(idle * 0.6)
            r.send(E1)
        self.assertFalse(r.transport.stopped)
        self.gw.clock.advance(idle)
        self.assertTrue(r.transport.stopped)
        self.assertIn(b"stalled", self.transport.value())
        self.assertEqual(relay_timers(self.gw.clock), [])

    def test_headers_timeout_is_504(self) -> None:
        """No upstream headers in time: the request is cancelled, 504."""
        self.gw.clock.advance(self.gw.cfg.timeouts.headers)
        self.assertTrue(self.call["cancelled"])
        status, _, body, _ = parse_response(self.transport.value())
        self.assertEqual(status, 504)
        self.assertIn("error", json.loads(body))

    def test_refused_is_502(self) -> None:
        """An unreachable upstream is a 502 in the route's dialect."""
        self.call["deferred"].errback(Failure(ConnectionRefusedError()))
        status, _, body, _ = parse_response(self.transport.value())
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"]["type"], "upstream_error")

    def test_upstream_error_status_relayed_untouched(self) -> None:
        """An upstream 429 (its retry-after too long to wait for) is relayed with its status, headers and body."""
        body = b'{"error":{"message":"slow down","type":"tokens","param":null,"code":"rate_limit_exceeded"}}'
        r = self.respond(429, {b"content-type": [b"application/json"], b"retry-after": [b"30"], b"content-length": [str(len(body)).encode()]})
        r.send(body)
        r.end()
        status, headers, got, complete = parse_response(self.transport.value())
        self.assertEqual((status, got, complete), (429, body, True))
        self.assertEqual(headers[b"retry-after"], [b"30"])

    def test_stream_answered_with_html_is_502(self) -> None:
        """A 200 that is not an event stream is never relayed as one."""
        r = self.respond(200, {b"content-type": [b"text/html"]})
        status, _, _, _ = parse_response(self.transport.value())
        self.assertEqual(status, 502)
        self.assertTrue(r.transport.stopped)

    def test_injected_usage_request(self) -> None:
        """
        A stream request without include_usage is sent upstream with it, so
        the gateway can count; the client-visible model is mapped.
        """
        sent = json.loads(self.call["data"])
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertTrue(self.call["unbuffered"])


class RoutingTests(SynchronousTestCase):
    def test_model_mapped_to_upstream_name(self) -> None:
        """A public model name is rewritten to the upstream's name."""
        gw = Gateway()
        gw.post("/v1/embeddings", {"model": "public-model", "input": "x"})
        call = gw.http.calls[0]
        self.assertEqual(call["url"], "http://up.test/v1/embeddings")
        self.assertEqual(json.loads(call["data"])["model"], "real-model")

    def test_body_forwarded_unchanged(self) -> None:
        """A body that needs no rewrite goes upstream byte for byte."""
        gw = Gateway()
        raw = b'{"model":"gpt-4o",  "input": ["a"], "unknown_field": {"x": 1}}'
        gw.post("/v1/embeddings", None, raw=raw)
        self.assertEqual(gw.http.calls[0]["data"], raw)

    def test_anthropic_route(self) -> None:
        """/v1/messages goes to the Anthropic provider's base URL."""
        gw = Gateway()
        gw.post("/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": []})
        self.assertEqual(gw.http.calls[0]["url"], "http://ant.test/v1/messages")

    def test_header_hygiene_openai(self) -> None:
        """
        Client credentials and hop-by-hop headers (and those named in
        Connection) are dropped; the provider key goes in Authorization;
        other client headers pass through.
        """
        gw = Gateway()
        gw.post(
            "/v1/chat/completions",
            {"model": "gpt-4o", "messages": []},
            headers={
                "Authorization": "Bearer client-key",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "1",
                "Keep-Alive": "timeout=5",
                "x-stainless-retry-count": "0",
            },
        )
        h = gw.http.calls[0]["headers"]
        self.assertEqual(h.getRawHeaders(b"authorization"), [b"Bearer sk-upstream-oai"])
        for name in (b"connection", b"x-hop", b"keep-alive", b"content-length", b"host"):
            self.assertFalse(h.hasHeader(name), name)
        self.assertEqual(h.getRawHeaders(b"x-stainless-retry-count"), [b"0"])

    def test_client_cannot_choose_the_billed_account(self) -> None:
        """
        A client's OpenAI-Organization and OpenAI-Project never reach the
        provider: the gateway's key pays, and which of its organizations or
        projects is charged is not the client's choice.
        """
        gw = Gateway()
        gw.post(
            "/v1/chat/completions",
            {"model": "gpt-4o", "messages": []},
            headers={"OpenAI-Organization": "org-other", "openai-project": "proj_other1234"},
        )
        h = gw.http.calls[0]["headers"]
        self.assertFalse(h.hasHeader(b"openai-organization"))
        self.assertFalse(h.hasHeader(b"openai-project"))

    def test_identity_encoding_asked_upstream(self) -> None:
        """
        The upstream is asked for an uncompressed body, whatever encodings
        the client accepts.
        """
        gw = Gateway()
        gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": []}, headers={"Accept-Encoding": "gzip, br"})
        gw.post("/v1/messages", {"model": "claude-x", "messages": []})
        for call in gw.http.calls:
            self.assertEqual(call["headers"].getRawHeaders(b"accept-encoding"), [b"identity"])

    def test_upstream_location_and_transport_headers_not_relayed(self) -> None:
        """
        Location and Content-Location (URLs on the provider's host),
        Set-Cookie, Alt-Svc, Strict-Transport-Security and headers the
        upstream's Connection names are not relayed; others are.
        """
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": []})
        r = FakeResponse(
            200,
            {
                b"content-type": [b"application/json"],
                b"location": [b"https://provider.internal/v1/x"],
                b"content-location": [b"/v1/x"],
                b"set-cookie": [b"__cf_bm=1"],
                b"alt-svc": [b'h3=":443"'],
                b"strict-transport-security": [b"max-age=1"],
                b"connection": [b"x-hop"],
                b"x-hop": [b"1"],
                b"x-ratelimit-remaining-requests": [b"9"],
            },
        )
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b"{}")
        r.end()
        _, headers, _, _ = parse_response(t.value())
        for name in (b"location", b"content-location", b"set-cookie", b"alt-svc", b"strict-transport-security", b"x-hop"):
            self.assertNotIn(name, headers)
        self.assertEqual(headers[b"x-ratelimit-remaining-requests"], [b"9"])

    def test_header_hygiene_anthropic(self) -> None:
        """The client's x-api-key is replaced; its anthropic-version kept."""
        gw = Gateway()
        gw.post(
            "/v1/messages",
            {"model": "claude-x", "messages": []},
            headers={"x-api-key": "client-key", "anthropic-version": "2024-01-01", "anthropic-beta": "x"},
        )
        h = gw.http.calls[0]["headers"]
        self.assertEqual(h.getRawHeaders(b"x-api-key"), [b"sk-ant-upstream"])
        self.assertEqual(h.getRawHeaders(b"anthropic-version"), [b"2024-01-01"])
        self.assertEqual(h.getRawHeaders(b"anthropic-beta"), [b"x"])
        self.assertFalse(h.hasHeader(b"authorization"))
        gw.post("/v1/messages", {"model": "claude-x", "messages": []})
        h = gw.http.calls[1]["headers"]
        self.assertEqual(h.getRawHeaders(b"anthropic-version"), [b"2023-06-01"])


class ErrorTests(SynchronousTestCase):
    def error(self, gw: Gateway, transport: object) -> tuple[int, dict]:  # type: ignore[type-arg]
        status, _, body, _ = parse_response(transport.value())  # type: ignore[attr-defined]
        self.assertEqual(gw.http.calls, [], "upstream must not be contacted")
        return status, json.loads(body)

    def test_invalid_json_openai(self) -> None:
        """Invalid JSON is a 400 in OpenAI's error shape."""
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", None, raw=b"{nope")
        status, doc = self.error(gw, t)
        self.assertEqual(status, 400)
        self.assertEqual(doc["error"]["type"], "invalid_request_error")

    def test_invalid_utf8_anthropic(self) -> None:
        """Invalid UTF-8 is a 400 in Anthropic's error shape, never a 500."""
        gw = Gateway()
        _, t = gw.post("/v1/messages", None, raw=b'{"model": "\xff"}')
        status, doc = self.error(gw, t)
        self.assertEqual(status, 400)
        self.assertEqual(doc["type"], "error")
        self.assertEqual(doc["error"]["type"], "invalid_request_error")

    def test_not_an_object(self) -> None:
        """Valid JSON that is not an object is a 400."""
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", [1, 2])
        self.assertEqual(self.error(gw, t)[0], 400)

    def test_missing_model(self) -> None:
        """A body without a model is a 400 naming the parameter."""
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", {"messages": []})
        status, doc = self.error(gw, t)
        self.assertEqual((status, doc["error"]["param"]), (400, "model"))

    def test_unknown_model_both_dialects(self) -> None:
        """An unknown model is a 404 in the dialect of the route."""
        cfg = make_config(providers={"oai": {"kind": "openai", "base_url": "http://up.test/v1"}})
        gw = Gateway(cfg)
        _, t = gw.post("/v1/chat/completions", {"model": "nope"})
        status, doc = self.error(gw, t)
        self.assertEqual((status, doc["error"]["code"]), (404, "model_not_found"))
        _, t = gw.post("/v1/messages", {"model": "nope"})
        status, doc = self.error(gw, t)
        self.assertEqual((status, doc["error"]["type"]), (404, "not_found_error"))

    def test_unknown_route(self) -> None:
        """An unknown path is a 404."""
        gw = Gateway()
        _, t = gw.post("/v1/nothing", {"model": "x"})
        self.assertEqual(self.error(gw, t)[0], 404)

    def test_wrong_method(self) -> None:
        """GET on a POST route is a 405 with Allow."""
        gw = Gateway()
        channel, t = gw.connect()
        channel.dataReceived(b"GET /v1/messages HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, headers, body, _ = parse_response(t.value())
        self.assertEqual(status, 405)
        self.assertEqual(headers[b"allow"], [b"POST"])
        self.assertEqual(json.loads(body)["type"], "error")

    def test_body_over_limit_by_content_length(self) -> None:
        """
        A Content-Length over the cap is refused with 413 before any of the
        body is read, and the connection closed.
        """
        gw = Gateway(max_body=100)
        channel, t = gw.connect()
        channel.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 101\r\n\r\n")
        status, _, body, _ = parse_response(t.value())
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"]["type"], "request_too_large")
        self.assertTrue(t.disconnecting)
        self.assertEqual(gw.http.calls, [])

    def test_chunked_body_over_limit(self) -> None:
        """A chunked body is refused as soon as it passes the cap."""
        gw = Gateway(max_body=100)
        channel, t = gw.connect()
        channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        channel.dataReceived(b"40\r\n" + b"x" * 64 + b"\r\n")
        self.assertEqual(t.value(), b"")
        channel.dataReceived(b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n")
        status, _, body, _ = parse_response(t.value())
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"]["code"], "request_too_large")
        self.assertEqual(gw.http.calls, [])

    def test_gateway_keys(self) -> None:
        """
        With gateway keys configured, a request without a valid one is a 401
        that does not echo the key; a valid one is relayed under its name.
        """
        cfg = make_config(keys={"team-a": {"api_key_env": "GW_KEY"}})
        gw = Gateway(cfg)
        _, t = gw.post("/v1/messages", {"model": "claude-x"}, headers={"x-api-key": "wrong-key-123"})
        status, doc = self.error(gw, t)
        self.assertEqual((status, doc["error"]["type"]), (401, "authentication_error"))
        self.assertNotIn(b"wrong-key-123", t.value())
        gw.post("/v1/chat/completions", {"model": "gpt-4o"}, headers={"Authorization": "Bearer gw-secret"})
        self.assertEqual(len(gw.http.calls), 1)
        h = gw.http.calls[0]["headers"]
        self.assertEqual(h.getRawHeaders(b"authorization"), [b"Bearer sk-upstream-oai"])


class RobustnessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = Gateway()
        self.channel, self.transport = self.gw.post("/v1/chat/completions", CHAT)
        self.r = FakeResponse(200, SSE_HEADERS)
        self.gw.http.calls[0]["deferred"].callback(self.r)

    def test_large_event_in_small_reads(self) -> None:
        """An event spread over many reads is relayed whole and intact."""
        big = b'data: {"x":"' + b"y" * 200_000 + b'"}\n\n'
        for i in range(0, len(big), 1460):
            self.r.send(big[i:i + 1460])
        self.r.send(E1)
        self.r.end()
        self.assertEqual(parse_response(self.transport.value())[2], big + E1)

    def test_crlf_boundary_split_across_reads(self) -> None:
        """A CRLF blank line split between reads still ends the event."""
        ev = b"data: {}\r\n\r\n"
        self.r.send(ev[:-3])
        self.assertNotIn(b"data", self.transport.value())
        self.r.send(ev[-3:])
        self.gw.clock.advance(0)
        self.assertIn(ev, self.transport.value())

    def test_event_over_cap_is_cut_cleanly(self) -> None:
        """
        An event past the size cap stops the upstream and ends the stream
        with an error event; data still arriving from the same read is
        dropped instead of written after the finish.
        """
        self.r.send(b"data: " + b"z" * (1 << 20) + b"x")
        self.assertTrue(self.r.transport.stopped)
        self.r.send(E1)  # the rest of the read, after the stop
        self.r.fail()
        _, _, body, complete = parse_response(self.transport.value())
        self.assertIn(b"event size cap", body)
        self.assertNotIn(E1, body)
        self.assertTrue(complete)
        [ex] = self.gw.accounting.exchanges
        self.assertEqual(ex.error, "upstream event larger than the event size cap")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_close_delimited_stream_cut_is_not_success(self) -> None:
        """
        A stream delimited by connection close that ends without its
        terminal event is reported as cut, not as complete.
        """
        from twisted.web.http import PotentialDataLoss

        self.r.send(E1)
        self.r.protocol.connectionLost(Failure(PotentialDataLoss()))
        body = parse_response(self.transport.value())[2]
        self.assertIn(b"stream_interrupted", body)

    def test_close_delimited_stream_complete(self) -> None:
        """A close-delimited stream that did finish is a clean end."""
        from twisted.web.http import PotentialDataLoss

        self.r.send(E1 + b"data: [DONE]\n\n")
        self.r.protocol.connectionLost(Failure(PotentialDataLoss()))
        _, _, body, complete = parse_response(self.transport.value())
        self.assertTrue(complete)
        self.assertNotIn(b"error", body)

    def test_paused_stream_is_not_an_upstream_stall(self) -> None:
        """
        While the client's backpressure holds the upstream paused the idle
        timer does not fire; a client that never reads again is cut after
        the write-stall timeout, both sides closed.
        """
        t = self.gw.cfg.timeouts
        self.r.send(E1)
        self.channel.pauseProducing()
        self.gw.clock.advance(t.idle - 1)
        self.gw.clock.advance(2)
        self.assertFalse(self.r.transport.stopped)
        self.channel.resumeProducing()
        self.channel.pauseProducing()
        self.gw.clock.advance(t.write_stall + 1)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.r.transport.stopped)
        self.gw.clock.advance(0)  # the upstream's connectionLost, a turn later
        [ex] = self.gw.accounting.exchanges
        self.assertEqual((ex.outcome, ex.error), ("client_cancelled", "client stopped reading"))


class UpstreamCredentialTests(SynchronousTestCase):
    def test_upstream_401_is_not_relayed(self) -> None:
        """
        A provider refusing the gateway's key yields a 502 that does not
        repeat the provider's text (which may quote the key) and tells
        the SDK not to retry.
        """
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", {"model": "gpt-4o"})
        r = FakeResponse(401, {b"content-type": [b"application/json"]})
        gw.http.calls[0]["deferred"].callback(r)
        # What OpenAI answers to a bad key: a body quoting part of it.
        r.send(b'{"error":{"message":"Incorrect API key provided: sk-upstr*****-oai.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}')
        r.end()
        gw.clock.advance(0)
        status, headers, body, _ = parse_response(t.value())
        self.assertEqual(status, 502)
        self.assertEqual(headers[b"x-should-retry"], [b"false"])
        self.assertTrue(r.transport.stopped)
        self.assertNotIn(b"sk-", body)

    def test_provider_account_headers_dropped(self) -> None:
        """The provider's organization headers do not reach the client."""
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", {"model": "gpt-4o"})
        r = FakeResponse(200, {b"content-type": [b"application/json"], b"openai-organization": [b"org-x"], b"x-request-id": [b"req_1"]})
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b"{}")
        r.end()
        _, headers, _, _ = parse_response(t.value())
        self.assertNotIn(b"openai-organization", headers)
        self.assertEqual(headers[b"x-upstream-request-id"], [b"req_1"])

    def test_deeply_nested_json_is_400(self) -> None:
        """Pathologically nested JSON is a 400, not a 500 with a traceback."""
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", None, raw=b"[" * 100000)
        self.assertEqual(parse_response(t.value())[0], 400)
        self.assertEqual(self.flushLoggedErrors(), [])


class UsageInjectionTests(SynchronousTestCase):
    def test_injection_keeps_client_bytes(self) -> None:
        """
        Asking upstream for usage adds stream_options and leaves every other
        byte of the client's body as it was.
        """
        gw = Gateway()
        raw = b'{ "model" : "gpt-4o",\n "stream": true, "messages": [{"role":"user","content":"h\\u00e9"}] }'
        gw.post("/v1/chat/completions", None, raw=raw)
        sent = gw.http.calls[0]["data"]
        self.assertEqual(sent.replace(b'"stream_options":{"include_usage":true},', b""), raw)
        self.assertEqual(json.loads(sent)["stream_options"], {"include_usage": True})

    def test_existing_stream_options_merged(self) -> None:
        """Other stream_options the client set are kept."""
        gw = Gateway()
        gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_obfuscation": False}})
        opts = json.loads(gw.http.calls[0]["data"])["stream_options"]
        self.assertEqual(opts, {"include_obfuscation": False, "include_usage": True})


class CoalescingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = Gateway(coalesce=True)
        self.channel, self.transport = self.gw.post("/v1/chat/completions", CHAT)
        self.r = FakeResponse(200, SSE_HEADERS)
        self.gw.http.calls[0]["deferred"].callback(self.r)
        # The status line leaves at the end of the turn it came in.
        self.gw.clock.advance(0)
        self.transport.clear()

    def test_one_turn_one_chunk(self) -> None:
        """
        Events read in one reactor turn leave together, in one chunk, at the
        end of that turn; the next turn's events leave in the next.
        """
        self.r.send(E1)
        self.r.send(E2)
        self.assertEqual(self.transport.value(), b"")
        self.gw.clock.advance(0)
        self.assertEqual(self.transport.value(), b"%x\r\n%s\r\n" % (len(E1 + E2), E1 + E2))
        self.transport.clear()
        self.r.send(E1)
        self.gw.clock.advance(0)
        self.assertEqual(self.transport.value(), b"%x\r\n%s\r\n" % (len(E1), E1))

    def test_end_flushes_first(self) -> None:
        """The stream's end writes what is held before finishing."""
        self.r.send(E1)
        self.r.end()
        _, _, body, complete = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + self.transport.value())
        self.assertEqual((body, complete), (E1, True))
        self.gw.clock.advance(0)

    def test_client_gone_drops_held(self) -> None:
        """Held events of a client that left are dropped, not written."""
        self.r.send(E1)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.gw.clock.advance(0)
        self.assertEqual(self.transport.value(), b"")


class _CountingTransport(StringTransport):
    """A StringTransport that counts its writes (each one a send)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.writes += 1
        super().writeSequence(seq)


def _chat_posted(version: bytes = b"HTTP/1.1", coalesce: bool = True) -> tuple[Any, Any, "_CountingTransport"]:
    """A gateway, a client channel on a counting transport, and a streaming chat request posted on it."""
    gw = Gateway(coalesce=coalesce)
    channel = gw.site.buildProtocol(None)
    transport = _CountingTransport()
    channel.makeConnection(transport)
    data = json.dumps(CHAT).encode()
    channel.dataReceived(
        b"POST /v1/chat/completions %s\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (version, len(data), data)
    )
    return gw, channel, transport


class FewerSendsTests(SynchronousTestCase):
    """
    The client transport writes through at once, so each channel write is
    a send: the relay groups what it writes in one go.
    """

    def setUp(self) -> None:
        self.gw, self.channel, self.transport = _chat_posted()
        self.r = FakeResponse(200, SSE_HEADERS)
        self.transport.writes = 0

    def test_status_line_with_first_events(self) -> None:
        """
        The status line and the events that came with the response headers
        (one upstream read) leave in one write at the end of the turn.
        """
        self.gw.http.calls[0]["deferred"].callback(self.r)
        self.r.send(E1)
        self.assertEqual(self.transport.value(), b"")
        self.gw.clock.advance(0)
        self.assertEqual(self.transport.writes, 1)
        status, headers, body, complete = parse_response(self.transport.value())
        self.assertEqual((status, body, complete), (200, E1, False))
        self.assertEqual(headers[b"content-type"], [b"text/event-stream; charset=utf-8"])

    def test_status_line_alone_same_turn(self) -> None:
        """
        With no event yet, the status line still leaves at the end of the
        turn that brought the response headers (an SDK's create() returns
        on it).
        """
        self.gw.http.calls[0]["deferred"].callback(self.r)
        self.gw.clock.advance(0)
        self.assertEqual(self.transport.writes, 1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_last_events_with_terminator(self) -> None:
        """
        The events of the last read and the chunked terminator leave in
        one write when the upstream body ends.
        """
        self.gw.http.calls[0]["deferred"].callback(self.r)
        self.gw.clock.advance(0)
        self.transport.clear()
        self.transport.writes = 0
        self.r.send(E1 + E2)
        self.r.end()
        self.assertEqual(self.transport.writes, 1)
        self.assertEqual(self.transport.value(), b"%x\r\n%s\r\n0\r\n\r\n" % (len(E1 + E2), E1 + E2))
        self.gw.clock.advance(0)
        self.assertEqual(self.transport.writes, 1)

    def test_whole_response_one_write(self) -> None:
        """
        A whole stream read at once (headers, events, end): status line,
        events and terminator in a single write.
        """
        self.gw.http.calls[0]["deferred"].callback(self.r)
        self.r.send(E1 + E2)
        self.r.end()
        self.gw.clock.advance(0)
        self.assertEqual(self.transport.writes, 1)
        status, _, body, complete = parse_response(self.transport.value())
        self.assertEqual((status, body, complete), (200, E1 + E2, True))


class _Upper:
    """A content encoder (as EncodingResourceWrapper sets) upper-casing the body."""

    def encode(self, data: bytes) -> bytes:
        return data.upper()

    def finish(self) -> bytes:
        return b""


class ChunkFramingTests(SynchronousTestCase):
    """
    Once the head is out on a chunked response, the relay frames each body
    chunk itself and hands it to the channel in one write; everything the
    client sees stays byte for byte what twisted.web would send.
    """

    def start(self, version: bytes = b"HTTP/1.1", coalesce: bool = True, method: bytes = b"") -> None:
        self.gw, self.channel, self.transport = _chat_posted(version, coalesce)
        self.request = self.channel.requests[-1]
        if method:
            self.request.method = method
        self.r = FakeResponse(200, SSE_HEADERS)

    def respond(self) -> bytes:
        """The response headers arrive; the head the client got."""
        self.gw.http.calls[0]["deferred"].callback(self.r)
        self.gw.clock.advance(0)
        head = self.transport.value()
        self.transport.clear()
        self.transport.writes = 0
        return head

    def test_chunks_framed_by_the_relay(self) -> None:
        """
        After the head, each turn's events leave in one write to the
        client transport, framed as one chunk, without a call to
        twisted.web's Request.write per chunk.
        """
        from twisted.web import http

        self.start()
        self.respond()
        calls: list[bytes] = []
        write = http.Request.write

        def counting(request: Any, data: bytes) -> None:
            calls.append(data)
            write(request, data)

        self.patch(http.Request, "write", counting)
        self.r.send(E1)
        self.gw.clock.advance(0)
        self.r.send(E2)
        self.r.send(E1)
        self.gw.clock.advance(0)
        self.assertEqual(calls, [])
        self.assertEqual(self.transport.writes, 2)
        self.assertEqual(
            self.transport.value(),
            b"%x\r\n%s\r\n%x\r\n%s\r\n" % (len(E1), E1, len(E2 + E1), E2 + E1),
        )

    def test_chunked_wire_bytes(self) -> None:
        """
        A chunked stream is byte-exact on the wire: a chunk per turn, the
        last events and the terminator together, nothing else; the
        request's sent length counts the body bytes.
        """
        self.start()
        head = self.respond()
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"\r\nTransfer-Encoding: chunked\r\n", head)
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        self.r.send(E1)
        self.gw.clock.advance(0)
        self.r.send(E2)
        self.r.end()
        self.assertEqual(
            self.transport.value(),
            b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(E1), E1, len(E2), E2),
        )
        self.assertEqual(self.request.sentLength, len(E1 + E2))
        [ex] = self.gw.accounting.exchanges
        self.assertEqual((ex.outcome, ex.bytes_out), ("completed", len(E1 + E2)))

    def test_http10_body_unframed(self) -> None:
        """
        An HTTP/1.0 client gets the events as they are, no chunk framing,
        and the end of the body is the close of the connection.
        """
        self.start(version=b"HTTP/1.0")
        head = self.respond()
        self.assertTrue(head.startswith(b"HTTP/1.0 200 OK\r\n"))
        self.assertNotIn(b"Transfer-Encoding", head)
        self.r.send(E1)
        self.gw.clock.advance(0)
        self.r.send(E2)
        self.r.end()
        self.assertEqual(self.transport.value(), E1 + E2)
        self.assertTrue(self.transport.disconnecting)

    def test_head_gets_no_body(self) -> None:
        """
        A HEAD request gets the head and not a byte of body, not even a
        chunk terminator.
        """
        self.start(method=b"HEAD")
        head = self.respond()
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        self.r.send(E1)
        self.gw.clock.advance(0)
        self.r.send(E2)
        self.r.end()
        self.gw.clock.advance(0)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(len(self.gw.accounting.exchanges), 1)

    def test_encoder_keeps_twisted_path(self) -> None:
        """A request with a content encoder has its body chunks encoded."""
        self.start()
        self.request._encoder = _Upper()
        self.respond()
        self.r.send(E1)
        self.gw.clock.advance(0)
        self.r.send(E2)
        self.gw.clock.advance(0)
        self.assertEqual(
            self.transport.value(),
            b"%x\r\n%s\r\n%x\r\n%s\r\n" % (len(E1), E1.upper(), len(E2), E2.upper()),
        )

    def test_writes_after_disconnect_dropped(self) -> None:
        """
        Events that arrive after the client left (before the upstream's
        close reaches the relay) are written nowhere, coalesced or not.
        """
        for coalesce in (True, False):
            self.start(coalesce=coalesce)
            self.respond()
            self.r.send(E1)
            self.gw.clock.advance(0)
            sent = self.transport.value()
            self.channel.connectionLost(Failure(ConnectionDone()))
            self.r.send(E2)
            self.gw.clock.advance(0)
            self.assertEqual(self.transport.value(), sent)
            [ex] = self.gw.accounting.exchanges
            self.assertEqual(ex.outcome, "client_cancelled")

    def test_send_after_disconnect_dropped(self) -> None:
        """
        Body bytes handed to the client side after its connection was lost
        are dropped, even on a path that did not see the loss first.
        """
        self.start()
        self.respond()
        self.r.send(E1)
        self.gw.clock.advance(0)
        sent = self.transport.value()
        [relay] = self.gw.resource.active
        self.request.connectionLost(Failure(ConnectionDone()))
        relay._send(E2)
        self.assertEqual(self.transport.value(), sent)

    def test_send_after_finish_raises(self) -> None:
        """
        A body write after the request finished raises, as twisted.web's
        Request.write does: never a chunk after the terminator.
        """
        self.start()
        self.respond()
        [relay] = self.gw.resource.active
        self.r.send(E1)
        self.r.end()
        sent = self.transport.value()
        self.assertRaises(RuntimeError, relay._send, E2)
        self.assertEqual(self.transport.value(), sent)

    def test_backpressure_pauses_upstream(self) -> None:
        """
        A client that stops reading pauses the upstream read while the
        relay frames chunks itself; reading again resumes it.
        """
        self.start()
        self.respond()
        self.r.send(E1)
        self.gw.clock.advance(0)
        self.channel.pauseProducing()
        self.assertEqual(self.r.transport.paused, 1)
        self.channel.resumeProducing()
        self.assertEqual(self.r.transport.resumed, 1)

"""
Secrets an upstream echoes back (the provider key, organization and
project ids) are redacted from relayed error bodies and response headers.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from llmgate.relay.redact import Redactor
from tests.fakes import FakeResponse, Gateway, parse_response

# The key tests.fakes.make_config gives the "oai" provider.
KEY = b"sk-upstream-oai"


class RedactorTests(SynchronousTestCase):
    def test_configured_key_and_key_shapes(self) -> None:
        """
        The configured key, any sk- key (masked or not), org- and proj_ ids
        are replaced; a key not shaped like sk- is replaced when it is the
        configured one.
        """
        r = Redactor(["my-custom-provider-secret"])
        got = r(
            b"Incorrect API key provided: sk-proj-****abcd. key my-custom-provider-secret, "
            b"org org-AbC123 project proj_AbCdEf123456 other sk-ant-api03-xyz"
        )
        self.assertEqual(
            got,
            b"Incorrect API key provided: [redacted]. key [redacted], "
            b"org [redacted] project [redacted] other [redacted]",
        )

    def test_words_that_merely_contain_the_patterns_are_kept(self) -> None:
        """task-1, my-org-x or proj_name are not secrets."""
        text = b"task-1 my-org-x proj_name desk-lamp"
        self.assertEqual(Redactor()(text), text)

    def test_short_configured_key_is_not_replaced_everywhere(self) -> None:
        """A key of a few letters (a test or demo key) does not garble bodies."""
        self.assertEqual(Redactor(["k"])(b'{"kind":"k"}'), b'{"kind":"k"}')


class RelayRedactionTests(SynchronousTestCase):
    def test_error_body_and_headers_redacted(self) -> None:
        """
        A 400 whose body quotes the provider key and the organization, with
        a header echoing the key, reaches the client with neither, as valid
        JSON with a matching Content-Length.
        """
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": []})
        err = (
            b'{"error":{"message":"Key sk-upstream-oai is not allowed for org-9xYz2 '
            b'(Incorrect API key provided: sk-upst*****-oai)","type":"invalid_request_error"}}'
        )
        r = FakeResponse(
            400,
            {
                b"content-type": [b"application/json"],
                b"x-debug-key": [b"Bearer " + KEY],
                b"x-request-id": [b"req_1"],
            },
        )
        gw.http.calls[0]["deferred"].callback(r)
        r.send(err[:30])
        r.send(err[30:])
        r.end()
        raw = t.value()
        self.assertNotIn(KEY, raw)
        self.assertNotIn(b"org-9xYz2", raw)
        self.assertNotIn(b"sk-upst", raw)
        status, headers, body, complete = parse_response(raw)
        self.assertEqual((status, complete), (400, True))
        self.assertEqual(headers[b"x-debug-key"], [b"Bearer [redacted]"])
        self.assertEqual(headers[b"x-upstream-request-id"], [b"req_1"])
        self.assertEqual(
            json.loads(body)["error"]["message"],
            "Key [redacted] is not allowed for [redacted] (Incorrect API key provided: [redacted])",
        )

    def test_success_headers_redacted(self) -> None:
        """Headers of a successful response are redacted too."""
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": []})
        r = FakeResponse(200, {b"content-type": [b"application/json"], b"x-echo": [KEY]})
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b"{}")
        r.end()
        self.assertNotIn(KEY, t.value())

    def test_error_body_over_cap_is_502(self) -> None:
        """
        An error body over 64 KiB is not held further: the upstream is
        closed and the client gets a 502 in its dialect, not a part of it.
        """
        gw = Gateway()
        _, t = gw.post("/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": []})
        r = FakeResponse(500, {b"content-type": [b"application/json"]})
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b'{"error":"' + b"x" * 40000)
        self.assertFalse(r.transport.stopped)
        self.assertEqual(t.value(), b"")
        r.send(b"x" * 40000)
        self.assertTrue(r.transport.stopped)
        gw.clock.advance(0)  # the stopped upstream ends a turn later, as a real one does
        status, _, body, _ = parse_response(t.value())
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["type"], "error")
        [ex] = gw.accounting.exchanges
        self.assertEqual(ex.outcome, "upstream_error")

    def test_error_on_event_stream_route_is_held_too(self) -> None:
        """
        An error answered to a streaming request (even labelled as an event
        stream) is held and redacted, not streamed out.
        """
        gw = Gateway()
        _, t = gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": []})
        r = FakeResponse(429, {b"content-type": [b"text/event-stream"]})
        gw.http.calls[0]["deferred"].callback(r)
        self.assertEqual(t.value(), b"")
        r.send(b'{"error":{"message":"org-Q1w2e3 is rate limited"}}')
        r.end()
        status, _, body, _ = parse_response(t.value())
        self.assertEqual(status, 429)
        self.assertEqual(body, b'{"error":{"message":"[redacted] is rate limited"}}')

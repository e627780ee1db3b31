"""
What an open stream keeps: few objects for the cyclic collector to walk.

The collector's middle and full collections walk every tracked object of
every open stream, so their pauses grow with the objects each stream keeps
(at 5,000 open streams, every object a stream keeps is 5,000 more to walk).
These tests open streams through the real Site, resource, routing, relay
and accounting over in-memory transports, relaying, and count what they
keep once the first event went out.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.recorder import RequestCounter, estimate_usage
from tests.fakes import FakeResponse, Gateway

CHAT = {
    "model": "gpt-4o",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and again"},
    ],
}
UPSTREAM_HEAD = {
    b"content-type": [b"text/event-stream; charset=utf-8"],
    b"x-request-id": [b"req_1"],
    b"openai-processing-ms": [b"5"],
    b"openai-organization": [b"org-1"],
    b"date": [b"Mon, 30 Nov 2026 20:00:00 GMT"],
}
E1 = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'

# Tracked objects per open stream, the test doubles' own included (a
# channel's StringTransport and its buffer, the fake upstream response and
# its transport): 45 here. Before the heads, the parsed body and the
# routing state were let go once relaying, it was 77 (about 124 in a real
# process); with the heads emptied in place rather than replaced, 50.
MAX_PER_STREAM = 48


class FootprintTests(SynchronousTestCase):
    """An open, relaying stream keeps few objects."""

    def setUp(self) -> None:
        self.gw = Gateway()
        self.kept: list[Any] = []

    def post(self) -> tuple[Any, Any]:
        return self.gw.post(
            "/v1/chat/completions", CHAT, headers={"User-Agent": "OpenAI/Python 1.0", "Accept": "application/json", "X-Stainless-Lang": "python"}
        )

    def respond(self, channel: Any, transport: Any, call: dict[str, Any]) -> tuple[Any, Any, FakeResponse]:
        response = FakeResponse(200, UPSTREAM_HEAD)
        call["deferred"].callback(response)
        response.send(E1)
        self.gw.clock.advance(0)
        transport.clear()
        self.kept.append((channel, transport, response))
        return channel, transport, response

    def open_stream(self) -> tuple[Any, Any, FakeResponse]:
        channel, transport = self.post()
        return self.respond(channel, transport, self.gw.http.calls[-1])

    def test_tracked_objects_per_open_stream(self) -> None:
        """
        A relaying stream keeps at most MAX_PER_STREAM objects that the
        cyclic collector tracks. As in a running gateway, what the request
        made before the upstream answered is in the old generation by then
        (where an emptied dict stays tracked).
        """
        for _ in range(10):
            # Lazily built module state is not the streams'.
            self.open_stream()
        self.gw.http.calls.clear()
        gc.collect()
        before = {id(o) for o in gc.get_objects()}
        n = 200
        posted = [self.post() for _ in range(n)]
        calls = list(self.gw.http.calls)
        self.gw.http.calls.clear()
        gc.collect()
        for (channel, transport), call in zip(posted, calls):
            self.respond(channel, transport, call)
        del posted, calls
        self.gw.clock.advance(0)
        # (A young collection untracks the young dicts and tuples that hold
        # no tracked object, as a running gateway's do.)
        gc.collect(0)
        new = [o for o in gc.get_objects() if id(o) not in before]
        kinds = Counter(type(o).__qualname__ for o in new)
        del new
        per_stream = sum(kinds.values()) / n
        self.assertLessEqual(
            per_stream,
            MAX_PER_STREAM,
            f"{per_stream:.1f} tracked objects per open stream: "
            + ", ".join(f"{k} {v / n:.1f}" for k, v in kinds.most_common(12)),
        )

    def test_relaying_makes_no_young_objects_that_stay(self) -> None:
        """
        Relaying an event on every open stream leaves no new tracked object
        alive per stream: at a steady number of streams the allocation
        count then stays flat, and a young collection (on the timer, late
        when the reactor is saturated) would walk every one of them.
        """
        streams = [self.open_stream() for _ in range(100)]
        self.gw.http.calls.clear()
        for _ in range(2):
            gc.collect()
            for _, _, response in streams:
                response.send(E1)
            self.gw.clock.advance(0)
        young = Counter(type(o).__qualname__ for o in gc.get_objects(0))
        # The test doubles' client transports buffer what they were sent.
        young.pop("BytesIO", None)
        self.assertLessEqual(sum(young.values()), 10, dict(young.most_common(8)))

    def test_heads_let_go_once_relaying(self) -> None:
        """
        Once the stream relays, the heads nobody reads again are empty (the
        client's request and response headers, the upstream's response
        headers), the parsed body is replaced by the bytes sent upstream
        and the request buffer is gone, while the client got every header.
        """
        channel, transport, response = self.open_stream()
        request = channel.requests[0]
        self.assertEqual(list(request.requestHeaders.getAllRawHeaders()), [])
        self.assertEqual(list(request.responseHeaders.getAllRawHeaders()), [])
        self.assertEqual(list(response.headers.getAllRawHeaders()), [])
        self.assertIsNone(request.content)
        relay = next(iter(self.gw.resource.active))
        self.assertIsInstance(relay.exchange.body, bytes)
        self.assertEqual(json.loads(relay.exchange.body)["messages"], CHAT["messages"])
        # What the client got is unchanged: the upstream's headers and the
        # gateway's own, before the first event.
        response.send(b"data: [DONE]\n\n")
        response.end()
        self.gw.clock.advance(0)
        self.assertEqual(len(self.gw.accounting.exchanges), 1)

    def test_client_head_complete(self) -> None:
        """The client's response head still carries every relayed header."""
        gw = self.gw
        channel, transport = gw.post("/v1/chat/completions", CHAT)
        gw.http.calls[-1]["deferred"].callback(FakeResponse(200, UPSTREAM_HEAD))
        gw.clock.advance(0)
        head = transport.value().split(b"\r\n\r\n")[0].lower()
        for line in (
            b"content-type: text/event-stream; charset=utf-8",
            b"x-upstream-request-id: req_1",
            b"openai-processing-ms: 5",
            b"cache-control: no-cache",
            b"x-accel-buffering: no",
            b"transfer-encoding: chunked",
        ):
            self.assertIn(line, head)


class StreamStartedTests(SynchronousTestCase):
    def test_hook_called_once_per_stream_started(self) -> None:
        """
        The resource tells the collector's young collections of each stream
        it starts upstream, and not of a request it refuses.
        """
        gw = Gateway()
        started: list[int] = []
        gw.resource.stream_started = lambda: started.append(1)
        gw.post("/v1/chat/completions", CHAT)
        gw.post("/v1/chat/completions", CHAT)
        gw.post("/v1/chat/completions", None, raw=b"{not json")
        self.assertEqual(len(gw.http.calls), 2)
        self.assertEqual(len(started), 2)


class EstimateFromBytesTests(SynchronousTestCase):
    def test_estimate_from_sent_bytes(self) -> None:
        """
        The prompt estimate of an answered stream, which keeps the bytes
        sent upstream instead of the parsed body, is the parsed body's.
        """
        def counter() -> RequestCounter:
            c = RequestCounter("openai.chat", False)
            c.sse = True
            return c

        doc = {"model": "gpt-4o", "messages": [{"role": "user", "content": "how many tokens is this prompt"}]}
        from_doc = estimate_usage(counter(), "gpt-4o", doc)
        from_bytes = estimate_usage(counter(), "gpt-4o", json.dumps(doc).encode())
        self.assertGreater(from_doc.input_tokens, 5)
        self.assertEqual(from_bytes.input_tokens, from_doc.input_tokens)
        # Bytes that do not parse (they did once, at admission) estimate no
        # prompt rather than lose the record.
        self.assertEqual(estimate_usage(counter(), "gpt-4o", b"not json").input_tokens, 0)

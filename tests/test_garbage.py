"""
Requests leave no cyclic garbage behind, whatever their outcome.

Objects in reference cycles are freed only by the cyclic collector, whose
full collections walk every tracked object: with tens of objects of cyclic
garbage per request, a busy gateway paused for hundreds of milliseconds. So
every request is run here through the real Site, resource, relay and
accounting, with the collector off, and C{gc.collect()} must then find
nothing to free. On failure the message names the types that were freed.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from typing import Any, Callable

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import SSE_HEADERS, FakeResponse, Gateway, make_config

CHAT = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
PLAIN = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
E1 = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
DONE = b"data: [DONE]\n\n"
JSON_BODY = json.dumps(
    {"id": "x", "choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
).encode()


def cyclic_garbage(run: Callable[[], Any]) -> Counter[str]:
    """
    The types of the objects that only the cyclic collector frees after
    C{run()} (which must drop every reference it made).
    """
    gc.collect()
    flags = gc.get_debug()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        run()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(flags)
        del gc.garbage[:]
        if was_enabled:
            gc.enable()
    return found


def close(channel: Any) -> None:
    """
    The client closes its connection, as every client eventually does; the
    transport lets go of its producer first, as a TCP transport does.
    """
    transport = channel.transport
    if transport is not None:
        transport.producer = None
        channel.connectionLost(Failure(ConnectionDone()))


class GarbageTests(SynchronousTestCase):
    """Every outcome of a request, through the in-memory gateway."""

    def setUp(self) -> None:
        self.gw = Gateway()

    def assertNoGarbage(self, scenario: Callable[[Gateway], Any], times: int = 3) -> None:
        gw = self.gw
        # A first run warms caches (lazily built module state) that are no
        # garbage.
        scenario(gw)
        gw.clock.advance(0)
        self._forget(gw)

        def run() -> None:
            for _ in range(times):
                scenario(gw)
            gw.clock.advance(0)
            gw.clock.advance(0)
            self._forget(gw)

        found = cyclic_garbage(run)
        self.assertEqual(found, Counter(), f"cyclic garbage left by {times} requests: {dict(found.most_common(40))}")

    def _forget(self, gw: Gateway) -> None:
        """Drop what the test doubles themselves keep of each request."""
        gw.http.calls.clear()
        gw.accounting.exchanges.clear()
        self.flushLoggedErrors()

    def respond(self, gw: Gateway, code: int = 200, headers: Any = None) -> FakeResponse:
        call = gw.http.calls[-1]
        r = FakeResponse(code, SSE_HEADERS if headers is None else headers)
        call["deferred"].callback(r)
        return r

    def test_completed_stream(self) -> None:
        """A stream relayed to its end, then the connection closed."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            r = self.respond(gw)
            r.send(E1)
            gw.clock.advance(0)
            r.send(USAGE + DONE)
            r.end()
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_completed_json(self) -> None:
        """A non-streamed answer relayed whole."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", PLAIN)
            r = self.respond(gw, headers={b"content-type": [b"application/json"]})
            r.send(JSON_BODY)
            r.end()
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_client_gone_mid_stream(self) -> None:
        """The client disconnects while the stream is relayed."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            r = self.respond(gw)
            r.send(E1)
            gw.clock.advance(0)
            close(channel)
            gw.clock.advance(0)

        self.assertNoGarbage(scenario)

    def test_client_gone_waiting_for_headers(self) -> None:
        """The client disconnects before the upstream answered."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            close(channel)
            gw.clock.advance(0)

        self.assertNoGarbage(scenario)

    def test_upstream_error_status(self) -> None:
        """An upstream 429 relayed with its body."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            r = self.respond(gw, 429, {b"content-type": [b"application/json"]})
            r.send(b'{"error":{"message":"slow down"}}')
            r.end()
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_upstream_unreachable(self) -> None:
        """The upstream refuses the connection: 502."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            gw.http.calls[-1]["deferred"].errback(Failure(ConnectionRefusedError()))
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_upstream_reset_mid_stream(self) -> None:
        """The upstream connection breaks mid-stream: an in-band error."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            r = self.respond(gw)
            r.send(E1)
            gw.clock.advance(0)
            r.fail()
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_headers_timeout(self) -> None:
        """No upstream headers in time: 504."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            gw.clock.advance(gw.cfg.timeouts.headers + 1)
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_idle_timeout(self) -> None:
        """An upstream that stalls mid-stream is cut."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            r = self.respond(gw)
            r.send(E1)
            gw.clock.advance(0)
            gw.clock.advance(gw.cfg.timeouts.idle + 1)
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_bad_json(self) -> None:
        """A body that is not JSON: 400."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", None, raw=b"{not json")
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_unknown_model(self) -> None:
        """A model no provider serves: 404."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/messages", {"model": "nope", "max_tokens": 5, "messages": []})
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_unknown_route(self) -> None:
        """A path with no route: 404."""

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/nowhere", PLAIN)
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_too_large(self) -> None:
        """A body over the cap: 413 before it is read."""
        self.gw = Gateway(max_body=1000)

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", None, raw=b"x" * 2000)
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

    def test_bad_key(self) -> None:
        """A keyed gateway refuses a wrong key: 401."""
        self.gw = Gateway(make_config(keys={"team": {"api_key_env": "GW_KEY"}}))

        def scenario(gw: Gateway) -> None:
            channel, _ = gw.post("/v1/chat/completions", CHAT, headers={"Authorization": "Bearer wrong"})
            gw.clock.advance(0)
            close(channel)

        self.assertNoGarbage(scenario)

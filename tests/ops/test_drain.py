"""Graceful stop: finish what can finish, cut and record the rest."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops.drain import Drain
from tests.fakes import SSE_HEADERS, FakeResponse, Gateway, parse_response

E = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = Gateway()
        self.drain = Drain(self.gw.resource, self.gw.clock, grace=10)
        self.drain.startService()

    def test_idle_stop_is_immediate(self) -> None:
        """With nothing in flight the stop does not wait."""
        self.successResultOf(self.drain.stopService())

    def test_stream_that_finishes_in_time(self) -> None:
        """A stream that ends within the grace period ends normally."""
        _, t = self.gw.post("/v1/chat/completions", {"model": "m", "stream": True})
        r = FakeResponse(200, SSE_HEADERS)
        self.gw.http.calls[0]["deferred"].callback(r)
        d = self.drain.stopService()
        self.assertNoResult(d)
        r.send(E + b"data: [DONE]\n\n")
        r.end()
        self.gw.clock.advance(0.1)
        self.successResultOf(d)
        self.assertTrue(parse_response(t.value())[3])
        self.assertEqual(self.gw.accounting.exchanges[0].outcome, "completed")

    def test_new_requests_refused_while_draining(self) -> None:
        """A request on a kept-alive connection during the drain gets a 503."""
        self.gw.post("/v1/chat/completions", {"model": "m", "stream": True})
        self.drain.stopService()
        _, t = self.gw.post("/v1/messages", {"model": "m"})
        status, headers, _, _ = parse_response(t.value())
        self.assertEqual(status, 503)
        self.assertEqual(headers[b"retry-after"], [b"1"])

    def test_streams_cut_after_grace(self) -> None:
        """
        Streams still running after the grace period get an in-band error
        and are recorded; requests still waiting for headers get a 503.
        """
        _, t1 = self.gw.post("/v1/chat/completions", {"model": "m", "stream": True})
        _, t2 = self.gw.post("/v1/messages", {"model": "m", "stream": True})
        r = FakeResponse(200, SSE_HEADERS)
        self.gw.http.calls[0]["deferred"].callback(r)
        r.send(E)
        d = self.drain.stopService()
        self.gw.clock.pump([0.05] * 210)
        self.successResultOf(d)
        self.assertTrue(r.transport.stopped)
        self.assertIn(b"shutting down", parse_response(t1.value())[2])
        self.assertEqual(parse_response(t2.value())[0], 503)
        self.assertEqual(len(self.gw.accounting.exchanges), 2)
        self.assertEqual(self.gw.resource.active, set())


class OrderedStopTests(SynchronousTestCase):
    def test_children_stop_one_after_another(self) -> None:
        """Each child stops only once the one added after it has stopped."""
        from twisted.application.service import Service
        from twisted.internet.defer import Deferred

        from llmgate.service import OrderedMultiService

        events: list[str] = []
        gates: dict[str, Deferred[None]] = {}

        class Child(Service):
            def __init__(self, name: str) -> None:
                self.name = name

            def stopService(self) -> Deferred[None]:
                events.append(self.name)
                gates[self.name] = Deferred()
                return gates[self.name]

        top = OrderedMultiService()
        for n in ("ledger", "pool", "drain"):
            Child(n).setServiceParent(top)
        top.startService()
        d = top.stopService()
        self.assertEqual(events, ["drain"])
        gates["drain"].callback(None)
        self.assertEqual(events, ["drain", "pool"])
        gates["pool"].callback(None)
        gates["ledger"].callback(None)
        self.successResultOf(d)
        self.assertEqual(events, ["drain", "pool", "ledger"])

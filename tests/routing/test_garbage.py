"""A request that failed over leaves no cyclic garbage (see tests/test_garbage.py)."""

from __future__ import annotations

from collections import Counter

from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import SSE_HEADERS, FakeResponse
from tests.routing.helpers import CHAT, DONE, E1, USAGE, FixedRng, routed_gateway
from tests.test_garbage import close, cyclic_garbage


class FailoverGarbageTests(SynchronousTestCase):
    def run_scenario(self, scenario) -> None:  # type: ignore[no-untyped-def]
        gw = routed_gateway()
        gw.resource.rng = FixedRng()

        def forget() -> None:
            gw.http.calls.clear()
            gw.accounting.exchanges.clear()
            gw.accounting.ledger.records.clear()
            gw.accounting.ledger.opened.clear()

        scenario(gw)
        gw.clock.advance(0)
        forget()

        def run() -> None:
            for _ in range(3):
                scenario(gw)
            gw.clock.advance(0)
            gw.clock.advance(0)
            forget()

        found = cyclic_garbage(run)
        self.assertEqual(found, Counter(), f"cyclic garbage: {dict(found.most_common(40))}")

    def test_status_failover(self) -> None:
        """A 503, then a stream served by the other deployment."""

        def scenario(gw) -> None:  # type: ignore[no-untyped-def]
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            gw.http.calls[-1]["deferred"].callback(FakeResponse(503, {b"content-type": [b"application/json"]}))
            r = FakeResponse(200, SSE_HEADERS)
            gw.http.calls[-1]["deferred"].callback(r)
            r.send(E1 + USAGE + DONE)
            r.end()
            gw.clock.advance(0)
            close(channel)

        self.run_scenario(scenario)

    def test_every_attempt_fails(self) -> None:
        """Connect failures on every attempt: the last one's 502 relayed."""

        def scenario(gw) -> None:  # type: ignore[no-untyped-def]
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            gw.http.calls[-1]["deferred"].errback(Failure(ConnectionRefusedError()))
            gw.http.calls[-1]["deferred"].errback(Failure(ConnectionRefusedError()))
            gw.clock.advance(0)
            close(channel)

        self.run_scenario(scenario)

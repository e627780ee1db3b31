"""A request that failed over leaves no cyclic garbage (see tests/test_garbage.py)."""

from __future__ import annotations

from collections import Counter

from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.routing.helpers import CHAT, DONE, E1, USAGE, FixedRng, answer, routed_gateway
from tests.test_garbage import close, cyclic_garbage


class FailoverGarbageTests(SynchronousTestCase):
    def run_scenario(self, scenario, models=None) -> None:  # type: ignore[no-untyped-def]
        gw = routed_gateway(models=models)
        gw.resource.rng = FixedRng()

        def forget() -> None:
            gw.http.calls.clear()
            gw.accounting.exchanges.clear()
            gw.accounting.ledger.records.clear()
            gw.accounting.ledger.opened.clear()

        scenario(gw)
        gw.clock.advance(0)
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
            answer(gw, -1, 503, {b"content-type": [b"application/json"]})
            r = answer(gw, -1)
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

    def test_hedge_wins(self) -> None:
        """A hedge races the first attempt and wins: the loser is let go and recorded."""
        from tests.routing.test_hedge import ROLE, hedged_models

        def scenario(gw) -> None:  # type: ignore[no-untyped-def]
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            slow = answer(gw, -1)
            slow.send(ROLE)
            gw.clock.advance(0.6)
            fast = answer(gw, -1)
            fast.send(E1 + USAGE + DONE)
            fast.end()
            gw.clock.advance(0)
            gw.clock.advance(0)
            close(channel)

        self.run_scenario(scenario, hedged_models())

    def test_hedge_loses_waiting_for_headers(self) -> None:
        """The first attempt wins while the hedge waits for headers: the hedge's request is cancelled."""
        from tests.routing.test_hedge import hedged_models

        def scenario(gw) -> None:  # type: ignore[no-untyped-def]
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            gw.clock.advance(0.6)
            r = answer(gw, -2)  # the first attempt (the hedge is the latest call)
            r.send(E1 + USAGE + DONE)
            r.end()
            gw.clock.advance(0)
            gw.clock.advance(0)
            close(channel)

        self.run_scenario(scenario, hedged_models())

    def test_client_gone_during_race(self) -> None:
        """The client leaves while two attempts race."""
        from tests.routing.test_hedge import ROLE, hedged_models

        def scenario(gw) -> None:  # type: ignore[no-untyped-def]
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            slow = answer(gw, -1)
            slow.send(ROLE)
            gw.clock.advance(0.6)
            close(channel)
            gw.clock.advance(0)

        self.run_scenario(scenario, hedged_models())

    def test_error_first_failover(self) -> None:
        """An Anthropic stream that begins with an error, then the other deployment serves."""
        from tests.routing.test_gate import BLOCK, CLAUDE, ERROR, MSG, START, STOP

        def scenario(gw) -> None:  # type: ignore[no-untyped-def]
            channel, _ = gw.post("/v1/messages", MSG)
            bad = answer(gw, -1)
            bad.send(START + ERROR)
            gw.clock.advance(0)
            good = answer(gw, -1)
            good.send(START + BLOCK + STOP)
            good.end()
            gw.clock.advance(0)
            close(channel)

        self.run_scenario(scenario, CLAUDE)

    def test_retry_same_after_wait(self) -> None:
        """A 429 with a short retry-after on the only deployment, then its success."""

        def scenario(gw) -> None:  # type: ignore[no-untyped-def]
            channel, _ = gw.post("/v1/chat/completions", {**CHAT, "model": "small"})
            answer(gw, -1, 429, {b"content-type": [b"application/json"], b"retry-after": [b"1"]})
            gw.clock.advance(1)
            r = answer(gw, -1)
            r.send(E1 + USAGE + DONE)
            r.end()
            gw.clock.advance(0)
            close(channel)

        self.run_scenario(scenario)

    def test_client_gone_with_two_gated_streams(self) -> None:
        """The client leaves while both racing attempts hold a 200 stream."""
        from tests.routing.test_hedge import ROLE, hedged_models

        def scenario(gw) -> None:  # type: ignore[no-untyped-def]
            channel, _ = gw.post("/v1/chat/completions", CHAT)
            first = answer(gw, -1)
            first.send(ROLE)
            gw.clock.advance(0.6)
            hedge = answer(gw, -1)
            hedge.send(ROLE)
            close(channel)
            gw.clock.advance(0)

        self.run_scenario(scenario, hedged_models())

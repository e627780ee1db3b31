"""
Hedging, retry-after on the same deployment, and the attempt counters,
through the in-memory gateway (timers on its MemoryReactorClock).
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops.metrics import Metrics
from llmgate.routing.attempts import HedgeBudget
from tests.fakes import parse_response
from tests.routing.helpers import CHAT, DONE, E1, USAGE, FixedRng, answer, host, routed_gateway

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
E2 = b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n'
JSON = {b"content-type": [b"application/json"]}


def hedged_models(after=0.5, fraction=1.0):  # type: ignore[no-untyped-def]
    return {
        "gpt-4o": {
            "deployments": [
                {"provider": "a", "upstream_model": "gpt-4o-a", "weight": 3},
                {"provider": "b", "upstream_model": "gpt-4o-b"},
            ],
            "hedge_after": after,
            "hedge_max_fraction": fraction,
        },
        "small": {"provider": "b", "upstream_model": "small-b"},
    }


def metric(gw, name, **labels):  # type: ignore[no-untyped-def]
    v = gw.accounting.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


class HedgeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = routed_gateway(models=hedged_models())
        self.gw.resource.rng = FixedRng(0.1)
        self.gw.accounting.metrics = Metrics(models=["gpt-4o", "small"])

    def test_hedge_starts_after_hedge_after(self) -> None:
        """No first content within hedge_after: the same request starts on the other deployment, not before."""
        gw = self.gw
        gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(0.4)
        self.assertEqual(len(gw.http.calls), 1)
        gw.clock.advance(0.2)
        self.assertEqual([host(c) for c in gw.http.calls], ["a.test", "b.test"])
        self.assertEqual(json.loads(gw.http.calls[1]["data"])["model"], "gpt-4o-b")
        self.assertEqual(
            gw.http.calls[1]["headers"].getRawHeaders(b"x-request-id"),
            gw.http.calls[0]["headers"].getRawHeaders(b"x-request-id"),
        )

    def test_hedge_wins(self) -> None:
        """The hedge reaches content first: it is relayed, the first attempt is cancelled at once and recorded as hedge_lost with its cost."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        slow = answer(gw, 0)
        slow.send(ROLE)
        gw.clock.advance(0.6)
        fast = answer(gw, 1)
        fast.send(ROLE + E2)
        # Cancelled in the same turn as the hedge's first content.
        self.assertTrue(slow.transport.stopped)
        gw.clock.advance(0)
        fast.send(USAGE + DONE)
        fast.end()
        gw.clock.advance(0)
        gw.clock.advance(0)
        status, _, body, complete = parse_response(transport.value())
        self.assertEqual((status, body, complete), (200, ROLE + E2 + DONE, True))
        recs = gw.accounting.ledger.records
        self.assertEqual(len(recs), 2)
        [lost] = [r for r in recs if r.parent_request_id]
        [served] = [r for r in recs if not r.parent_request_id]
        self.assertEqual((served.attempt, served.provider, served.hedged, served.output_tokens), (2, "b", True, 1))
        self.assertEqual(
            (lost.attempt, lost.provider, lost.outcome, lost.parent_request_id, lost.request_id, lost.hedged),
            (1, "a", "hedge_lost", served.request_id, served.request_id + "-1", False),
        )
        # Its tokens: the prompt, estimated (the provider reported nothing).
        self.assertEqual(lost.source, "estimated")
        self.assertGreater(lost.input_tokens, 0)
        self.assertEqual(gw.resource.active, set())
        self.assertEqual(metric(gw, "llmgate_hedges_total", model="gpt-4o", result="won"), 1)
        self.assertEqual(metric(gw, "llmgate_upstream_attempts_total", provider="a", reason="first"), 1)
        self.assertEqual(metric(gw, "llmgate_upstream_attempts_total", provider="b", reason="hedge"), 1)

    def test_first_attempt_wins(self) -> None:
        """The first attempt's content comes first: the hedge (still waiting for headers) is cancelled and recorded as hedge_lost."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(0.6)
        self.assertEqual(len(gw.http.calls), 2)
        first = answer(gw, 0)
        first.send(E1)
        self.assertTrue(gw.http.calls[1]["cancelled"])
        first.send(USAGE + DONE)
        first.end()
        gw.clock.advance(0)
        gw.clock.advance(0)
        status, _, body, _ = parse_response(transport.value())
        self.assertEqual((status, body), (200, E1 + DONE))
        [lost] = [r for r in gw.accounting.ledger.records if r.parent_request_id]
        [served] = [r for r in gw.accounting.ledger.records if not r.parent_request_id]
        self.assertEqual((served.attempt, served.provider, served.hedged), (1, "a", True))
        self.assertEqual((lost.attempt, lost.provider, lost.outcome, lost.request_id), (2, "b", "hedge_lost", served.request_id + "-2"))
        self.assertEqual(metric(gw, "llmgate_hedges_total", model="gpt-4o", result="lost"), 1)
        self.assertEqual(gw.resource.active, set())

    def test_hedge_failure_leaves_first_running(self) -> None:
        """The hedge answers 500 before its first byte: the first attempt goes on and serves; one record per attempt."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(0.6)
        answer(gw, 1, 500, JSON)
        self.assertEqual(len(gw.http.calls), 2)
        first = answer(gw, 0)
        first.send(E1 + USAGE + DONE)
        first.end()
        gw.clock.advance(0)
        status, _, body, _ = parse_response(transport.value())
        self.assertEqual((status, body), (200, E1 + DONE))
        recs = gw.accounting.ledger.records
        self.assertEqual(sorted((r.attempt, r.outcome, r.status) for r in recs), [(1, "completed", 200), (2, "upstream_error", 500)])

    def test_first_fails_hedge_serves(self) -> None:
        """The first attempt fails while the hedge runs: the hedge serves the client alone."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(0.6)
        answer(gw, 0, 503, JSON)
        self.assertEqual(len(gw.http.calls), 2)
        r = answer(gw, 1)
        r.send(E2 + USAGE + DONE)
        r.end()
        gw.clock.advance(0)
        status, _, body, _ = parse_response(transport.value())
        self.assertEqual((status, body), (200, E2 + DONE))
        recs = sorted((r.attempt, r.outcome, r.provider, r.parent_request_id is None) for r in gw.accounting.ledger.records)
        self.assertEqual(recs, [(1, "upstream_error", "a", False), (2, "completed", "b", True)])

    def test_no_hedge_after_commit(self) -> None:
        """Content before hedge_after: no hedge, its timer gone."""
        gw = self.gw
        gw.post("/v1/chat/completions", CHAT)
        r = answer(gw, 0)
        r.send(E1)
        gw.clock.advance(5)
        self.assertEqual(len(gw.http.calls), 1)
        r.send(USAGE + DONE)
        r.end()
        gw.clock.advance(0)
        [rec] = gw.accounting.ledger.records
        self.assertFalse(rec.hedged)

    def test_fraction_caps_hedges(self) -> None:
        """hedge_max_fraction = 0.5: of three slow requests, only the second gets a hedge."""
        gw = routed_gateway(models=hedged_models(fraction=0.5))
        gw.resource.rng = FixedRng(0.1, 0.1, 0.1, 0.1)
        for _ in range(3):
            gw.post("/v1/chat/completions", CHAT)
            gw.clock.advance(0.6)
        self.assertEqual([host(c) for c in gw.http.calls], ["a.test", "a.test", "b.test", "a.test"])

    def test_p95_mode(self) -> None:
        """hedge_after = "p95": the timer is the deployment's observed p95 TTFT; no hedge while it is unknown."""
        gw = routed_gateway(models=hedged_models(after="p95"))
        gw.resource.rng = FixedRng(0.1, 0.1)
        p95 = {}
        gw.resource.breakers.ttft_p95 = lambda key: p95.get(key)
        gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(100)
        self.assertEqual(len(gw.http.calls), 1)
        p95[("a", "gpt-4o-a")] = 2.0
        gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(1.9)
        self.assertEqual(len(gw.http.calls), 2)
        gw.clock.advance(0.2)
        self.assertEqual(host(gw.http.calls[2]), "b.test")

    def test_p95_mode_takes_the_fastest_deployments_p95(self) -> None:
        """hedge_after = "p95": the first attempt on the deployment with a p95 of 2 s is hedged after the other's 0.3 s."""
        gw = routed_gateway(models=hedged_models(after="p95"))
        gw.resource.rng = FixedRng(0.1, 0.1)
        gw.resource.breakers.ttft_p95 = {("a", "gpt-4o-a"): 2.0, ("b", "gpt-4o-b"): 0.3}.get
        gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(0.29)
        self.assertEqual(len(gw.http.calls), 1)
        gw.clock.advance(0.02)
        self.assertEqual([host(c) for c in gw.http.calls], ["a.test", "b.test"])

    def hedge_wins(self) -> None:
        """One request: the first attempt (a) sends its role chunk, the hedge (b, after 0.6 s) its content first and ends."""
        gw = self.gw
        gw.post("/v1/chat/completions", CHAT)
        slow = answer(gw, 0)
        slow.send(ROLE)
        gw.clock.advance(0.6)
        fast = answer(gw, 1)
        fast.send(ROLE + E2)
        gw.clock.advance(0)
        fast.send(USAGE + DONE)
        fast.end()
        gw.clock.advance(0)
        gw.clock.advance(0)

    def test_loser_cost_charged_to_key(self) -> None:
        """The hedge loser's record (with its estimated cost) is charged to its key's budget (on_charge, wired to the quotas)."""
        gw = self.gw
        self.assertEqual(gw.accounting.on_charge, gw.resource.quotas.charge)
        charged = []
        gw.accounting.on_charge = charged.append
        self.hedge_wins()
        [lost] = [r for r in gw.accounting.ledger.records if r.outcome == "hedge_lost"]
        self.assertGreater(lost.cost_usd, 0)
        self.assertEqual(charged, [lost])

    def test_loser_ttft_observed(self) -> None:
        """A first attempt that lost: its wait counts as a TTFT sample (a lower bound); the winning hedge's TTFT is none (only hedges that beat the first attempt serve: the fast ones)."""
        self.hedge_wins()
        breakers = self.gw.resource.breakers
        self.assertAlmostEqual(breakers.ttft_ewma(("a", "gpt-4o-a")), 0.6)
        self.assertIsNone(breakers.ttft_ewma(("b", "gpt-4o-b")))

    def test_short_loser_wait_not_observed(self) -> None:
        """A lost first attempt's wait below its deployment's estimate is no sample: losing early says nothing about being fast."""
        breakers = self.gw.resource.breakers
        breakers.observe_ttft(("a", "gpt-4o-a"), 2.0)
        self.hedge_wins()
        self.assertAlmostEqual(breakers.ttft_ewma(("a", "gpt-4o-a")), 2.0)

    def test_p95_mode_from_observed_ttfts(self) -> None:
        """hedge_after = "p95" with the real per-deployment observations: served TTFTs of 1 s put the hedge at 1 s."""
        gw = routed_gateway(models=hedged_models(after="p95"))
        gw.resource.rng = FixedRng(*([0.1] * 4))
        for _ in range(40):
            gw.resource.breakers.observe_ttft(("a", "gpt-4o-a"), 1.0)
        gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(0.9)
        self.assertEqual(len(gw.http.calls), 1)
        gw.clock.advance(0.2)
        self.assertEqual([host(c) for c in gw.http.calls], ["a.test", "b.test"])

    def test_client_gone_during_race(self) -> None:
        """The client leaves while both attempts wait: both upstreams stop; one client record and one attempt record."""
        from tests.test_garbage import close

        gw = self.gw
        channel, _ = gw.post("/v1/chat/completions", CHAT)
        slow = answer(gw, 0)
        slow.send(ROLE)
        gw.clock.advance(0.6)
        close(channel)
        gw.clock.advance(0)
        gw.clock.advance(0)
        self.assertTrue(slow.transport.stopped)
        self.assertTrue(gw.http.calls[1]["cancelled"])
        recs = gw.accounting.ledger.records
        self.assertEqual(sorted((r.attempt, r.outcome, r.parent_request_id is None) for r in recs), [(1, "client_cancelled", True), (2, "client_cancelled", False)])
        self.assertEqual(gw.resource.active, set())
        self.assertEqual([c for c in gw.clock.getDelayedCalls() if "Attempts" in repr(c)], [])


class BudgetTests(SynchronousTestCase):
    def test_take(self) -> None:
        """At most the fraction of the counted requests get a hedge."""
        b = HedgeBudget(0.5, 0.25)
        got = []
        for _ in range(8):
            b.requests += 1
            got.append(b.take())
        self.assertEqual(got, [False, False, False, True, False, False, False, True])


class RetrySameTests(SynchronousTestCase):
    def test_429_retry_after_same_deployment(self) -> None:
        """The only deployment answers 429 retry-after 2: the gateway waits 2 s and tries it again; the client sees the success."""
        gw = routed_gateway()
        _, transport = gw.post("/v1/chat/completions", {**CHAT, "model": "small"})
        answer(gw, 0, 429, {**JSON, b"retry-after": [b"2"]})
        gw.clock.advance(1.9)
        self.assertEqual(len(gw.http.calls), 1)
        gw.clock.advance(0.2)
        self.assertEqual([host(c) for c in gw.http.calls], ["b.test", "b.test"])
        r = answer(gw, 1)
        r.send(E1 + USAGE + DONE)
        r.end()
        gw.clock.advance(0)
        status, _, body, _ = parse_response(transport.value())
        self.assertEqual((status, body), (200, E1 + DONE))
        recs = sorted((r.attempt, r.outcome, r.status) for r in gw.accounting.ledger.records)
        self.assertEqual(recs, [(1, "upstream_error", 429), (2, "completed", 200)])

    def test_long_retry_after_relayed(self) -> None:
        """A retry-after longer than retry_after_wait (default 5): the 429 is relayed at once."""
        gw = routed_gateway()
        _, transport = gw.post("/v1/chat/completions", {**CHAT, "model": "small"})
        r = answer(gw, 0, 429, {**JSON, b"retry-after": [b"6"]})
        r.send(b'{"error":{"message":"slow down"}}')
        r.end()
        gw.clock.advance(0)
        self.assertEqual(parse_response(transport.value())[0], 429)
        self.assertEqual(len(gw.http.calls), 1)

    def test_disabled(self) -> None:
        """retry_after_wait = 0 disables the wait: the 429 is relayed."""
        gw = routed_gateway(routing={"retry_after_wait": 0})
        _, transport = gw.post("/v1/chat/completions", {**CHAT, "model": "small"})
        r = answer(gw, 0, 429, {**JSON, b"retry-after": [b"1"]})
        r.send(b'{"error":{"message":"slow down"}}')
        r.end()
        gw.clock.advance(5)
        self.assertEqual(parse_response(transport.value())[0], 429)
        self.assertEqual(len(gw.http.calls), 1)

    def test_client_gone_while_waiting(self) -> None:
        """The client leaves during the wait: no second call, one cancelled client record."""
        from tests.test_garbage import close

        gw = routed_gateway()
        channel, _ = gw.post("/v1/chat/completions", {**CHAT, "model": "small"})
        answer(gw, 0, 503, {**JSON, b"retry-after": [b"3"]})
        close(channel)
        gw.clock.advance(3)
        self.assertEqual(len(gw.http.calls), 1)
        final = [r for r in gw.accounting.ledger.records if r.parent_request_id is None]
        self.assertEqual([r.outcome for r in final], ["client_cancelled"])


class AttemptCounterTests(SynchronousTestCase):
    def test_reasons(self) -> None:
        """First, retry (another deployment of the model) and fallback (another model's) attempts are counted by provider."""
        gw = routed_gateway(
            models={
                "gpt-4o": {"deployments": [{"provider": "a", "upstream_model": "x"}, {"provider": "b", "upstream_model": "y"}], "fallbacks": ["small"]},
                "small": {"provider": "b", "upstream_model": "small-b"},
            }
        )
        gw.resource.rng = FixedRng(0.1)
        gw.accounting.metrics = Metrics(models=["gpt-4o", "small"])
        gw.post("/v1/chat/completions", CHAT)
        answer(gw, 0, 500, JSON)
        answer(gw, 1, 500, JSON)
        self.assertEqual(
            [metric(gw, "llmgate_upstream_attempts_total", provider=p, reason=r) for p, r in (("a", "first"), ("b", "retry"), ("b", "fallback"))],
            [1, 1, 1],
        )


class DrainDuringRaceTests(SynchronousTestCase):
    def test_shutdown_abort_answers_once(self) -> None:
        """The gateway stops while two attempts wait for headers: the client gets one 503, the other attempt is let go."""
        gw = routed_gateway(models=hedged_models())
        gw.resource.rng = FixedRng(0.1)
        _, transport = gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(0.6)
        self.assertEqual(len(gw.http.calls), 2)
        for relay in list(gw.resource.active):
            relay.abort("the gateway is shutting down")
        gw.clock.advance(0)
        raw = transport.value()
        self.assertEqual(raw.count(b"HTTP/1.1"), 1)
        self.assertEqual(parse_response(raw)[0], 503)
        recs = gw.accounting.ledger.records
        self.assertEqual(len([r for r in recs if r.parent_request_id is None]), 1)
        self.assertEqual(len(recs), 2)
        self.assertEqual(gw.resource.active, set())


class ClientGoneBothStreamingTests(SynchronousTestCase):
    def test_client_gone_with_two_gated_streams(self) -> None:
        """Both attempts hold a 200 stream when the client leaves: both upstreams stop, one client record, one attempt record, nothing raised."""
        from tests.test_garbage import close

        gw = routed_gateway(models=hedged_models())
        gw.resource.rng = FixedRng(0.1)
        channel, _ = gw.post("/v1/chat/completions", CHAT)
        first = answer(gw, 0)
        first.send(ROLE)
        gw.clock.advance(0.6)
        hedge = answer(gw, 1)
        hedge.send(ROLE)
        close(channel)
        gw.clock.advance(0)
        gw.clock.advance(0)
        self.assertTrue(first.transport.stopped)
        self.assertTrue(hedge.transport.stopped)
        self.assertEqual(self.flushLoggedErrors(), [])
        recs = gw.accounting.ledger.records
        self.assertEqual(sorted((r.attempt, r.outcome, r.parent_request_id is None) for r in recs), [(1, "client_cancelled", True), (2, "client_cancelled", False)])
        self.assertEqual(gw.resource.active, set())


class DrainDuringWaitTests(SynchronousTestCase):
    def test_stop_during_retry_after_wait(self) -> None:
        """The gateway stops while a request waits out a retry-after: it is in the drained set, answered 503 in dialect and recorded once; no retry follows."""
        gw = routed_gateway()
        _, transport = gw.post("/v1/chat/completions", {**CHAT, "model": "small"})
        answer(gw, 0, 429, {**JSON, b"retry-after": [b"3"]})
        self.assertEqual(len(gw.resource.active), 1)
        for relay in list(gw.resource.active):
            relay.abort("the gateway is shutting down")
        gw.clock.advance(5)
        self.assertEqual(len(gw.http.calls), 1)
        status, _, body, _ = parse_response(transport.value())
        self.assertEqual(status, 503)
        self.assertIn("shutting down", json.loads(body)["error"]["message"])
        final = [r for r in gw.accounting.ledger.records if r.parent_request_id is None]
        self.assertEqual([(r.status, r.outcome) for r in final], [(503, "upstream_error")])
        self.assertEqual(gw.resource.active, set())

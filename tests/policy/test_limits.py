"""
Tests for L{llmgate.policy.limits}: reservations against requests and
tokens per minute, concurrency and budgets, settled by the usage record.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate.policy.keys import KeyRecord, Limits
from llmgate.policy.limits import Quotas, estimate_tokens, go_duration

T0 = 1893542400.0  # 2030-01-02T00:00Z


def quotas() -> Quotas:
    clock = Clock()
    clock.advance(T0)
    q = Quotas(clock)
    q.load_spend({})
    return q


def record(rid: str, tin: int | None, tout: int | None, cost: float | None) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, input_tokens=tin, output_tokens=tout, cost_usd=cost)


class EstimateTests(SynchronousTestCase):
    def test_estimate(self) -> None:
        """Body bytes / 4 (rounded up) plus max_tokens, or the default; embeddings reserve no output."""
        self.assertEqual(estimate_tokens("openai.chat", 401, {"max_tokens": 50}, 4096), 101 + 50)
        self.assertEqual(estimate_tokens("openai.chat", 400, {"max_completion_tokens": 7}, 4096), 107)
        self.assertEqual(estimate_tokens("anthropic.messages", 400, {}, 4096), 100 + 4096)
        self.assertEqual(estimate_tokens("openai.embeddings", 400, {"max_tokens": 9}, 4096), 100)

    def test_go_duration(self) -> None:
        """Reset times in OpenAI's Go-duration format."""
        self.assertEqual(go_duration(0.012), "12ms")
        self.assertEqual(go_duration(1.0), "1s")
        self.assertEqual(go_duration(360), "6m0s")
        self.assertEqual(go_duration(3723), "1h2m3s")


class RateTests(SynchronousTestCase):
    def test_rpm(self) -> None:
        """The rpm+1st request in a minute is refused 429 with the wait for one request; it refills."""
        q = quotas()
        key = KeyRecord("a", b"x" * 32, limits=Limits(rpm=2))
        self.assertIsNotNone(q.admit(key, "m", "openai", 10, None).reservation)
        v = q.admit(key, "m", "openai", 10, None)
        self.assertEqual(v.headers[b"x-ratelimit-remaining-requests"], b"0")
        v = q.admit(key, "m", "openai", 10, None)
        self.assertEqual((v.status, v.code), (429, "rate_limit_exceeded"))
        self.assertEqual(v.headers[b"retry-after"], b"30")  # one request of 2/min
        self.assertEqual(v.headers[b"x-ratelimit-limit-requests"], b"2")
        self.assertEqual(v.headers[b"x-ratelimit-reset-requests"], b"1m0s")
        self.assertNotIn(b"x-should-retry", v.headers)
        q.clock.advance(30)
        self.assertIsNotNone(q.admit(key, "m", "openai", 10, None).reservation)

    def test_tpm_settled_by_record(self) -> None:
        """Tokens reserved are replaced by the record's: unused tokens come back, overruns are owed."""
        q = quotas()
        key = KeyRecord("a", b"x" * 32, limits=Limits(tpm=1000))
        v = q.admit(key, "m", "openai", 600, None)
        q.hold("r1", v.reservation)
        self.assertEqual(q.admit(key, "m", "openai", 600, None).status, 429)
        q.settle(record("r1", 50, 50, None))  # used 100 of the 600
        v2 = q.admit(key, "m", "openai", 600, None)
        self.assertIsNotNone(v2.reservation)
        self.assertEqual(v2.headers[b"x-ratelimit-remaining-tokens"], b"300")
        self.assertEqual(q.held, 0)

    def test_request_above_a_minute_waits_for_full_bucket(self) -> None:
        """A request estimated above the tpm waits for a full bucket, then goes (and leaves it owing)."""
        q = quotas()
        key = KeyRecord("a", b"x" * 32, limits=Limits(tpm=100))
        q.hold("r1", q.admit(key, "m", "openai", 30, None).reservation)
        v = q.admit(key, "m", "openai", 500, None)
        self.assertEqual((v.status, v.headers[b"retry-after"]), (429, b"18"))  # 30 tokens at 100/min
        q.clock.advance(18)
        v = q.admit(key, "m", "openai", 500, None)
        self.assertIsNotNone(v.reservation)
        self.assertEqual(q.state.scopes["a"].tokens.level, -400)

    def test_concurrency(self) -> None:
        """At most `concurrency` requests in flight; a settled one frees its slot."""
        q = quotas()
        key = KeyRecord("a", b"x" * 32, limits=Limits(concurrency=1))
        q.hold("r1", q.admit(key, "m", "openai", 1, None).reservation)
        v = q.admit(key, "m", "openai", 1, None)
        self.assertEqual((v.status, v.headers[b"retry-after"]), (429, b"1"))
        q.settle(record("r1", None, None, None))
        self.assertIsNotNone(q.admit(key, "m", "openai", 1, None).reservation)

    def test_per_model(self) -> None:
        """A key-model pair's limit applies to its models only."""
        q = quotas()
        key = KeyRecord("a", b"x" * 32, per_model=(("big-*", Limits(rpm=1)),))
        self.assertIsNotNone(q.admit(key, "big-1", "openai", 1, None).reservation)
        self.assertEqual(q.admit(key, "big-2", "openai", 1, None).status, 429)
        self.assertIsNotNone(q.admit(key, "small", "openai", 1, None).reservation)

    def test_anthropic_headers(self) -> None:
        """Anthropic routes get anthropic-ratelimit-* with an RFC 3339 reset time."""
        q = quotas()
        key = KeyRecord("a", b"x" * 32, limits=Limits(rpm=60, tpm=6000))
        v = q.admit(key, "m", "anthropic", 100, None)
        h = v.headers
        self.assertEqual(h[b"anthropic-ratelimit-requests-limit"], b"60")
        self.assertEqual(h[b"anthropic-ratelimit-requests-remaining"], b"59")
        self.assertEqual(h[b"anthropic-ratelimit-requests-reset"], b"2030-01-02T00:00:01Z")
        self.assertEqual(h[b"anthropic-ratelimit-tokens-remaining"], b"5900")
        self.assertNotIn(b"x-ratelimit-limit-requests", h)


class BudgetTests(SynchronousTestCase):
    def key(self, budget: float = 1.0, period: str = "day") -> KeyRecord:
        return KeyRecord("a", b"x" * 32, budget_usd=budget, period=period)

    def test_budget_counts_reservations_and_settles(self) -> None:
        """Spend + reservations + the estimate must fit; exhausted is 429 with x-should-retry false."""
        q = quotas()
        k = self.key()
        q.hold("r1", q.admit(k, "m", "openai", 1, 0.6).reservation)
        v = q.admit(k, "m", "openai", 1, 0.6)
        self.assertEqual((v.status, v.code, v.headers.get(b"x-should-retry")), (429, "insufficient_quota", b"false"))
        q.settle(record("r1", 10, 10, 0.1))
        self.assertIsNotNone(q.admit(k, "m", "openai", 1, 0.6).reservation)

    def test_unknown_cost_keeps_estimate(self) -> None:
        """A record with tokens but no price is charged its estimate; one without tokens costs nothing."""
        q = quotas()
        k = self.key()
        q.hold("r1", q.admit(k, "m", "openai", 1, 0.4).reservation)
        q.settle(record("r1", 10, 10, None))
        q.hold("r2", q.admit(k, "m", "openai", 1, 0.4).reservation)
        q.settle(record("r2", None, None, None))
        self.assertAlmostEqual(q.state.spend["a"].spent["day"], 0.4)

    def test_period_rolls_over(self) -> None:
        """A day budget starts again at the next UTC midnight; a total budget does not."""
        q = quotas()
        for k in (self.key(), KeyRecord("t", b"y" * 32, budget_usd=1.0, period="total")):
            q.hold("r-" + k.name, q.admit(k, "m", "openai", 1, 0.9).reservation)
            q.settle(record("r-" + k.name, 1, 1, 0.9))
            self.assertEqual(q.admit(k, "m", "openai", 1, 0.2).status, 429)
        q.clock.advance(86400)
        self.assertIsNotNone(q.admit(self.key(), "m", "openai", 1, 0.2).reservation)
        self.assertEqual(q.admit(KeyRecord("t", b"y" * 32, budget_usd=1.0, period="total"), "m", "openai", 1, 0.2).status, 429)

    def test_hedge_loser_cost_charged(self) -> None:
        """A hedge loser's cost (a record with no reservation) counts against its key's budget, and the gauge hears of it."""
        q = quotas()
        k = self.key()
        left = []
        q.on_spend = lambda key, remaining: left.append((key, remaining))
        q.hold("r1", q.admit(k, "m", "openai", 1, 0.5).reservation)
        q.settle(record("r1", 10, 10, 0.5))
        q.charge(SimpleNamespace(key_name="a", cost_usd=0.3))
        self.assertAlmostEqual(q.state.spend["a"].spent["day"], 0.8)
        self.assertAlmostEqual(left[-1][1], 0.2)
        self.assertEqual(q.admit(k, "m", "openai", 1, 0.3).status, 429)
        # Nothing to charge: no cost, or no key.
        q.charge(SimpleNamespace(key_name="a", cost_usd=None))
        q.charge(SimpleNamespace(key_name="", cost_usd=1.0))
        self.assertAlmostEqual(q.state.spend["a"].spent["day"], 0.8)

    def test_loaded_spend_counts(self) -> None:
        """Spend loaded from the ledger at start counts against the budget."""
        q = quotas()
        q.load_spend({"a": {"day": 0.95, "month": 0.95, "total": 0.95}})
        self.assertEqual(q.admit(self.key(), "m", "openai", 1, 0.1).status, 429)

    def test_refused_until_spend_loaded(self) -> None:
        """Before the ledger's spend is in, a budgeted key is answered 503 (retry), never admitted on 0."""
        clock = Clock()
        q = Quotas(clock)
        v = q.admit(self.key(), "m", "openai", 1, 0.1)
        self.assertEqual((v.status, v.headers[b"retry-after"]), (503, b"1"))
        self.assertIsNotNone(q.admit(KeyRecord("free", b"z" * 32), "m", "openai", 1, 0.1).reservation)

    def test_unpriced_model_refused(self) -> None:
        """A budgeted key may not use a model without a price (its spend could not be counted)."""
        v = quotas().admit(self.key(), "m", "openai", 1, None)
        self.assertEqual((v.status, v.code), (403, "permission_error"))

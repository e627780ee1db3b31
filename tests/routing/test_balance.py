"""The deployment pick: plan order, weights, breakers and retry-after."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate.config import Deployment
from llmgate.routing import balance
from llmgate.routing.breaker import Breakers
from tests.fakes import make_config
from tests.routing.helpers import FixedRng

A = Deployment("a", "m-a", 3.0)
B = Deployment("b", "m-b", 1.0)


class PickTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.breakers = Breakers(self.clock, failures=2, cooldown=30)

    def test_weighted_by_draw(self) -> None:
        """A draw below weight share 3/4 picks a; above it picks b."""
        self.assertIs(balance.pick([(A, B)], self.breakers, FixedRng(0.74)), A)
        self.assertIs(balance.pick([(A, B)], self.breakers, FixedRng(0.76)), B)

    def test_tried_skipped_then_fallback_group(self) -> None:
        """Tried deployments are left out; an exhausted group gives way to the next."""
        C = Deployment("c", "m-c")
        self.assertIs(balance.pick([(A, B), (C,)], self.breakers, FixedRng(0.0), tried={("a", "m-a")}), B)
        self.assertIs(balance.pick([(A, B), (C,)], self.breakers, FixedRng(0.0), tried={("a", "m-a"), ("b", "m-b")}), C)
        self.assertIsNone(balance.pick([(A,)], self.breakers, FixedRng(0.0), tried={("a", "m-a")}))

    def test_open_breaker_skipped(self) -> None:
        """A deployment whose breaker is open is not picked."""
        self.breakers.failed(("a", "m-a"))
        self.breakers.failed(("a", "m-a"))
        self.assertIs(balance.pick([(A, B)], self.breakers, FixedRng(0.0)), B)
        self.assertIsNone(balance.first([(A,)], self.breakers, FixedRng(0.0)))
        self.assertEqual(balance.wait([(A,)], self.breakers), 30)

    def test_retry_after_steers_but_does_not_refuse(self) -> None:
        """A retry-after skips a deployment while another is usable; alone, it is used anyway."""
        self.breakers.failed(("a", "m-a"), retry_after=10, health=False)
        self.assertIs(balance.first([(A, B)], self.breakers, FixedRng(0.0)), B)
        self.assertIs(balance.first([(A,)], self.breakers, FixedRng(0.0)), A)
        self.assertIsNone(balance.pick([(A,)], self.breakers, FixedRng(0.0)))
        self.clock.advance(10)
        self.assertIs(balance.pick([(A,)], self.breakers, FixedRng(0.0)), A)

    def test_least_outstanding(self) -> None:
        """least_outstanding picks the deployment with fewer requests in flight."""
        self.breakers.taken(("a", "m-a"))
        self.assertIs(balance.pick([(A, B)], self.breakers, FixedRng(0.0), "least_outstanding"), B)
        self.breakers.released(("a", "m-a"))
        self.assertIs(balance.pick([(A, B)], self.breakers, FixedRng(0.0), "least_outstanding"), A)


class PlanTests(SynchronousTestCase):
    def test_plan_order_and_dialect(self) -> None:
        """A model's own deployments come first, then each fallback's; another dialect is not served."""
        cfg = make_config(
            models={
                "big": {"provider": "oai", "upstream_model": "big-1", "fallbacks": ["mid", "tiny"]},
                "mid": {"deployments": [{"provider": "oai", "upstream_model": "mid-1"}, {"provider": "oai", "upstream_model": "mid-2", "weight": 2}]},
                "tiny": {"provider": "oai"},
            }
        )
        groups = balance.plan(cfg, "openai", "big")
        self.assertEqual(
            [[(d.provider, d.upstream_model, d.weight) for d in g] for g in groups],
            [[("oai", "big-1", 1.0)], [("oai", "mid-1", 1.0), ("oai", "mid-2", 2.0)], [("oai", "tiny", 1.0)]],
        )
        self.assertIsNone(balance.plan(cfg, "anthropic", "big"))
        # An unknown name goes to the dialect's default provider, as before.
        self.assertEqual([[(d.provider, d.upstream_model)] for g in balance.plan(cfg, "anthropic", "claude-x") for d in g], [[("ant", "claude-x")]])


F = Deployment("fast", "m")
S = Deployment("slow", "m")


class LatencyTests(SynchronousTestCase):
    """balance = "latency": power of two choices on TTFT EWMA, error ratio and requests in flight."""

    def setUp(self) -> None:
        import random

        self.clock = Clock()
        self.breakers = Breakers(self.clock, configured=[("fast", "m"), ("slow", "m")])
        self.rng = random.Random(7)

    def run_traffic(self, seconds: float, ttft: dict[str, float], rate: float = 10.0) -> dict[str, int]:
        """One request every 1/rate s, each answered after its deployment's TTFT (in order); picks per provider."""
        picks = {"fast": 0, "slow": 0}
        for _ in range(int(seconds * rate)):
            self.clock.advance(1 / rate)
            d = balance.pick([(F, S)], self.breakers, self.rng, "latency")
            picks[d.provider] += 1
            k = balance.key(d)
            self.breakers.taken(k)
            self.breakers.observe_ttft(k, ttft[d.provider])
            self.breakers.released(k)
        return picks

    def test_in_flight_counts_relative_to_the_group(self) -> None:
        """Under load (100 streams in flight on the fast one, none on the slow one) a 10x slower deployment still loses: in flight counts as a share, not as a queue."""
        fast, slow = balance.key(F), balance.key(S)
        self.breakers.observe_ttft(fast, 0.02)
        self.breakers.observe_ttft(slow, 0.2)
        for _ in range(100):
            self.breakers.taken(fast)
        self.assertEqual(balance.latency([F, S], self.breakers, self.rng), F)
        # Far over its share and nearly as fast: the other one takes it.
        self.breakers.observe_ttft(slow, 0.021)
        self.breakers.observe_ttft(slow, 0.021)
        self.breakers.observe_ttft(slow, 0.021)
        self.clock.advance(60)
        self.breakers.observe_ttft(slow, 0.021)
        self.breakers.observe_ttft(fast, 0.02)
        self.assertEqual(balance.latency([F, S], self.breakers, self.rng), S)

    def test_slow_gets_much_less_but_not_zero_then_recovers(self) -> None:
        """A deployment 10x slower gets a trickle (a few %, never none); once it is as fast, it wins half back."""
        picks = self.run_traffic(300, {"fast": 0.1, "slow": 1.0})
        total = sum(picks.values())
        self.assertGreater(picks["slow"], 0)
        self.assertLess(picks["slow"] / total, 0.05)
        # Not one sample and done: it is measured again and again.
        self.assertGreaterEqual(picks["slow"], 5)
        # It speeds up: after a transition its share comes back.
        self.run_traffic(60, {"fast": 0.1, "slow": 0.1})
        picks = self.run_traffic(120, {"fast": 0.1, "slow": 0.1})
        self.assertGreater(picks["slow"] / sum(picks.values()), 0.3)

    def test_unmeasured_tried_first(self) -> None:
        """A deployment with no sample yet wins against a measured one (it gets measured)."""
        self.breakers.observe_ttft(("fast", "m"), 0.05)
        for draw in (0.1, 0.9):
            self.assertIs(balance.pick([(F, S)], self.breakers, FixedRng(draw, 0.0), "latency"), S)

    def test_unmeasured_busy_shares(self) -> None:
        """An unmeasured deployment counts as fast as the best: with requests in flight it stops taking all of them."""
        self.breakers.observe_ttft(("fast", "m"), 0.05)
        self.breakers.taken(("slow", "m"))
        self.assertIs(balance.pick([(F, S)], self.breakers, FixedRng(0.9, 0.0), "latency"), F)

    def test_outstanding_counts(self) -> None:
        """Equal TTFT: the one with fewer requests in flight wins, whichever is drawn first."""
        self.breakers.observe_ttft(("fast", "m"), 0.1)
        self.breakers.observe_ttft(("slow", "m"), 0.1)
        self.breakers.taken(("fast", "m"))
        for draw in (0.1, 0.9):
            self.assertIs(balance.pick([(F, S)], self.breakers, FixedRng(draw, 0.0), "latency"), S)

    def test_error_ratio_counts(self) -> None:
        """A deployment failing half its requests scores 3x its TTFT: slower but healthy wins."""
        self.breakers.observe_ttft(("fast", "m"), 0.1)
        self.breakers.observe_ttft(("slow", "m"), 0.25)
        for _ in range(3):
            self.breakers.succeeded(("fast", "m"))
            self.breakers.failed(("fast", "m"))
        self.assertIs(balance.pick([(F, S)], self.breakers, FixedRng(0.1, 0.0), "latency"), S)

    def test_two_distinct_choices_by_weight(self) -> None:
        """Of three, the two candidates are distinct weighted draws; the third, however fast, is not looked at."""
        C = Deployment("c", "m", 2.0)
        for k, t in ((("fast", "m"), 0.3), (("slow", "m"), 0.2), (("c", "m"), 0.01)):
            self.breakers.observe_ttft(k, t)
        # Weights 1, 1, 2 (total 4): 0.1 draws F; of (S, C) 0.2 draws S.
        self.assertIs(balance.pick([(F, S, C)], self.breakers, FixedRng(0.1, 0.2), "latency"), S)
        # 0.6 draws C first, then F: C wins.
        self.assertIs(balance.pick([(F, S, C)], self.breakers, FixedRng(0.6, 0.1), "latency"), C)

    def test_latency_respects_breakers_and_tried(self) -> None:
        """The latency pick is among usable, untried deployments only."""
        self.breakers.observe_ttft(("slow", "m"), 0.01)
        self.assertIs(balance.pick([(F, S)], self.breakers, FixedRng(0.0), "latency", tried={("slow", "m")}), F)
        for _ in range(5):
            self.breakers.failed(("slow", "m"))
        self.assertIs(balance.pick([(F, S)], self.breakers, FixedRng(0.0), "latency"), F)

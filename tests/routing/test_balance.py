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

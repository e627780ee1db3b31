"""The per-deployment circuit breaker, on an injected clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate.routing.breaker import Breakers

K = ("a", "m")


class BreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.b = Breakers(self.clock, failures=3, cooldown=30)

    def test_opens_after_consecutive_failures(self) -> None:
        """Three failures in a row open it; a success in between resets the count."""
        self.b.failed(K)
        self.b.failed(K)
        self.b.succeeded(K)
        self.b.failed(K)
        self.b.failed(K)
        self.assertTrue(self.b.available(K))
        self.b.failed(K)
        self.assertFalse(self.b.available(K))
        self.assertEqual(self.b.wait(K), 30)

    def test_half_open_probe(self) -> None:
        """After the cool-down one probe goes; its success closes, its failure reopens."""
        for _ in range(3):
            self.b.failed(K)
        self.clock.advance(29.9)
        self.assertFalse(self.b.available(K))
        self.clock.advance(0.1)
        self.assertTrue(self.b.available(K))
        self.b.taken(K)
        # One probe at a time.
        self.assertFalse(self.b.available(K))
        self.b.failed(K)
        self.assertFalse(self.b.available(K))
        self.clock.advance(30)
        self.b.taken(K)
        self.b.succeeded(K)
        self.assertTrue(self.b.available(K))
        self.assertFalse(self.b.is_open(K))

    def test_lost_probe_gives_way(self) -> None:
        """A probe that never reported (client gone) does not hold the breaker half-open for ever."""
        for _ in range(3):
            self.b.failed(K)
        self.clock.advance(30)
        self.b.taken(K)
        self.clock.advance(30)
        self.assertTrue(self.b.available(K))

    def test_rate_limit_is_no_health_failure(self) -> None:
        """429s (health=False) never open the breaker; their retry-after skips the deployment."""
        for _ in range(10):
            self.b.failed(K, retry_after=5, health=False)
        self.assertFalse(self.b.is_open(K))
        self.assertFalse(self.b.available(K))
        self.assertTrue(self.b.available(K, skips=False))
        self.clock.advance(5)
        self.assertTrue(self.b.available(K))

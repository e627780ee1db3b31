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


class FailureRatioTests(SynchronousTestCase):
    """The failure-ratio breaker: [routing] breaker_failure_ratio, breaker_window, breaker_min_requests."""

    def setUp(self) -> None:
        self.clock = Clock()
        # Consecutive failures out of the way: only the ratio can open it.
        self.b = Breakers(self.clock, failures=1000, cooldown=30, failure_ratio=0.5, window=10, min_requests=10)

    def traffic(self, ok: int, bad: int) -> None:
        """C{ok} answers and C{bad} failures spread evenly (an answer first)."""
        total = ok + bad
        for i in range(total):
            if (i + 1) * bad // total > i * bad // total:
                self.b.failed(K)
            else:
                self.b.succeeded(K)

    def test_opens_at_ratio_with_enough_requests(self) -> None:
        """5 failures of 10 in the window open the breaker; 4 of 9 do not, nor 5 of 9 (too few)."""
        self.traffic(5, 4)
        self.assertEqual(self.b.error_ratio(K), 4 / 9)
        self.assertEqual(self.b.state(K), 0)
        self.b.failed(K)  # 5 of 10
        self.assertEqual(self.b.state(K), 1)
        self.assertFalse(self.b.available(K))
        self.assertEqual(self.b.wait(K), 30)

    def test_answers_do_not_walk_the_window(self) -> None:
        """
        An answer (once per request) only counts in its bucket; the window
        is summed for a failure (which may open the breaker) and for the
        ratio, still counting the answers.
        """
        walks: list[int] = []
        real = self.b._sums
        self.patch(self.b, "_sums", lambda st, n: (walks.append(n), real(st, n))[1])
        for _ in range(20):
            self.b.succeeded(K)
        self.assertEqual(walks, [])
        self.b.failed(K)
        self.assertEqual(len(walks), 1)
        self.assertEqual(self.b.error_ratio(K), 1 / 21)

    def test_below_min_requests_never_opens(self) -> None:
        """Failures alone, but fewer than min_requests of them, leave it closed."""
        for _ in range(9):
            self.b.failed(K)
        self.assertEqual(self.b.error_ratio(K), 1.0)
        self.assertTrue(self.b.available(K))

    def test_below_ratio_stays_closed(self) -> None:
        """40% failures over many requests stay closed."""
        self.traffic(60, 40)
        self.assertEqual(self.b.error_ratio(K), 0.4)
        self.assertTrue(self.b.available(K))

    def test_window_forgets_old_failures(self) -> None:
        """Failures older than the window no longer count toward the ratio."""
        self.traffic(5, 4)
        self.clock.advance(10)
        self.assertEqual(self.b.error_ratio(K), 0.0)
        self.traffic(5, 1)
        self.assertEqual(self.b.error_ratio(K), 1 / 6)
        self.assertTrue(self.b.available(K))

    def test_window_slides(self) -> None:
        """Half the window later, the older half still counts; a full window later it does not."""
        self.traffic(3, 4)
        self.clock.advance(5)
        self.traffic(2, 0)
        self.assertEqual(self.b.error_ratio(K), 4 / 9)
        self.clock.advance(5)
        self.assertEqual(self.b.error_ratio(K), 0.0)

    def test_half_open_probe_after_ratio(self) -> None:
        """A ratio-opened breaker probes after the cool-down like the other: success closes it afresh."""
        self.traffic(5, 5)
        self.assertEqual(self.b.state(K), 1)
        self.clock.advance(30)
        self.assertEqual(self.b.state(K), 2)
        self.assertTrue(self.b.available(K))
        self.b.taken(K)
        self.assertFalse(self.b.available(K))
        self.b.failed(K)
        self.assertEqual(self.b.state(K), 1)
        self.clock.advance(30)
        self.b.taken(K)
        self.b.succeeded(K)
        self.assertEqual(self.b.state(K), 0)
        # The window starts over: the probe's answer, then one failure.
        self.b.failed(K)
        self.assertEqual(self.b.state(K), 0)
        self.assertEqual(self.b.error_ratio(K), 0.5)

    def test_rate_limits_not_counted(self) -> None:
        """429s (health=False) count neither as failures nor requests of the ratio."""
        self.traffic(10, 0)
        for _ in range(20):
            self.b.failed(K, health=False)
        self.assertEqual(self.b.error_ratio(K), 0.0)
        self.assertTrue(self.b.available(K))


class ObservationTests(SynchronousTestCase):
    """observe_ttft, ttft_ewma, ttft_estimate, ttft_p95 and the bound on tracked deployments."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.b = Breakers(self.clock, configured=[K])

    def test_no_samples(self) -> None:
        """Before any sample: no EWMA, no estimate, no p95, error ratio 0."""
        self.assertIsNone(self.b.ttft_ewma(K))
        self.assertIsNone(self.b.ttft_estimate(K))
        self.assertIsNone(self.b.ttft_p95(K))
        self.assertEqual(self.b.error_ratio(K), 0.0)

    def test_ewma_follows_samples(self) -> None:
        """The first sample is the EWMA; back-to-back ones weigh 0.1; after a long gap a sample weighs almost all."""
        self.b.observe_ttft(K, 1.0)
        self.assertEqual(self.b.ttft_ewma(K), 1.0)
        self.b.observe_ttft(K, 2.0)
        self.assertAlmostEqual(self.b.ttft_ewma(K), 1.1)
        self.clock.advance(60)
        self.b.observe_ttft(K, 0.1)
        # alpha = 1 - exp(-6)
        self.assertAlmostEqual(self.b.ttft_ewma(K), 0.1 + 1.0 * 0.00247875, places=5)
        self.b.observe_ttft(K, None)
        self.b.observe_ttft(K, float("nan"))
        self.b.observe_ttft(K, -1)
        self.assertAlmostEqual(self.b.ttft_ewma(K), 0.1 + 1.0 * 0.00247875, places=5)

    def test_estimate_decays_without_samples(self) -> None:
        """The pick's estimate halves every 10 s without a sample; the EWMA itself does not."""
        self.b.observe_ttft(K, 2.0)
        self.clock.advance(10)
        self.assertAlmostEqual(self.b.ttft_estimate(K), 1.0)
        self.clock.advance(10)
        self.assertAlmostEqual(self.b.ttft_estimate(K), 0.5)
        self.assertEqual(self.b.ttft_ewma(K), 2.0)

    def test_p95_from_recent_window(self) -> None:
        """p95 is None below 20 samples; then the 95th percentile of the last 100."""
        for i in range(19):
            self.b.observe_ttft(K, 0.01 * (i + 1))
        self.assertIsNone(self.b.ttft_p95(K))
        self.b.observe_ttft(K, 0.2)
        # 20 samples 0.01..0.20: the 19th smallest.
        self.assertAlmostEqual(self.b.ttft_p95(K), 0.19)
        for i in range(100):
            self.b.observe_ttft(K, 1.0 + i)
        # Only the last 100 (1..100 s) remain: the 95th.
        self.assertEqual(self.b.ttft_p95(K), 95.0)

    def test_unconfigured_keys_bounded(self) -> None:
        """Model names a default provider serves are tracked up to MAX_EXTRA; idle ones make room; configured always are."""
        from llmgate.routing.breaker import MAX_EXTRA

        for i in range(MAX_EXTRA):
            self.b.taken(("oai", f"name-{i}"))
        self.assertEqual(self.b.tracked(), MAX_EXTRA)
        # All busy: a new name gets no state (and no breaker), rather than memory.
        self.b.failed(("oai", "one-more"))
        self.b.observe_ttft(("oai", "one-more"), 1.0)
        self.assertEqual(self.b.tracked(), MAX_EXTRA)
        self.assertIsNone(self.b.ttft_ewma(("oai", "one-more")))
        self.assertTrue(self.b.available(("oai", "one-more")))
        # The configured deployment is tracked all the same.
        self.b.observe_ttft(K, 1.0)
        self.assertEqual(self.b.ttft_ewma(K), 1.0)
        # Once they are idle, new names replace them.
        for i in range(MAX_EXTRA):
            self.b.released(("oai", f"name-{i}"))
        self.b.observe_ttft(("oai", "one-more"), 1.0)
        self.assertEqual(self.b.ttft_ewma(("oai", "one-more")), 1.0)
        self.assertLessEqual(self.b.tracked(), MAX_EXTRA + 1)

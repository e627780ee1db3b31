"""The periodic-service base (llmgate.ops.periodic) on a task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops.periodic import Periodic


class _Ticker(Periodic):
    def __init__(self, clock: Clock, interval: float, now: bool = False) -> None:
        super().__init__(clock, interval, now=now)
        self.ticks: list[float] = []

    def tick(self) -> None:
        self.ticks.append(self.clock.seconds())


class PeriodicTests(SynchronousTestCase):
    def test_ticks_every_interval_while_running(self) -> None:
        """The subclass's tick runs every interval from one interval after the start, and not after the stop."""
        clock = Clock()
        svc = _Ticker(clock, 2.0)
        svc.startService()
        self.assertEqual(svc.ticks, [])
        clock.advance(2.0)
        clock.advance(2.0)
        self.assertEqual(svc.ticks, [2.0, 4.0])
        svc.stopService()
        self.assertFalse(svc.looping)
        clock.advance(10.0)
        self.assertEqual(svc.ticks, [2.0, 4.0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_now_calls_at_start(self) -> None:
        """now=True: the first call is at the start."""
        clock = Clock()
        svc = _Ticker(clock, 1.0, now=True)
        svc.startService()
        self.assertEqual(svc.ticks, [0.0])
        svc.stopService()

    def test_failure_is_logged_and_the_loop_goes_on(self) -> None:
        """A call that raises is logged once per failure; the next interval calls again."""
        clock = Clock()
        calls: list[float] = []

        def flaky() -> None:
            calls.append(clock.seconds())
            if len(calls) == 1:
                raise ValueError("boom")

        svc = Periodic(clock, 1.0, flaky)
        svc.startService()
        clock.advance(1.0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        clock.advance(1.0)
        clock.advance(1.0)
        self.assertEqual(calls, [1.0, 2.0, 3.0])
        self.assertTrue(svc.looping)
        svc.stopService()

    def test_stop_is_idempotent(self) -> None:
        """Stopping twice, or a service never started, raises nothing and leaves no call behind."""
        clock = Clock()
        never = Periodic(clock, 1.0, lambda: None)
        never.stop_timer()
        svc = Periodic(clock, 1.0, lambda: None)
        svc.startService()
        svc.stop_timer()
        svc.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_restart(self) -> None:
        """A stopped service starts again on the same interval (a second start_timer is a no-op)."""
        clock = Clock()
        svc = _Ticker(clock, 1.0)
        svc.startService()
        svc.start_timer()
        clock.advance(1.0)
        svc.stopService()
        clock.advance(5.0)
        svc.startService()
        clock.advance(1.0)
        self.assertEqual(svc.ticks, [1.0, 7.0])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        svc.stopService()

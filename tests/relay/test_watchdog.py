"""
The relays in flight, in parts, and the watchdog that checks one part per
tick: every relay about once a second, no tick over all of them, and no
ended relay kept alive.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate.relay.stream import ActiveRelays, Watchdog


class FakeRelay:
    """Records the times it was checked."""

    def __init__(self) -> None:
        self.checked: list[float] = []

    def check(self, now: float) -> None:
        self.checked.append(now)


class ActiveRelaysTests(SynchronousTestCase):
    def test_behaves_as_a_set(self) -> None:
        """add, discard, membership, length, truth, iteration and equality with a set."""
        active = ActiveRelays()
        self.assertFalse(active)
        self.assertEqual(active, set())
        relays = [FakeRelay() for _ in range(50)]
        for r in relays:
            active.add(r)
        active.add(relays[0])
        self.assertEqual(len(active), 50)
        self.assertTrue(active)
        self.assertIn(relays[7], active)
        self.assertEqual(set(active), set(relays))
        self.assertEqual(active, set(relays))
        active.discard(relays[7])
        active.discard(relays[7])
        self.assertNotIn(relays[7], active)
        self.assertEqual(len(active), 49)

    def test_parts_split_the_relays(self) -> None:
        """Every relay is in exactly one part, and 1,000 relays spread over all the parts."""
        active = ActiveRelays()
        relays = [FakeRelay() for _ in range(1000)]
        for r in relays:
            active.add(r)
        parts = [active.part(i) for i in range(ActiveRelays.BUCKETS)]
        self.assertEqual(sum(len(p) for p in parts), 1000)
        self.assertEqual(set().union(*parts), set(relays))
        self.assertTrue(all(len(p) > 1000 // ActiveRelays.BUCKETS // 4 for p in parts), [len(p) for p in parts])


class WatchdogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.active = ActiveRelays()
        self.relays = [FakeRelay() for _ in range(400)]
        for r in self.relays:
            self.active.add(r)
        self.dog = Watchdog(self.clock, self.active, interval=1.0)
        self.dog.startService()
        self.addCleanup(self.dog.stopService)

    def test_a_tick_checks_one_part(self) -> None:
        """Each tick (an eighth of the interval) checks one part's relays only."""
        self.clock.advance(1.0 / ActiveRelays.BUCKETS)
        checked = [r for r in self.relays if r.checked]
        self.assertEqual(set(checked), self.active.part(0))
        self.assertLess(len(checked), len(self.relays))

    def test_every_relay_once_per_interval(self) -> None:
        """Over one interval of ticks every relay is checked exactly once; over two, twice."""
        for _ in range(ActiveRelays.BUCKETS):
            self.clock.advance(1.0 / ActiveRelays.BUCKETS)
        self.assertEqual({len(r.checked) for r in self.relays}, {1})
        for _ in range(ActiveRelays.BUCKETS):
            self.clock.advance(1.0 / ActiveRelays.BUCKETS)
        self.assertEqual({len(r.checked) for r in self.relays}, {2})

    def test_missed_ticks_check_every_part_once(self) -> None:
        """After a long stall (many missed ticks) every relay is checked, once, at the current time."""
        self.clock.advance(30.0)
        self.assertEqual({tuple(r.checked) for r in self.relays}, {(30.0,)})

    def test_ended_relay_is_neither_checked_nor_kept(self) -> None:
        """A relay discarded from the set is not checked later and nothing in the watchdog keeps it alive."""
        gone = FakeRelay()
        self.active.add(gone)
        self.clock.advance(1.0 / ActiveRelays.BUCKETS)
        self.active.discard(gone)
        before = list(gone.checked)
        ref = weakref.ref(gone)
        for _ in range(2 * ActiveRelays.BUCKETS):
            self.clock.advance(1.0 / ActiveRelays.BUCKETS)
        self.assertEqual(gone.checked, before)
        del gone
        gc.collect()
        self.assertIsNone(ref())

    def test_a_failing_check_does_not_stop_the_part(self) -> None:
        """A check that raises is logged; the other relays of the part are still checked."""

        class Broken(FakeRelay):
            def check(self, now: float) -> None:
                raise RuntimeError("broken")

        active = ActiveRelays()
        relays: list[Any] = [Broken()] + [FakeRelay() for _ in range(200)]
        for r in relays:
            active.add(r)
        clock = Clock()
        dog = Watchdog(clock, active, interval=1.0)
        dog.startService()
        self.addCleanup(dog.stopService)
        clock.advance(1.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(all(r.checked for r in relays[1:]))

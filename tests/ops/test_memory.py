"""Tests for L{llmgate.ops.memory}: giving big bodies' memory back, rate-limited."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops.memory import Trimmer, malloc_trim


class TrimmerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.threaded: list[Any] = []
        self.trims: list[float] = []

        def in_thread(f: Any, *a: Any) -> Any:
            self.threaded.append(f)
            return succeed(f(*a))

        self.trimmer = Trimmer(
            self.clock, in_thread, threshold=100, min_interval=10.0, delay=1.0,
            trim=lambda: self.trims.append(self.clock.seconds()),
        )

    def test_trims_after_enough_was_freed(self) -> None:
        """Below the threshold nothing happens; past it, one trim, a delay later, off the reactor thread."""
        self.trimmer.freed(60)
        self.clock.advance(5)
        self.assertEqual(self.trims, [])
        self.trimmer.freed(60)
        self.trimmer.freed(60)
        self.clock.advance(0.9)
        self.assertEqual(self.trims, [])
        self.clock.advance(0.1)
        self.assertEqual(self.trims, [6.0])
        self.assertEqual(self.threaded, [self.trimmer.trim])

    def test_rate_limited(self) -> None:
        """Trims are at least min_interval apart however much is freed."""
        self.trimmer.freed(100)
        self.clock.advance(1)
        self.trimmer.freed(100)
        self.clock.advance(5)
        self.trimmer.freed(100)
        self.clock.advance(4.9)
        self.assertEqual(self.trims, [1.0])
        self.clock.advance(0.1)
        self.assertEqual(self.trims, [1.0, 11.0])

    def test_stop(self) -> None:
        """A pending trim is cancelled on stop."""
        self.trimmer.freed(100)
        self.trimmer.stop()
        self.clock.advance(20)
        self.assertEqual(self.trims, [])

    def test_malloc_trim_callable(self) -> None:
        """malloc_trim() runs on this libc (or reports there is none) without raising."""
        self.assertIn(malloc_trim(), (True, False))

    def test_tune_malloc_callable(self) -> None:
        """tune_malloc() sets the threshold on glibc (or reports it cannot) without raising."""
        from llmgate.ops.memory import tune_malloc

        self.assertIn(tune_malloc(), (True, False))

"""Work gathered in a turn is done once, at the next turn, with one timer."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops.nextturn import NextTurn


class NextTurnTests(SynchronousTestCase):
    def test_items_of_a_turn_handled_in_order_with_one_timer(self) -> None:
        """Items added in one turn wait for the next, share one call, and are handled in order."""
        clock = Clock()
        done: list[int] = []
        turn = NextTurn(clock, done.append)
        for i in range(5):
            turn.add(i)
        self.assertEqual(done, [])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual(done, [0, 1, 2, 3, 4])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_item_added_while_handling_gets_a_timer_of_its_own(self) -> None:
        """
        An item added by the handler is not slipped into the run in
        progress: it schedules a new call (the reactor runs it at the
        following turn) and is handled there.
        """
        clock = Clock()
        done: list[str] = []
        pending: list[int] = []

        def handle(item: str) -> None:
            done.append(item)
            if item == "a":
                turn.add("b")
                pending.append(len([c for c in clock.getDelayedCalls() if c.active()]))

        turn: NextTurn[str] = NextTurn(clock, handle)
        turn.add("a")
        clock.advance(0)
        self.assertEqual(pending, [1])
        self.assertEqual(done, ["a", "b"])

    def test_one_failing_item_does_not_stop_the_others(self) -> None:
        """An item whose handling raises is logged; the items after it are still handled."""
        clock = Clock()
        done: list[int] = []

        def handle(item: int) -> None:
            if item == 1:
                raise RuntimeError("boom")
            done.append(item)

        turn = NextTurn(clock, handle)
        for i in range(3):
            turn.add(i)
        with capturedLogs() as logged:
            clock.advance(0)
        self.assertEqual(done, [0, 2])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(any("failed" in str(e.get("log_format", "")) for e in logged))

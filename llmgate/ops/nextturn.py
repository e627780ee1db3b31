# -*- test-case-name: tests.ops.test_nextturn -*-
"""
Work gathered during a reactor turn and done once, at the next turn.

Both users hand it many items in one turn (every stream that relayed
events, every connection closed) and want each handled once the current
call stacks have unwound, before the reactor next polls: one
C{callLater(0)} for the whole turn instead of one per item.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from twisted.logger import Logger

T = TypeVar("T")

_log = Logger(namespace="llmgate.nextturn")


class NextTurn(Generic[T]):
    """Calls C{each(item)} for every item L{add}ed, in order, at the next turn."""

    __slots__ = ("_clock", "_each", "_items", "_call", "__weakref__")

    def __init__(self, clock: Any, each: Callable[[T], None]) -> None:
        self._clock = clock
        self._each = each
        self._items: list[T] = []
        self._call: Any = None

    def add(self, item: T) -> None:
        self._items.append(item)
        if self._call is None:
            self._call = self._clock.callLater(0, self._run)

    def _run(self) -> None:
        self._call = None
        items, self._items = self._items, []
        each = self._each
        for item in items:
            try:
                each(item)
            except Exception:
                # One item's failure must not cost the others their turn
                # (a connection left unclosed, a stream's events unsent).
                _log.failure("handling {item!r} at the next turn failed", item=item)

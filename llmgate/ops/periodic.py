# -*- test-case-name: tests.ops.test_periodic -*-
"""
A service that calls something every few seconds while it runs.

Several services repeated the same LoopingCall shape (start in
C{startService}, stop if running in C{stopService}), each with the same
flaw: a LoopingCall stops for good at the first exception, and a
collector timer, a metrics push or a budget check that stops silently is
worse than one that logs a failure and tries again at the next tick.
L{Periodic} is that shape once: the clock is injected, a failing call is
logged and the loop goes on, and stopping is idempotent.

Not Twisted's C{TimerService}: it always calls at once on start, and a
failure ends its loop.

The call must not return a Deferred: the loop would wait on it, and a
periodic job that can take longer than its interval has to decide itself
what to do about an overlap (L{llmgate.accounting.ledger.Ledger} does).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="llmgate.ops.periodic")


class Periodic(Service):
    """
    Calls C{call} (by default the subclass's L{tick}) every C{interval}
    seconds of C{clock} from C{startService} to C{stopService}; the first
    call at once if C{now}, else one interval after the start.

    @param clock: an C{IReactorTime}.
    """

    def __init__(
        self, clock: Any, interval: float, call: Optional[Callable[[], Any]] = None, now: bool = False
    ) -> None:
        self.clock = clock
        self.interval = interval
        self._call = call if call is not None else self.tick
        self._now = now
        self._loop: Optional[LoopingCall] = None

    def tick(self) -> None:
        """What to do every interval (when no C{call} was given)."""
        raise NotImplementedError

    @property
    def looping(self) -> bool:
        """Whether the timer runs."""
        return self._loop is not None and self._loop.running

    def _run(self) -> None:
        try:
            self._call()
        except Exception:
            log.failure("{name}: periodic call failed (retried in {interval} s)",
                        name=type(self).__name__, interval=self.interval)

    def start_timer(self) -> None:
        """Start the timer (what C{startService} does); no-op if it runs."""
        if self.looping:
            return
        loop = LoopingCall(self._run)
        loop.clock = self.clock
        self._loop = loop
        loop.start(self.interval, now=self._now)

    def stop_timer(self) -> None:
        """Stop the timer (what C{stopService} does); no-op if it is stopped."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def startService(self) -> None:
        super().startService()
        self.start_timer()

    def stopService(self) -> Any:
        super().stopService()
        self.stop_timer()

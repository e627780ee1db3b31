# -*- test-case-name: tests.routing.test_breaker -*-
"""
A circuit breaker per deployment, shared by every request of the process.

A deployment that failed C{failures} times in a row (connect failure,
retryable status, no headers in time) is left out of the pick for
C{cooldown} seconds; then one request probes it (half-open): a success
closes the breaker, a failure opens it for another cool-down. A deployment
that answered 429/503 with C{retry-after} is skipped for that long (capped)
whatever its breaker says. Reads and writes happen on the reactor thread.
"""

from __future__ import annotations

from typing import Any, Optional

Key = tuple[str, str]  # (provider name, upstream model)


class _State:
    __slots__ = ("failures", "opened_at", "probing_since", "skip_until", "outstanding")

    def __init__(self) -> None:
        self.failures = 0
        self.opened_at: Optional[float] = None
        self.probing_since: Optional[float] = None
        self.skip_until = 0.0
        self.outstanding = 0


class Breakers:
    """
    @param clock: C{IReactorTime} (C{seconds()}).
    @param failures: consecutive failures that open a breaker.
    @param cooldown: seconds an open breaker waits before a probe.
    """

    def __init__(self, clock: Any, failures: int = 5, cooldown: float = 30.0) -> None:
        self.clock = clock
        self.failures = failures
        self.cooldown = cooldown
        self._states: dict[Key, _State] = {}

    def configure(self, failures: int, cooldown: float) -> None:
        """New settings (a reload); the deployments' states are kept."""
        self.failures = failures
        self.cooldown = cooldown

    def _state(self, key: Key) -> _State:
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _State()
        return st

    def available(self, key: Key, skips: bool = True) -> bool:
        """
        Whether a request may go to C{key} now (without taking a probe);
        with C{skips} false, a C{retry-after} does not count (only the
        breaker).
        """
        st = self._states.get(key)
        if st is None:
            return True
        now = self.clock.seconds()
        if skips and now < st.skip_until:
            return False
        if st.opened_at is None:
            return True
        if now - st.opened_at < self.cooldown:
            return False
        # Half-open: one probe at a time (a probe whose answer never came,
        # its client gone, gives way after another cool-down).
        return st.probing_since is None or now - st.probing_since >= self.cooldown

    def taken(self, key: Key) -> None:
        """A request goes to C{key}: an open breaker's probe starts now."""
        st = self._state(key)
        st.outstanding += 1
        if st.opened_at is not None:
            st.probing_since = self.clock.seconds()

    def released(self, key: Key) -> None:
        """A request to C{key} is over (for least-outstanding balancing)."""
        st = self._states.get(key)
        if st is not None and st.outstanding > 0:
            st.outstanding -= 1

    def outstanding(self, key: Key) -> int:
        st = self._states.get(key)
        return 0 if st is None else st.outstanding

    def succeeded(self, key: Key) -> None:
        """C{key} answered (any non-retryable status): close its breaker."""
        st = self._states.get(key)
        if st is not None:
            st.failures = 0
            st.opened_at = st.probing_since = None

    def failed(self, key: Key, retry_after: Optional[float] = None, health: bool = True) -> None:
        """
        C{key} failed an attempt; C{retry_after}: seconds to skip it.
        C{health} false (a 429 or 408: the deployment is up, it refused
        this request) leaves the breaker as it is.
        """
        st = self._state(key)
        now = self.clock.seconds()
        if retry_after is not None:
            st.skip_until = max(st.skip_until, now + retry_after)
        if not health:
            return
        st.failures += 1
        if st.opened_at is not None or st.failures >= self.failures:
            # Open, or a failed probe: (re)open for a full cool-down.
            st.opened_at = now
            st.probing_since = None

    def is_open(self, key: Key) -> bool:
        st = self._states.get(key)
        return st is not None and st.opened_at is not None

    def wait(self, key: Key) -> float:
        """Seconds until C{key} may be tried again (0 if now)."""
        st = self._states.get(key)
        if st is None:
            return 0.0
        now = self.clock.seconds()
        w = max(0.0, st.skip_until - now)
        if st.opened_at is not None:
            w = max(w, st.opened_at + self.cooldown - now)
        return w

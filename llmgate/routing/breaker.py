# -*- test-case-name: tests.routing.test_breaker -*-
"""
A circuit breaker per deployment, shared by every request of the process,
and what the process observed of each deployment (its TTFT and error
ratio, for latency-aware balancing and the metrics).

A deployment that failed C{failures} times in a row (connect failure,
retryable status, no headers in time), or whose failures over the last
C{window} seconds (with at least C{min_requests} answers and failures in
it) reach C{failure_ratio}, is left out of the pick for C{cooldown}
seconds; then one request probes it (half-open): a success closes the
breaker (and forgets the window, so the next failure does not reopen it
on old numbers), a failure opens it for another cool-down. A deployment
that answered 429/503 with C{retry-after} is skipped for that long
(capped) whatever its breaker says. Reads and writes happen on the
reactor thread.

Observations:

  - The error ratio is I{windowed}, not an EWMA: failures over answers
    plus failures in the last C{window} seconds, counted in L{_BUCKETS}
    time buckets. It is the very number the ratio breaker opens on, so
    the C{llmgate_deployment_error_ratio} gauge explains every opening,
    and it forgets a past incident completely after one window instead
    of keeping a tail for ever. Memory: a fixed ring of buckets.
  - The TTFT EWMA weighs a new sample by how long the estimate went
    without one: C{alpha = max(ALPHA, 1 - exp(-dt / TAU))}. A busy
    deployment's estimate follows its last few samples; one that was
    not measured for a while takes its next sample almost as is, so an
    old slow sample does not linger (L{ttft_ewma}).
  - For the pick, L{ttft_estimate} also ages the EWMA towards zero by
    half every C{HALF_LIFE} seconds without a sample: a deployment that
    was slow once and so is no longer picked looks better and better
    until one request measures it again. A slow deployment keeps a
    trickle of traffic; one that got fast again wins its traffic back.
  - The p95 TTFT comes from the last L{P95_SAMPLES} samples, L{None}
    below L{P95_MIN} of them.

Deployments of the config are always tracked. Others (a default provider
serves any model name a client sends, and each name is a deployment)
are tracked up to L{MAX_EXTRA} keys; beyond that idle ones are forgotten
and, if none is idle, a new name gets no state (no breaker, no
observations) rather than unbounded memory.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Iterable, Optional

Key = tuple[str, str]  # (provider name, upstream model)

# Error-ratio window: this many buckets of window/_BUCKETS seconds.
_BUCKETS = 10
# TTFT EWMA: the least weight of a new sample, and the time constant of
# the weight a sample gets after a gap (seconds).
ALPHA = 0.1
TAU = 10.0
# A deployment's estimate halves every HALF_LIFE seconds without a sample.
HALF_LIFE = 10.0
# The p95 window: the last P95_SAMPLES TTFTs; None below P95_MIN.
P95_SAMPLES = 100
P95_MIN = 20
# Deployments not in the config tracked at most (as metric labels are capped).
MAX_EXTRA = 256

CLOSED, OPEN, HALF_OPEN = 0, 1, 2


class _State:
    __slots__ = (
        "failures", "opened_at", "probing_since", "skip_until", "outstanding",
        "ewma", "ewma_at", "samples", "p95", "window",
    )

    def __init__(self) -> None:
        self.failures = 0
        self.opened_at: Optional[float] = None
        self.probing_since: Optional[float] = None
        self.skip_until = 0.0
        self.outstanding = 0
        self.ewma: Optional[float] = None
        self.ewma_at = 0.0
        self.samples: collections.deque[float] = collections.deque(maxlen=P95_SAMPLES)
        self.p95: Optional[float] = None
        # Ring of [bucket number, answers+failures, failures]; made on the
        # first count.
        self.window: Optional[list[list[int]]] = None


class Breakers:
    """
    @param clock: C{IReactorTime} (C{seconds()}).
    @param failures: consecutive failures that open a breaker.
    @param cooldown: seconds an open breaker waits before a probe.
    @param failure_ratio: failures / requests over C{window} that open a
        breaker (once C{min_requests} were counted in the window).
    @param window: seconds of the failure-ratio window.
    @param min_requests: the fewest requests in the window for the ratio
        to open a breaker.
    @param configured: the keys of the configured deployments (always
        tracked; see L{MAX_EXTRA}).
    """

    def __init__(
        self,
        clock: Any,
        failures: int = 5,
        cooldown: float = 30.0,
        failure_ratio: float = 0.5,
        window: float = 30.0,
        min_requests: int = 20,
        configured: Iterable[Key] = (),
    ) -> None:
        self.clock = clock
        self._states: dict[Key, _State] = {}
        self.configured: frozenset[Key] = frozenset()
        self.window = window
        self.configure(failures, cooldown, failure_ratio, window, min_requests, configured)

    def configure(
        self,
        failures: int,
        cooldown: float,
        failure_ratio: float = 0.5,
        window: float = 30.0,
        min_requests: int = 20,
        configured: Iterable[Key] = (),
    ) -> None:
        """New settings (a reload); the deployments' states are kept (their
        windows are forgotten if the window's length changed)."""
        self.failures = failures
        self.cooldown = cooldown
        self.failure_ratio = failure_ratio
        self.min_requests = min_requests
        if window != self.window:
            for st in self._states.values():
                st.window = None
        self.window = window
        self._width = window / _BUCKETS
        self.configured = frozenset(configured)

    def _state(self, key: Key) -> Optional[_State]:
        """C{key}'s state, made if it may be tracked (else L{None})."""
        st = self._states.get(key)
        if st is None:
            if key not in self.configured and not self._room():
                return None
            st = self._states[key] = _State()
        return st

    def _room(self) -> bool:
        """Whether another key that is not configured may be tracked."""
        extra = [k for k in self._states if k not in self.configured]
        if len(extra) < MAX_EXTRA:
            return True
        now = self.clock.seconds()
        for k in extra:
            st = self._states[k]
            if st.outstanding == 0 and st.opened_at is None and st.skip_until <= now:
                del self._states[k]
        return len(self._states) - len(self.configured & self._states.keys()) < MAX_EXTRA

    def tracked(self) -> int:
        """How many deployments have state (for tests of the bound)."""
        return len(self._states)

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
        if st is None:
            return
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
        st = self._state(key)
        if st is None:
            return
        if st.opened_at is not None:
            # A probe's success: start the ratio afresh.
            st.window = None
        st.failures = 0
        st.opened_at = st.probing_since = None
        self._count(st, failed=False)

    def failed(self, key: Key, retry_after: Optional[float] = None, health: bool = True) -> None:
        """
        C{key} failed an attempt; C{retry_after}: seconds to skip it.
        C{health} false (a 429 or 408: the deployment is up, it refused
        this request) leaves the breaker and the error ratio as they are.
        """
        st = self._state(key)
        if st is None:
            return
        now = self.clock.seconds()
        if retry_after is not None:
            st.skip_until = max(st.skip_until, now + retry_after)
        if not health:
            return
        st.failures += 1
        total, failed = self._sums(st, self._count(st, failed=True))
        if (
            st.opened_at is not None
            or st.failures >= self.failures
            or (total >= self.min_requests and failed >= self.failure_ratio * total)
        ):
            # Open, or a failed probe: (re)open for a full cool-down.
            st.opened_at = now
            st.probing_since = None

    def is_open(self, key: Key) -> bool:
        st = self._states.get(key)
        return st is not None and st.opened_at is not None

    def state(self, key: Key) -> int:
        """L{CLOSED}, L{OPEN} (cooling down) or L{HALF_OPEN} (a probe may go or went)."""
        st = self._states.get(key)
        if st is None or st.opened_at is None:
            return CLOSED
        return OPEN if self.clock.seconds() - st.opened_at < self.cooldown else HALF_OPEN

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

    # -- the failure-ratio window ---------------------------------------------

    def _count(self, st: _State, failed: bool) -> int:
        """
        Count one answer or failure now; the current bucket's number (for
        L{_sums}, which only a failure needs: an answer, once per request,
        does not walk the window).
        """
        n = int(self.clock.seconds() // self._width)
        if st.window is None:
            st.window = [[-1, 0, 0] for _ in range(_BUCKETS)]
        b = st.window[n % _BUCKETS]
        if b[0] != n:
            b[0], b[1], b[2] = n, 0, 0
        b[1] += 1
        if failed:
            b[2] += 1
        return n

    def _sums(self, st: _State, n: int) -> tuple[int, int]:
        if st.window is None:
            return 0, 0
        total = failed = 0
        for b in st.window:
            if n - _BUCKETS < b[0] <= n:
                total += b[1]
                failed += b[2]
        return total, failed

    def error_ratio(self, key: Key) -> float:
        """Failures over requests to C{key} in the last C{window} seconds (0 if none)."""
        st = self._states.get(key)
        if st is None:
            return 0.0
        total, failed = self._sums(st, int(self.clock.seconds() // self._width))
        return failed / total if total else 0.0

    # -- time to first token -----------------------------------------------------

    def observe_ttft(self, key: Key, seconds: Optional[float]) -> None:
        """
        The TTFT of an attempt to C{key} that served its request (from the
        attempt's start); L{None} (no answer with content) is no sample.
        """
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            return
        st = self._state(key)
        if st is None:
            return
        now = self.clock.seconds()
        if st.ewma is None:
            st.ewma = seconds
        else:
            alpha = max(ALPHA, 1.0 - math.exp(-(now - st.ewma_at) / TAU))
            st.ewma += alpha * (seconds - st.ewma)
        st.ewma_at = now
        st.samples.append(seconds)
        st.p95 = None

    def ttft_ewma(self, key: Key) -> Optional[float]:
        """C{key}'s TTFT EWMA (seconds), L{None} before its first sample."""
        st = self._states.get(key)
        return None if st is None else st.ewma

    def ttft_estimate(self, key: Key) -> Optional[float]:
        """
        The EWMA as the pick sees it: halved for every L{HALF_LIFE}
        seconds since the last sample (L{None} before the first).
        """
        st = self._states.get(key)
        if st is None or st.ewma is None:
            return None
        age = max(0.0, self.clock.seconds() - st.ewma_at)
        return st.ewma * 0.5 ** (age / HALF_LIFE)

    def ttft_p95(self, key: Key) -> Optional[float]:
        """The 95th percentile of C{key}'s last TTFTs, L{None} below L{P95_MIN} samples."""
        st = self._states.get(key)
        if st is None or len(st.samples) < P95_MIN:
            return None
        if st.p95 is None:
            ordered = sorted(st.samples)
            st.p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return st.p95

# -*- test-case-name: tests.ops.test_gcstats -*-
"""
The cyclic garbage collector: its pauses as a metric, and its settings.

Every collection stops the reactor for as long as it takes: a pause of
half a second once held every stream's next event back. L{GCPauses} times
each collection through C{gc.callbacks} (two C{perf_counter} calls and a
few integer additions per collection) into
C{llmgate_gc_pause_seconds{generation}}, and the number of objects each
freed into C{llmgate_gc_collected_objects{generation}}: with no cyclic
garbage per request, collections free next to nothing.

The callback only adds to plain integers; the Prometheus families are built
when the registry is scraped. (prometheus_client's own metrics take a lock
that a collection, which can start inside any allocation, could find held
by the same thread.)
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from twisted.application.service import Service
from twisted.internet.task import LoopingCall

# From well under a young collection to the pauses seen before the fix.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# Collector settings, chosen from measurements (docs/benchmarks.md).
#
# CPython starts a young collection when the number of tracked objects
# allocated minus those freed passes a threshold. A relay at a steady
# number of open streams frees about as many objects as it makes, so that
# count barely moves: collections came seconds apart and each then walked
# every object born since, the state of hundreds of streams (50 ms and
# more at 1,000 streams). So the young generations are collected on a timer
# instead (L{YoungCollections}): each collection walks only what the last
# tenth of a second made, and the middle one what the two last made.
# The timer alone is not enough when the reactor is saturated (5,000 open
# streams on one core): its ticks then come late, after reactor turns of
# 100 ms and more, and a young collection walked up to 60,000 objects and
# a middle one 110,000 (up to 66 ms of CPU; docs/benchmarks.md run 12).
# So the count-based thresholds are low too: a young collection once the
# count passes THRESHOLD0, the middle one every other time (THRESHOLD1),
# which bounds the walks of a burst (new streams keep every object they
# make) whether or not the reactor turns; the timer covers the steady
# state, where the count does not move.
# A full collection walks every tracked object of every open stream (tens
# to hundreds of ms at thousands of streams). Requests leave no cyclic
# garbage (a full collection after 45 s at 5,000 streams found nothing to
# free), so it only has to catch what else might reach the old generation
# (a failed connect attempt leaves a cycle of Twisted's): never from the
# allocation count, but once every FULL_INTERVAL seconds, at a moment when
# at most FULL_MAX_LOAD requests are open (it then takes a few ms), or
# regardless once FULL_DEADLINE seconds have passed, so that nothing can
# pile up forever. What start-up built stays frozen.
YOUNG_INTERVAL = 0.025
MIDDLE_EVERY = 2
FULL_INTERVAL = 600.0
FULL_MAX_LOAD = 50
FULL_DEADLINE = 6 * 3600.0
THRESHOLD0 = 1_000
THRESHOLD1 = 1
THRESHOLD2 = 1_000_000_000


class GCPauses(Service):
    """
    Times every collection of the cyclic GC by generation, while the
    service runs; register it on a Prometheus registry to export the figures.

    @param clock: a monotonic clock in seconds (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0
        n = len(BUCKETS) + 1  # the last one is +Inf
        self.buckets = [[0] * n for _ in range(3)]
        self.sums = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]
        self.max = [0.0, 0.0, 0.0]

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        """The C{gc.callbacks} entry."""
        if phase == "start":
            self._started = self._clock()
            return
        pause = self._clock() - self._started
        gen = info["generation"]
        self.buckets[gen][bisect_left(BUCKETS, pause)] += 1
        self.sums[gen] += pause
        self.collected[gen] += info["collected"]
        if pause > self.max[gen]:
            self.max[gen] = pause

    def startService(self) -> None:
        super().startService()
        if self.callback not in gc.callbacks:
            gc.callbacks.append(self.callback)

    def stopService(self) -> None:
        super().stopService()
        while self.callback in gc.callbacks:
            gc.callbacks.remove(self.callback)

    def collect(self) -> Iterator[Any]:
        """The Prometheus collector interface: called on each scrape."""
        pauses = HistogramMetricFamily(
            "llmgate_gc_pause_seconds",
            "Pauses of the cyclic garbage collector (the reactor stops), by generation.",
            labels=["generation"],
        )
        freed = CounterMetricFamily(
            "llmgate_gc_collected_objects",
            "Objects freed by the cyclic garbage collector (garbage in reference cycles), by generation.",
            labels=["generation"],
        )
        for gen in range(3):
            counts = self.buckets[gen]
            cumulative = []
            total = 0
            for bound, count in zip((*(str(b) for b in BUCKETS), "+Inf"), counts):
                total += count
                cumulative.append((bound, total))
            pauses.add_metric([str(gen)], cumulative, self.sums[gen])
            freed.add_metric([str(gen)], self.collected[gen])
        yield pauses
        yield freed


def tune() -> None:
    """
    Settings for a long-running gateway, applied once start-up is done:
    everything built so far (modules, the tiktoken encodings, the service
    tree) lives as long as the process, so it is frozen out of the
    collector's sight; then the thresholds above.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(THRESHOLD0, THRESHOLD1, THRESHOLD2)


class YoungCollections(Service):
    """
    Collects the young generation every C{interval} seconds and the middle
    one instead every C{every}-th time, on the reactor, so each collection only
    walks what was made since the previous one, and everything once every
    C{full_interval} seconds when C{load()} (open requests) is at most
    C{full_max_load}, or once C{full_deadline} seconds have passed (see the
    note on the settings above).

    @param clock: an C{IReactorTime}.
    @param collect: C{gc.collect} (injectable for tests).
    """

    def __init__(
        self,
        clock: Any,
        interval: float = YOUNG_INTERVAL,
        every: int = MIDDLE_EVERY,
        full_interval: float = FULL_INTERVAL,
        collect: Callable[[int], Any] = gc.collect,
        load: Callable[[], int] = lambda: 0,
        full_max_load: int = FULL_MAX_LOAD,
        full_deadline: float = FULL_DEADLINE,
    ) -> None:
        self._interval = interval
        self._every = every
        self._full_every = max(1, round(full_interval / interval))
        self._full_overdue = max(1, round(full_deadline / interval))
        self._load = load
        self._full_max_load = full_max_load
        self._collect = collect
        self._ticks = 0
        self._since_full = 0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        self._ticks += 1
        self._since_full += 1
        if self._since_full >= self._full_every and (
            self._since_full >= self._full_overdue or self._load() <= self._full_max_load
        ):
            self._since_full = self._ticks = 0
            self._collect(2)
        elif self._ticks >= self._every:
            self._ticks = 0
            self._collect(1)
        else:
            self._collect(0)

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

Under C{--workers} the supervisor serves the sum of the workers'
multiprocess files (L{llmgate.ops.metrics}), which a collector object in
a worker's registry never reaches: there L{GCPush} copies the same
figures, once a second off the callback, into a multiprocess-mode
histogram and counter of the same names, which the supervisor sums like
every other counter (a dead worker's pauses stay in the sum).
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from typing import Any, Callable, Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from twisted.application.service import Service

from llmgate.ops.periodic import Periodic

# From well under a young collection to the pauses seen before the fix.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# Collector settings, chosen from measurements (docs/benchmarks.md).
#
# CPython starts a young collection when the number of tracked objects
# allocated minus those freed passes a threshold. A relay at a steady
# number of open streams frees about as many objects as it makes, so that
# count barely moves: collections came seconds apart and each then walked
# every object born since, the state of hundreds of streams (50 ms and
# more at 1,000 streams). So the young generation is collected on a timer
# instead (L{YoungCollections}), and every YOUNG_PER_STREAMS streams
# started (new streams make most of what survives; the timer's ticks come
# late when the reactor is saturated), and every YOUNG_PER_DESCRIPTORS
# ready descriptors the reactor handles (one saturated turn can complete
# hundreds of upstream connections and responses, each making a few dozen
# objects while the stream frees older ones, so the count does not see
# them: walks of 13,000 objects, 9 ms), and by the count once it passes
# THRESHOLD0, which bounds the walks of a burst whether or not the reactor
# turns.
# What survives a young collection is frozen at once (C{gc.freeze()}, a
# constant-time move of the generation lists into the permanent one): each
# object is walked at most once, while young, and no collection ever walks
# the older state of the open streams. Before, survivors went to the middle
# generation, collected every other time; its walks were twice the young
# ones and made the largest pauses (up to 19,500 objects, 9 ms of CPU, at
# 5,000 open streams). Frozen objects are still freed by their reference
# counts as usual; only garbage in reference cycles among them waits for a
# full collection. Requests leave no cyclic garbage (a full collection after
# 45 s at 5,000 streams found nothing to free), so the full collection only
# has to catch what else might (a failed connect attempt leaves a cycle of
# Twisted's): it unfreezes everything, walks it and freezes it again, never
# from the allocation count (THRESHOLD1 and THRESHOLD2 are out of reach),
# but once every FULL_INTERVAL seconds, at a moment when at most
# FULL_MAX_LOAD requests are open (it then takes a few tens of ms), or
# regardless once FULL_DEADLINE seconds have passed, so that nothing can
# pile up forever.
YOUNG_INTERVAL = 0.025
YOUNG_PER_STREAMS = 16
YOUNG_PER_DESCRIPTORS = 128
FULL_INTERVAL = 600.0
FULL_MAX_LOAD = 50
FULL_DEADLINE = 6 * 3600.0
THRESHOLD0 = 1_000
THRESHOLD1 = 1_000_000_000
THRESHOLD2 = 1_000_000_000


_PAUSE_HELP = "Pauses of the cyclic garbage collector (the reactor stops), by generation."
_FREED_HELP = "Objects freed by the cyclic garbage collector (garbage in reference cycles), by generation."


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
        pauses = HistogramMetricFamily("llmgate_gc_pause_seconds", _PAUSE_HELP, labels=["generation"])
        freed = CounterMetricFamily("llmgate_gc_collected_objects", _FREED_HELP, labels=["generation"])
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


class GCPush(Periodic):
    """
    A worker's L{GCPauses} figures, copied every C{interval} seconds (and
    at stop) into a prometheus_client C{Histogram} and C{Counter} of the
    same names as L{GCPauses.collect}'s, so that under multiprocess mode
    they reach the worker's metrics files.  Only what was added since the
    last copy is added, so the files hold exactly the process's totals.

    The histogram's buckets are raised by their own count through the
    child's C{_buckets} and C{_sum} values (prometheus_client has no public
    call for "n observations in this bucket"; replaying each pause with
    C{observe} would need every pause kept).  tests.ops.test_gcstats checks
    the result through the real multiprocess collector, so a
    prometheus_client that changes them fails there.

    @param registry: where the two metrics are registered (the worker's
        own, which nothing scrapes: not L{GCPauses}' registry in the
        single process, whose names they share).
    """

    def __init__(self, pauses: GCPauses, clock: Any, registry: Any = None, interval: float = 1.0) -> None:
        super().__init__(clock, interval)
        self._pauses = pauses
        hist = Histogram("llmgate_gc_pause_seconds", _PAUSE_HELP, ["generation"], buckets=BUCKETS, registry=registry)
        freed = Counter("llmgate_gc_collected_objects", _FREED_HELP, ["generation"], registry=registry)
        self._hist = [hist.labels(str(gen)) for gen in range(3)]
        self._freed = [freed.labels(str(gen)) for gen in range(3)]
        n = len(BUCKETS) + 1
        self._seen_buckets = [[0] * n for _ in range(3)]
        self._seen_sums = [0.0, 0.0, 0.0]
        self._seen_collected = [0, 0, 0]

    def tick(self) -> None:
        p = self._pauses
        for gen in range(3):
            child = self._hist[gen]
            seen = self._seen_buckets[gen]
            # Copies first: a collection may run (and add) between reads.
            counts, total, collected = list(p.buckets[gen]), p.sums[gen], p.collected[gen]
            for i, count in enumerate(counts):
                if count > seen[i]:
                    child._buckets[i].inc(count - seen[i])
                    seen[i] = count
            if total > self._seen_sums[gen]:
                child._sum.inc(total - self._seen_sums[gen])
                self._seen_sums[gen] = total
            if collected > self._seen_collected[gen]:
                self._freed[gen].inc(collected - self._seen_collected[gen])
                self._seen_collected[gen] = collected

    def stopService(self) -> None:
        super().stopService()
        self.tick()


def _nothing() -> None:
    pass


def tune(young: "YoungCollections | None" = None) -> None:
    """
    Settings for a long-running gateway, applied once start-up is done:
    everything built so far (modules, the tiktoken encodings, the service
    tree) lives as long as the process, so it is frozen out of the
    collector's sight; then the thresholds above, and C{young} freezes what
    survives its collections from now on.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(THRESHOLD0, THRESHOLD1, THRESHOLD2)
    if young is not None:
        young.freeze_survivors()


class YoungCollections(Periodic):
    """
    Collects the young generation every C{interval} seconds, on the
    reactor, and freezes what survived, so each collection only walks what
    was made since the previous one and no object is walked twice; and
    everything once every C{full_interval} seconds when C{load()} (open
    requests) is at most C{full_max_load}, or once C{full_deadline} seconds
    have passed (see the note on the settings above).

    Every C{per_streams} calls of L{stream_started}, and every call of
    L{descriptors} (the reactor's count of ready descriptors handled,
    L{llmgate.ops.reactor.LeanEPollReactor.everyDescriptors}), also run a
    young collection at once, between the timer's ticks.

    Survivors are frozen only once L{tune} has set the daemon's policy
    (L{freeze_survivors}): a service tree built in another process (the
    tests') must not freeze that process's objects.

    @param clock: an C{IReactorTime}.
    @param collect: C{gc.collect} (injectable for tests).
    """

    def __init__(
        self,
        clock: Any,
        interval: float = YOUNG_INTERVAL,
        full_interval: float = FULL_INTERVAL,
        collect: Callable[[int], Any] = gc.collect,
        load: Callable[[], int] = lambda: 0,
        full_max_load: int = FULL_MAX_LOAD,
        full_deadline: float = FULL_DEADLINE,
        per_streams: int = YOUNG_PER_STREAMS,
    ) -> None:
        super().__init__(clock, interval)
        self._per_streams = per_streams
        self._new = 0
        self._full_every = max(1, round(full_interval / interval))
        self._full_overdue = max(1, round(full_deadline / interval))
        self._load = load
        self._full_max_load = full_max_load
        self._collect = collect
        self._freeze: Callable[[], None] = _nothing
        self._unfreeze: Callable[[], None] = _nothing
        self._since_full = 0

    def freeze_survivors(
        self, freeze: Callable[[], None] = gc.freeze, unfreeze: Callable[[], None] = gc.unfreeze
    ) -> None:
        """From now on, freeze what survives each young collection, and
        unfreeze everything for a full one (C{gc.freeze}, C{gc.unfreeze};
        injectable for tests)."""
        self._freeze = freeze
        self._unfreeze = unfreeze

    def stream_started(self) -> None:
        """A stream started: every C{per_streams}-th, a young collection now."""
        if not self.running:
            return
        self._new += 1
        if self._new >= self._per_streams:
            self._young()

    def descriptors(self) -> None:
        """The reactor handled another C{YOUNG_PER_DESCRIPTORS} ready
        descriptors: a young collection now."""
        if self.running:
            self._young()

    def tick(self) -> None:
        self._since_full += 1
        if self._since_full >= self._full_every and (
            self._since_full >= self._full_overdue or self._load() <= self._full_max_load
        ):
            self._full()
        else:
            self._young()

    def _young(self) -> None:
        """The young generation; then what survived (and what the
        allocation count's own young collections left in the middle
        generation) out of every later collection's sight."""
        self._new = 0
        self._collect(0)
        self._freeze()

    def _full(self) -> None:
        """Everything, frozen objects included (start-up's too); then all
        that survived frozen again."""
        self._since_full = self._new = 0
        self._unfreeze()
        try:
            self._collect(2)
        finally:
            self._freeze()

"""The collector's pauses as a Prometheus histogram, and its settings."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops import gcstats
from llmgate.ops.gcstats import GCPauses


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class PauseTests(SynchronousTestCase):
    def test_pause_histogram_by_generation(self) -> None:
        """
        Each collection's pause (start to stop) lands in the bucket of its
        generation, with its sum, and the objects it freed are counted.
        """
        clock = FakeClock()
        pauses = GCPauses(clock)
        registry = CollectorRegistry()
        registry.register(pauses)
        pauses.callback("start", {"generation": 1})
        clock.now += 0.003
        pauses.callback("stop", {"generation": 1, "collected": 7, "uncollectable": 0})
        pauses.callback("start", {"generation": 0})
        clock.now += 0.0002
        pauses.callback("stop", {"generation": 0, "collected": 0, "uncollectable": 0})
        s = scrape(registry)
        gen1 = (("generation", "1"),)
        self.assertEqual(s[("llmgate_gc_pause_seconds_bucket", (("generation", "1"), ("le", "0.0025")))], 0)
        self.assertEqual(s[("llmgate_gc_pause_seconds_bucket", (("generation", "1"), ("le", "0.005")))], 1)
        self.assertEqual(s[("llmgate_gc_pause_seconds_bucket", (("generation", "1"), ("le", "+Inf")))], 1)
        self.assertEqual(s[("llmgate_gc_pause_seconds_count", gen1)], 1)
        self.assertAlmostEqual(s[("llmgate_gc_pause_seconds_sum", gen1)], 0.003)
        self.assertEqual(s[("llmgate_gc_collected_objects_total", gen1)], 7)
        self.assertEqual(s[("llmgate_gc_pause_seconds_bucket", (("generation", "0"), ("le", "0.00025")))], 1)
        self.assertEqual(s[("llmgate_gc_pause_seconds_count", (("generation", "2"),))], 0)

    def test_real_collections_observed_while_running(self) -> None:
        """
        While the service runs, real collections are timed; once it stops,
        its callback is gone from C{gc.callbacks}.
        """
        pauses = GCPauses()
        pauses.startService()
        self.addCleanup(lambda: pauses.running and pauses.stopService())
        gc.collect(0)
        gc.collect(2)
        self.assertGreaterEqual(sum(pauses.buckets[0]), 1)
        self.assertGreaterEqual(sum(pauses.buckets[2]), 1)
        self.assertGreater(pauses.sums[2], 0)
        pauses.stopService()
        self.assertNotIn(pauses.callback, gc.callbacks)
        before = sum(pauses.buckets[2])
        gc.collect(2)
        self.assertEqual(sum(pauses.buckets[2]), before)


class TuneTests(SynchronousTestCase):
    def test_freezes_start_up_and_sets_thresholds(self) -> None:
        """
        After start-up, the objects made so far are frozen out of the
        collector's sight and the chosen thresholds apply.
        """
        old = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *old)
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        gcstats.tune()
        self.assertGreater(gc.get_freeze_count(), 1000)
        self.assertEqual(
            gc.get_threshold(), (gcstats.THRESHOLD0, gcstats.THRESHOLD1, gcstats.THRESHOLD2)
        )


    def test_a_burst_is_collected_in_small_steps(self) -> None:
        """
        With the tuned thresholds, a burst of surviving allocations (new
        streams keep what they make) is collected by the allocation count
        while it happens, without a timer tick, in young collections only:
        no collection is left to walk the whole burst, and none walks the
        middle or old generations.
        """
        old = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *old)
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        gcstats.tune()
        seen: list[int] = []

        def probe(phase: str, info: dict) -> None:
            if phase == "start":
                seen.append(info["generation"])

        gc.callbacks.append(probe)
        try:
            burst = [{} for _ in range(50_000)]
        finally:
            gc.callbacks.remove(probe)
        self.assertEqual(len(burst), 50_000)
        self.assertGreaterEqual(seen.count(0), 20)
        self.assertEqual(seen.count(1) + seen.count(2), 0)


def _young(clock: object, **kw: object) -> tuple[gcstats.YoungCollections, list[object]]:
    """A young-collection service whose collections and freezes are recorded in order."""
    calls: list[object] = []
    svc = gcstats.YoungCollections(clock, collect=calls.append, **kw)  # type: ignore[arg-type]
    svc.freeze_survivors(lambda: calls.append("freeze"), lambda: calls.append("unfreeze"))
    return svc, calls


class YoungCollectionTests(SynchronousTestCase):
    def test_timer_collects_young_and_freezes_survivors(self) -> None:
        """
        While running, the young generation is collected every interval,
        whatever the allocation count says, and what survived is frozen
        right after (never a middle collection); nothing after the service
        stops.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        svc, calls = _young(clock, interval=0.1, full_interval=3600)
        svc.startService()
        for _ in range(20):
            clock.advance(0.1)
        self.assertEqual(calls, [0, "freeze"] * 20)
        svc.stopService()
        clock.advance(1)
        self.assertEqual(len(calls), 40)

    def test_no_freezing_until_the_policy_is_set(self) -> None:
        """
        A tree built outside the daemon (tests, tools) collects young
        generations but freezes nothing: only L{gcstats.tune} with the
        service, as the daemon calls it, turns freezing on.
        """
        from twisted.internet.task import Clock

        self.addCleanup(gc.unfreeze)
        old = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *old)
        gc.unfreeze()
        clock = Clock()
        calls: list[object] = []
        svc = gcstats.YoungCollections(clock, interval=0.1, collect=calls.append)
        svc.startService()
        self.addCleanup(svc.stopService)
        clock.advance(0.1)
        self.assertEqual((calls, gc.get_freeze_count()), ([0], 0))
        gcstats.tune(svc)
        gc.unfreeze()  # what tune() itself froze
        clock.advance(0.1)
        self.assertEqual(calls, [0, 0])
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_new_streams_drive_young_collections(self) -> None:
        """
        Every per_streams-th stream started runs a young collection at once,
        however late the timer is; the count starts over at each
        collection, the timer's too; nothing runs while the service is
        stopped.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        svc, calls = _young(clock, interval=1, full_interval=3600, per_streams=3)
        for _ in range(5):
            svc.stream_started()
        self.assertEqual(calls, [])
        svc.startService()
        self.addCleanup(svc.stopService)
        for _ in range(2):
            svc.stream_started()
        self.assertEqual(calls, [])
        svc.stream_started()
        self.assertEqual(calls, [0, "freeze"])
        for _ in range(3):
            svc.stream_started()
        self.assertEqual(calls, [0, "freeze"] * 2)
        svc.stream_started()
        clock.advance(1)
        self.assertEqual(calls, [0, "freeze"] * 3)
        for _ in range(2):
            svc.stream_started()
        self.assertEqual(len(calls), 6)
        svc.stream_started()
        self.assertEqual(calls, [0, "freeze"] * 4)

    def test_reactor_descriptor_counts_drive_young_collections(self) -> None:
        """Each call of descriptors() (the reactor's count of handled descriptors) runs a young collection at once, but not while stopped."""
        from twisted.internet.task import Clock

        svc, calls = _young(Clock(), interval=1, full_interval=3600)
        svc.descriptors()
        self.assertEqual(calls, [])
        svc.startService()
        svc.descriptors()
        svc.descriptors()
        self.assertEqual(calls, [0, "freeze"] * 2)
        svc.stopService()
        svc.descriptors()
        self.assertEqual(len(calls), 4)

    def test_full_collection_on_its_own_timer(self) -> None:
        """A full collection runs once per full interval, and only then: everything unfrozen, collected, frozen again."""
        from twisted.internet.task import Clock

        clock = Clock()
        svc, calls = _young(clock, interval=0.5, full_interval=5)
        svc.startService()
        self.addCleanup(svc.stopService)
        for _ in range(20):
            clock.advance(0.5)
        young = [0, "freeze"]
        full = ["unfreeze", 2, "freeze"]
        self.assertEqual(calls, (young * 9 + full) * 2)

    def test_full_collection_refreezes_when_collecting_fails(self) -> None:
        """Whatever the full collection raises, what it unfroze is frozen again."""
        from twisted.internet.task import Clock

        calls: list[object] = []

        def collect(gen: int) -> None:
            calls.append(gen)
            if gen == 2:
                raise MemoryError()

        svc = gcstats.YoungCollections(Clock(), collect=collect)
        svc.freeze_survivors(lambda: calls.append("freeze"), lambda: calls.append("unfreeze"))
        self.assertRaises(MemoryError, svc._full)
        self.assertEqual(calls, ["unfreeze", 2, "freeze"])

    def test_full_collection_waits_for_a_quiet_moment(self) -> None:
        """
        A due full collection waits while more than the allowed number of
        requests are open, runs as soon as they are few, and runs anyway
        once its deadline has passed.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        load = [500]
        svc, calls = _young(
            clock, interval=1, full_interval=5, full_max_load=50, full_deadline=20, load=lambda: load[0],
        )
        svc.startService()
        self.addCleanup(svc.stopService)

        def seconds(n: int) -> None:
            for _ in range(n):
                clock.advance(1)

        seconds(10)
        self.assertNotIn(2, calls)
        load[0] = 50
        seconds(1)
        self.assertEqual(calls[-2:], [2, "freeze"])
        self.assertEqual(calls.count(2), 1)
        load[0] = 500
        seconds(19)
        self.assertEqual(calls.count(2), 1)
        seconds(1)
        self.assertEqual(calls.count(2), 2)


class FrozenCycleTests(SynchronousTestCase):
    """The real collector: what freezing survivors may hide, the full collection finds."""

    def test_cycle_frozen_while_alive_is_freed_by_the_full_collection(self) -> None:
        """
        A cycle that was still referenced at a young collection is frozen
        with it; once dropped, young collections do not free it, the full
        collection does (and leaves everything frozen again).
        """
        import weakref

        from twisted.internet.task import Clock

        class Node:
            pass

        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        svc = gcstats.YoungCollections(Clock())
        svc.freeze_survivors()
        svc.startService()
        self.addCleanup(svc.stopService)
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gone = weakref.ref(a)
        svc._young()
        self.assertGreater(gc.get_freeze_count(), 0)
        del a, b
        svc._young()
        gc.collect(0)
        self.assertIsNotNone(gone())
        svc._full()
        self.assertIsNone(gone())
        self.assertGreater(gc.get_freeze_count(), 0)


class WorkerPushTests(SynchronousTestCase):
    """Under --workers the pauses reach the supervisor's sum through the multiprocess files."""

    def worker_push(self, path: str, pid: int, clock: object) -> tuple[GCPauses, gcstats.GCPush]:
        """A worker's GCPauses and GCPush, writing multiprocess files as pid C{pid}."""
        import os

        from prometheus_client import values

        self.patch(os, "environ", dict(os.environ, PROMETHEUS_MULTIPROC_DIR=path))
        self.patch(values, "ValueClass", values.MultiProcessValue(lambda: pid))
        pauses = GCPauses(FakeClock())
        return pauses, gcstats.GCPush(pauses, clock, CollectorRegistry(), interval=1.0)

    def pause(self, pauses: GCPauses, gen: int, seconds: float, collected: int) -> None:
        clock = pauses._clock
        pauses.callback("start", {"generation": gen})
        clock.now += seconds  # type: ignore[attr-defined]
        pauses.callback("stop", {"generation": gen, "collected": collected, "uncollectable": 0})

    def test_two_workers_summed(self) -> None:
        """
        Two workers' pauses, pushed on their timer and at stop, add up
        bucket by bucket in the sum the supervisor serves; only what is
        new is added at each push.
        """
        import os

        from prometheus_client.multiprocess import MultiProcessCollector
        from twisted.internet.task import Clock

        path = self.mktemp()
        os.makedirs(path)
        clock = Clock()
        a, push_a = self.worker_push(path, 2001, clock)
        b, push_b = self.worker_push(path, 2002, clock)
        push_a.startService()
        push_b.startService()
        self.pause(a, 1, 0.003, 7)
        self.pause(b, 1, 0.0004, 2)
        clock.advance(1.0)
        self.pause(a, 0, 0.0002, 0)
        clock.advance(1.0)
        self.pause(b, 1, 0.003, 1)
        push_b.stopService()  # the last push, at stop
        push_a.stopService()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        s = scrape(registry)
        gen1 = (("generation", "1"),)
        self.assertEqual(s[("llmgate_gc_pause_seconds_bucket", (("generation", "1"), ("le", "0.0005")))], 1)
        self.assertEqual(s[("llmgate_gc_pause_seconds_bucket", (("generation", "1"), ("le", "0.005")))], 3)
        self.assertEqual(s[("llmgate_gc_pause_seconds_bucket", (("generation", "1"), ("le", "+Inf")))], 3)
        self.assertEqual(s[("llmgate_gc_pause_seconds_count", gen1)], 3)
        self.assertAlmostEqual(s[("llmgate_gc_pause_seconds_sum", gen1)], 0.0064)
        self.assertEqual(s[("llmgate_gc_collected_objects_total", gen1)], 10)
        self.assertEqual(s[("llmgate_gc_pause_seconds_bucket", (("generation", "0"), ("le", "0.00025")))], 1)
        self.assertEqual(s[("llmgate_gc_pause_seconds_count", (("generation", "0"),))], 1)
        self.assertEqual(clock.getDelayedCalls(), [])

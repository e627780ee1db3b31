"""Threaded work handed back to the reactor as Deferreds, without garbage."""

from __future__ import annotations

import gc
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops.threads import ThreadRunner


class FakeReactor:
    """callFromThread queues; the test runs the queue on its own thread."""

    def __init__(self) -> None:
        self.queue: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.queue.append((f, args))

    def run(self) -> None:
        while self.queue:
            f, args = self.queue.pop(0)
            f(*args)


def square(x: int) -> int:
    return x * x


def boom() -> None:
    raise ValueError("no")


class ThreadRunnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.runner = ThreadRunner(self.reactor, workers=2)
        self.runner.startService()

    def drain(self) -> None:
        """Wait for the workers (stopping the service), then run the reactor's queue."""
        executor = self.runner._executor
        self.runner.stopService()
        if executor is not None:
            executor.shutdown(wait=True)
        self.reactor.run()

    def test_result_on_reactor_thread(self) -> None:
        """The result arrives through callFromThread, never in the worker."""
        d = self.runner(square, 7)
        self.assertNoResult(d)
        self.drain()
        self.assertEqual(self.successResultOf(d), 49)

    def test_error_is_errback(self) -> None:
        """An exception in the work fails the Deferred with it."""
        d = self.runner(boom)
        self.drain()
        self.failureResultOf(d, ValueError)

    def test_no_cyclic_garbage(self) -> None:
        """
        A call leaves nothing for the cyclic collector (Twisted's thread
        pool leaves a self-referring closure per call).
        """
        self.runner(square, 1)  # the executor's threads, made once
        gc.collect()
        gc.disable()
        try:
            ds = [self.runner(square, i) for i in range(20)]
            self.drain()
            self.assertEqual([self.successResultOf(d) for d in ds], [i * i for i in range(20)])
            del ds
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            found = sorted({type(o).__qualname__ for o in gc.garbage})
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
            gc.enable()
        self.assertEqual(found, [])

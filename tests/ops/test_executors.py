"""
Tests for L{llmgate.ops.executors.BoundedExecutor}, with a thread pool the
test runs by hand.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops.executors import BoundedExecutor, Overloaded


class ImmediateReactor:
    """C{callFromThread} for a pool whose "threads" run on this thread."""

    def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
        f(*a, **kw)


class HandPool:
    """A ThreadPool whose jobs run when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, Any, tuple[Any, ...]]] = []

    def callInThreadWithCallback(self, onResult: Any, f: Any, *a: Any, **kw: Any) -> None:
        self.jobs.append((onResult, f, a))

    def run_one(self) -> None:
        onResult, f, a = self.jobs.pop(0)
        try:
            result = f(*a)
        except BaseException as e:  # noqa: B902 - reported like ThreadPool does
            from twisted.python.failure import Failure

            onResult(False, Failure(e))
        else:
            onResult(True, result)


class Arg:
    """A weak-referenceable stand-in for a request body."""


def make(threads: int = 1, **kw: Any) -> tuple[BoundedExecutor, HandPool]:
    pool = HandPool()
    return BoundedExecutor(ImmediateReactor(), "test", threads, pool=pool, **kw), pool


class ExecutorTests(SynchronousTestCase):
    def test_runs_at_most_threads_jobs(self) -> None:
        """Jobs beyond the thread count wait, and start in order as others end."""
        ex, pool = make(threads=2)
        ds = [ex.submit(lambda i=i: i * 10) for i in range(4)]
        self.assertEqual(len(pool.jobs), 2)
        pool.run_one()
        self.assertTrue(ds[0].called)
        self.assertEqual(len(pool.jobs), 2)
        pool.run_one()
        pool.run_one()
        pool.run_one()
        self.assertEqual([self.successResultOf(d) for d in ds], [0, 10, 20, 30])
        self.assertEqual((ex.jobs, ex.bytes), (0, 0))

    def test_errors_reach_the_caller(self) -> None:
        """An exception in the job fails its Deferred."""
        ex, pool = make()
        d = ex.submit(lambda: 1 / 0)
        pool.run_one()
        self.failureResultOf(d, ZeroDivisionError)

    def test_full_queue_refused(self) -> None:
        """Past max_jobs queued-or-running jobs, submit fails with Overloaded at once."""
        ex, pool = make(max_jobs=2)
        ex.submit(lambda: 1)
        ex.submit(lambda: 2)
        self.failureResultOf(ex.submit(lambda: 3), Overloaded)
        self.assertEqual(ex.rejected, 1)
        pool.run_one()
        ex.submit(lambda: 4)  # room again

    def test_byte_bound(self) -> None:
        """
        Past max_bytes of queued-or-running sizes, submit is refused; a
        lone job is taken whatever its size.
        """
        ex, pool = make(max_bytes=100)
        ex.submit(lambda: 1, size=500)
        self.failureResultOf(ex.submit(lambda: 2, size=1), Overloaded)
        pool.run_one()
        ex.submit(lambda: 3, size=60)
        ex.submit(lambda: 4, size=40)
        self.failureResultOf(ex.submit(lambda: 5, size=1), Overloaded)
        self.assertEqual(ex.bytes, 100)

    def test_cancel_queued_drops_it_and_its_arguments(self) -> None:
        """A cancelled queued job never runs, frees its place and its arguments."""
        ex, pool = make(max_jobs=2)
        ex.submit(lambda: 1)
        ran = []
        arg = Arg()
        ref = weakref.ref(arg)
        d = ex.submit(ran.append, arg, size=7)
        del arg
        d.cancel()
        self.failureResultOf(d, CancelledError)
        gc.collect()
        self.assertIsNone(ref())
        self.assertEqual((ex.jobs, ex.bytes), (1, 0))
        pool.run_one()
        self.assertEqual(pool.jobs, [])
        self.assertEqual(ran, [])

    def test_dead_client_skipped(self) -> None:
        """A job whose alive() is false when its turn comes is skipped."""
        ex, pool = make()
        ex.submit(lambda: 1)
        gone = [False]
        ran = []
        d = ex.submit(ran.append, 1, alive=lambda: not gone[0])
        nxt = ex.submit(lambda: 2)
        gone[0] = True
        pool.run_one()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(ex.skipped, 1)
        pool.run_one()  # the next job went straight on
        self.assertEqual(self.successResultOf(nxt), 2)
        self.assertEqual(ran, [])

    def test_cancel_running(self) -> None:
        """Cancelling a running job fails its Deferred now; its late result is dropped."""
        ex, pool = make()
        d = ex.submit(lambda: 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(ex.jobs, 1)  # its thread is still busy
        pool.run_one()
        self.assertEqual(ex.jobs, 0)

    def test_in_thread_signature(self) -> None:
        """Called as in_thread(f, *args) it runs f(*args) unbounded."""
        ex, pool = make()
        d = ex(divmod, 7, 2)
        pool.run_one()
        self.assertEqual(self.successResultOf(d), (3, 1))

    def test_stop_cancels_queued(self) -> None:
        """Stopping the service fails the jobs still queued."""
        ex, pool = make()
        ex.startService()
        ex.submit(lambda: 1)
        d = ex.submit(lambda: 2)
        ex.stopService()
        self.failureResultOf(d, CancelledError)

    def test_on_release(self) -> None:
        """
        on_release hears a job's size once its arguments are let go: when
        it ran (even if cancelled meanwhile), was skipped, or was
        cancelled in the queue.
        """
        released: list[int] = []
        ex, pool = make(on_release=released.append)
        running = ex.submit(lambda: 1, size=10)
        queued = ex.submit(lambda: 2, size=20)
        skipped = ex.submit(lambda: 3, size=30, alive=lambda: False)
        queued.cancel()
        self.failureResultOf(queued, CancelledError)
        self.assertEqual(released, [20])
        running.cancel()
        self.failureResultOf(running, CancelledError)
        self.assertEqual(released, [20])  # its thread still holds it
        pool.run_one()
        self.assertEqual(released, [20, 10, 30])
        self.failureResultOf(skipped, CancelledError)

# -*- test-case-name: tests.ops.test_executors -*-
"""
Thread pools of our own, each with a bounded queue that is kept on the
reactor thread.

The reactor's shared thread pool (10 threads, unbounded queue) also runs
DNS lookups. Big-body JSON parses and tiktoken estimates queued there made
name resolution, and so new upstream connections, wait behind them; and a
job queued for a client that had already hung up still ran and still held
its body. Here each kind of work gets its own threads, jobs wait in a queue
we can see (and cancel: a cancelled job is dropped with its arguments at
once), a job whose client is gone is skipped when its turn comes, and a
full queue is refused up front so the caller can answer 503.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from llmgate.ops.threads import ThreadRunner


class Overloaded(Exception):
    """The executor's queue is full; try again later."""


class _Job:
    __slots__ = ("f", "args", "size", "alive", "d", "running")

    def __init__(self, f: Callable[..., Any], args: tuple[Any, ...], size: int, alive: Optional[Callable[[], bool]], cancel: Callable[["_Job"], None]) -> None:
        self.f = f
        self.args = args
        self.size = size
        self.alive = alive
        self.d: Deferred[Any] = Deferred(lambda d: cancel(self))
        self.running = False


class BoundedExecutor(service.Service):
    """
    Runs callables on at most C{threads} threads of its own pool; the rest
    wait in a FIFO on the reactor thread.

    @param reactor: C{IReactorFromThreads}, to get results back.
    @param name: the pool's name (thread names, metrics).
    @param threads: jobs running at once.
    @param max_jobs: queued and running jobs past which L{submit} refuses;
        L{None} for no limit (work that must not be refused).
    @param max_bytes: as C{max_jobs}, for the sum of the jobs' C{size}.
    @param on_release: called with a job's C{size} once nothing of this
        executor holds its arguments any more (it ran, was skipped or was
        cancelled while queued); see L{llmgate.ops.memory.Trimmer}.
    @param pool: a C{ThreadPool}-like object (tests pass a synchronous
        one); by default a L{ThreadRunner} started and stopped with this
        service.
    """

    def __init__(
        self,
        reactor: Any,
        name: str,
        threads: int,
        max_jobs: Optional[int] = None,
        max_bytes: Optional[int] = None,
        pool: Any = None,
        on_release: Optional[Callable[[int], Any]] = None,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.threads = threads
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.on_release = on_release
        self._own_pool = pool is None
        if pool is None:
            # Not Twisted's ThreadPool: its callInThreadWithCallback leaves a
            # reference cycle per call (see llmgate.ops.threads).
            self.pool = ThreadRunner(reactor, workers=threads, name=name)
            self._run: Callable[..., Deferred[Any]] = self.pool
        else:
            self.pool = pool
            self._run = partial(deferToThreadPool, reactor, pool)
        self._queue: deque[_Job] = deque()
        self._running = 0
        self.jobs = 0  # queued + running
        self.bytes = 0  # their sizes
        self.rejected = 0
        self.skipped = 0

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._own_pool:
            self.pool.startService()

    def stopService(self) -> Any:
        super().stopService()
        for job in list(self._queue):
            job.d.cancel()
        if self._own_pool:
            # Lets the threads go once the running jobs end.
            self.pool.stopService()

    # -- jobs ----------------------------------------------------------------

    def submit(
        self,
        f: Callable[..., Any],
        *args: Any,
        size: int = 0,
        alive: Optional[Callable[[], bool]] = None,
    ) -> Deferred[Any]:
        """
        C{f(*args)} on a thread of this pool.

        @param size: what the job weighs against C{max_bytes} (a body's
            length), while it is queued or running.
        @param alive: asked on the reactor thread as the job's turn comes;
            if it says False the job is skipped (its Deferred fails with
            C{CancelledError}).
        @return: fires with the result; fails with L{Overloaded} at once
            if the queue is full. Cancelling it drops a queued job.
        """
        if (self.max_jobs is not None and self.jobs >= self.max_jobs) or (
            self.max_bytes is not None and self.jobs and self.bytes + size > self.max_bytes
        ):
            self.rejected += 1
            return fail(Overloaded(f"the {self.name} queue is full"))
        job = _Job(f, args, size, alive, self._dequeue)
        self.jobs += 1
        self.bytes += size
        self._queue.append(job)
        self._pump()
        return job.d

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """C{in_thread(f, *args)}, as L{llmgate.accounting.recorder.Accounting} takes it."""
        return self.submit(f, *args)

    def _dequeue(self, job: _Job) -> None:
        if job.running:
            return  # the thread runs on; its result is dropped
        self._queue.remove(job)
        self._release(job)

    def _release(self, job: _Job) -> None:
        self.jobs -= 1
        self.bytes -= job.size
        job.f = job.args = job.alive = None  # type: ignore[assignment]
        if self.on_release is not None and job.size:
            self.on_release(job.size)

    def _pump(self) -> None:
        while self._running < self.threads and self._queue:
            job = self._queue.popleft()
            if job.alive is not None and not job.alive():
                self.skipped += 1
                self._release(job)
                job.d.errback(CancelledError("the client went away"))
                continue
            job.running = True
            self._running += 1
            f, args = job.f, job.args
            job.args = ()  # only the thread holds them now
            d = self._run(f, *args)
            del f, args
            d.addBoth(self._done, job)

    def _done(self, result: Any, job: _Job) -> None:
        self._running -= 1
        self._release(job)
        self._pump()
        if not job.d.called:
            if isinstance(result, Failure):
                job.d.errback(result)
            else:
                job.d.callback(result)

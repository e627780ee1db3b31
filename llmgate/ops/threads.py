# -*- test-case-name: tests.ops.test_threads -*-
"""
Work off the reactor thread without garbage.

Twisted's C{ThreadPool.callInThreadWithCallback} (under C{deferToThread}
and C{deferToThreadPool}) wraps each call in a closure that refers to
itself: a reference cycle per call, freed only by the cyclic collector.
A call that runs longer than a young collection or two (a ledger batch, a
token estimate) reaches the old generation, which is collected rarely, so
these cycles pile up: about 20 objects a second from the ledger alone. The
standard library's executor breaks its own cycles, so the gateway's
threaded work goes through it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class ThreadRunner(Service):
    """
    C{runner(f, *args)} runs C{f(*args)} in one of C{workers} threads and
    returns a Deferred that fires with its result on the reactor thread.

    The threads are made on first use and let go when the service stops
    (after the work already queued, which is what a ledger flushing its last
    batch at shutdown needs).

    @param reactor: an C{IReactorFromThreads}.
    """

    def __init__(self, reactor: Any, workers: int = 10, name: str = "llmgate") -> None:
        self._reactor = reactor
        self._workers = workers
        self._name = name
        self._executor: Optional[ThreadPoolExecutor] = None

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix=self._name)
        d: Deferred[Any] = Deferred()
        future = self._executor.submit(f, *args)
        future.add_done_callback(partial(_hand_back, self._reactor, d))
        return d

    def stopService(self) -> None:
        super().stopService()
        executor, self._executor = self._executor, None
        if executor is not None:
            # Queued work still runs; nothing waits for it on this thread.
            executor.shutdown(wait=False)


def _hand_back(reactor: Any, d: Deferred[Any], future: Future[Any]) -> None:
    # In the worker thread: the Deferred is the reactor thread's to fire.
    reactor.callFromThread(_fire, d, future)


def _fire(d: Deferred[Any], future: Future[Any]) -> None:
    error = future.exception()
    if error is None:
        d.callback(future.result())
    else:
        d.errback(Failure(error))

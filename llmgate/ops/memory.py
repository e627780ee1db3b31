# -*- test-case-name: tests.ops.test_memory -*-
"""
Giving the memory of big request bodies back to the system.

A 30 MB body reaches Python in 64 kB reads and is freed into glibc's heap,
not to the kernel. Two things keep the process at its peak size:

 - glibc raises its mmap threshold after freeing a large block (up to
   32 MB), so later bodies and their parsed copies land in the heaps of
   the threads that made them, whose free tops are never handed back;
 - the 64 kB read buffers leave free holes between live objects, which
   C{free} does not return either.

So the threshold is fixed at start (L{tune_malloc}), and after large frees
we call C{malloc_trim(0)}, which returns the holes: off the reactor thread
(it walks every arena) and at most every few seconds. Measured with
C{bench/big_bodies.py} (40 bodies of 31 MB from clients that hang up; RSS
123 MiB before), RSS peak and 15 s after, two runs each: neither 1.1-1.3
GiB / 195-336 MiB; trim only 1.3 GiB / 271-361 MiB; fixed threshold only
1.0-1.1 GiB / 143-147 MiB; both 0.8-0.9 GiB / 121-123 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Callable, Optional

from twisted.logger import Logger

log = Logger(namespace="llmgate.ops.memory")


def _libc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS): nothing to do
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


# mallopt(3) parameters.
_M_MMAP_THRESHOLD = -3
# Allocations from this size up get pages of their own, unmapped when freed.
MMAP_THRESHOLD = 1024 * 1024


def tune_malloc(threshold: int = MMAP_THRESHOLD) -> bool:
    """
    Fix glibc's mmap threshold (which also turns off its dynamic raising):
    every big body, and every copy of one, is then mapped on its own and
    unmapped the moment it is freed, in whichever thread, and a growing
    body buffer is moved with mremap instead of copied. False where this
    is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def malloc_trim() -> bool:
    """C{malloc_trim(0)}; False where there is no such call."""
    trim = _libc_trim()
    return bool(trim(0)) if trim is not None else False


class Trimmer:
    """
    Trims the C heap once at least C{threshold} bytes of big bodies were
    freed, C{delay} seconds after the last such request ended (their
    references go as its callbacks unwind), and never more often than
    every C{min_interval} seconds.

    @param clock: C{IReactorTime}.
    @param in_thread: C{f() -> Deferred} running C{f} off the reactor thread.
    """

    def __init__(
        self,
        clock: Any,
        in_thread: Callable[..., Any],
        threshold: int = 64 * 1024 * 1024,
        min_interval: float = 10.0,
        delay: float = 1.0,
        trim: Callable[[], Any] = malloc_trim,
    ) -> None:
        self.clock = clock
        self.in_thread = in_thread
        self.threshold = threshold
        self.min_interval = min_interval
        self.delay = delay
        self.trim = trim
        self.trims = 0
        self._freed = 0
        self._last: Optional[float] = None
        self._call: Any = None

    def freed(self, nbytes: int) -> None:
        """A request holding a body of C{nbytes} is over."""
        self._freed += nbytes
        if self._freed < self.threshold or self._call is not None:
            return
        wait = self.delay
        if self._last is not None:
            wait = max(wait, self._last + self.min_interval - self.clock.seconds())
        self._call = self.clock.callLater(wait, self._run)

    def _run(self) -> None:
        self._call = None
        self._freed = 0
        self._last = self.clock.seconds()
        self.trims += 1
        d = self.in_thread(self.trim)
        d.addErrback(lambda f: log.failure("malloc_trim failed", f))

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

"""
Turn probe: where a running gateway stops its reactor, in thread CPU time.

Loaded through PYTHONPATH into a `twistd -n llmgate` process (and nothing
else), it times, with `time.thread_time`, every dispatch of ready sockets
(the reactor's poll), every run of the timed calls, and every timed call
that takes over 0.3 ms, by the call's name; every two seconds it writes a
summary to `$TURNPROBE_OUT.<pid>`. Thread CPU, not wall-clock time, so a
busy machine that deschedules the process does not show as a stop.

    PYTHONPATH=bench/turnprobe TURNPROBE_OUT=turn .venv/bin/twistd -n llmgate ...

Diagnostics only: it wraps every DelayedCall's function (about a
microsecond each) and keeps every turn's figure in memory.
"""

import collections
import os
import threading
import time

_out = os.environ.get("TURNPROBE_OUT")
if _out:
    from twisted.internet import base

    import llmgate.ops.reactor as lean

    _tt = time.thread_time
    _polls: list = []
    _timers: list = []
    _calls: collections.Counter = collections.Counter()
    _count: collections.Counter = collections.Counter()
    _worst: collections.Counter = collections.Counter()

    _poll = lean.LeanEPollReactor.doPoll

    def doPoll(self, timeout):
        t = _tt()
        _poll(self, timeout)
        _polls.append(_tt() - t)

    lean.LeanEPollReactor.doPoll = lean.LeanEPollReactor.doIteration = doPoll

    _run = base.ReactorBase.runUntilCurrent

    def runUntilCurrent(self):
        t = _tt()
        _run(self)
        _timers.append(_tt() - t)

    base.ReactorBase.runUntilCurrent = runUntilCurrent

    _init = base.DelayedCall.__init__

    def __init__(self, time_, func, args, kw, cancel, reset, seconds=None):
        name = getattr(func, "__qualname__", repr(func))

        def timed(*a, **k):
            t = _tt()
            try:
                return func(*a, **k)
            finally:
                d = _tt() - t
                if d > 0.0003:
                    _calls[name] += d
                    _count[name] += 1
                    _worst[name] = max(_worst[name], d)

        _init(self, time_, timed, args, kw, cancel, reset, seconds)

    base.DelayedCall.__init__ = __init__

    def _summary(name, xs):
        xs = sorted(xs)
        q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))] * 1000  # noqa: E731
        return (
            f"{name}: n {len(xs)} p50 {q(.5):.2f} p99 {q(.99):.2f} p999 {q(.999):.2f} max {xs[-1] * 1000:.2f} ms;"
            f" >2ms {sum(1 for x in xs if x > .002)} >5ms {sum(1 for x in xs if x > .005)} total {sum(xs):.2f} s\n"
        )

    def _dump():
        while True:
            time.sleep(2)
            try:
                with open(f"{_out}.{os.getpid()}", "w") as f:
                    for name, xs in (("poll", list(_polls)), ("timers", list(_timers))):
                        if xs:
                            f.write(_summary(name, xs))
                    for k, v in _calls.most_common(20):
                        f.write(f"  call {k}: {_count[k]} over 0.3 ms, {v * 1000:.0f} ms in all, largest {_worst[k] * 1000:.2f} ms\n")
            except Exception:
                pass

    threading.Thread(target=_dump, daemon=True, name="turnprobe").start()

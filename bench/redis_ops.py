"""
The cost of the shared limit state: reserve + settle round trips against a
real redis-server on loopback (started here, on a free port).

    python bench/redis_ops.py [--n 5000] [--concurrency 1,16]

For each concurrency (requests admitted at once) it prints the mean wall
time per operation (a reserve or a settle) and, at concurrency 1, the
latency percentiles of one reserve+settle pair; then redis-server's own
time per script call (INFO commandstats), the part that is not the client
or the loopback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet import defer, reactor, task  # noqa: E402

from llmgate.policy.keys import KeyRecord, Limits  # noqa: E402
from llmgate.policy.limits import Quotas  # noqa: E402
from llmgate.policy.redis import RedisState  # noqa: E402
from llmgate.policy.resp import RedisClient  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402


@defer.inlineCallbacks
def run(args: argparse.Namespace, server: RedisServer) -> defer.Deferred[None]:
    state = RedisState(reactor, RedisClient(reactor, "127.0.0.1", server.port, timeout=1.0))
    state.startService()
    while not state.client.connected:
        yield task.deferLater(reactor, 0.01, lambda: None)
    q = Quotas(reactor, state)
    q.load_spend({})
    key = KeyRecord("bench", b"x" * 32, limits=Limits(rpm=10**9, tpm=10**12, concurrency=10**6),
                    budget_usd=10.0**9, period="day")
    counter = iter(range(10**9))

    @defer.inlineCallbacks
    def one(samples: list[float] | None) -> defer.Deferred[None]:
        t = time.perf_counter()
        v = yield q.admit(key, "m", "openai", 100, 0.001)
        assert v.reservation is not None, v.message
        rid = str(next(counter))
        q.hold(rid, v.reservation)
        q.settle(SimpleNamespace(request_id=rid, input_tokens=50, output_tokens=10, cost_usd=0.0005))
        yield defer.DeferredList(list(state._inflight))
        if samples is not None:
            samples.append(time.perf_counter() - t)

    for _ in range(200):  # warm up (script load, connection)
        yield one(None)
    for conc in args.concurrency:
        samples: list[float] = []
        per = args.n // conc
        start = time.perf_counter()

        @defer.inlineCallbacks
        def lane() -> defer.Deferred[None]:
            for _ in range(per):
                yield one(samples if conc == 1 else None)

        yield defer.gatherResults([lane() for _ in range(conc)])
        wall = time.perf_counter() - start
        ops = per * conc * 2
        line = f"concurrency {conc:3d}: {per * conc} reserve+settle pairs, {wall / ops * 1e6:.1f} us per operation"
        if samples:
            samples.sort()
            pct = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))] * 1e6  # noqa: E731
            line += f"; pair latency p50 {pct(0.5):.0f} us, p99 {pct(0.99):.0f} us"
        print(line, flush=True)
    stats = yield state.client.call("INFO", "commandstats")
    for line in stats.decode().splitlines():
        if line.startswith(("cmdstat_evalsha", "cmdstat_eval:")):
            print("redis-server side:", line, flush=True)
    yield state.stopService()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--concurrency", default="1,16", type=lambda s: [int(x) for x in s.split(",")])
    args = p.parse_args()
    server = RedisServer()
    server.start()
    result: list[object] = []

    def go() -> None:
        d = run(args, server)
        d.addErrback(result.append)
        d.addBoth(lambda _: reactor.stop())

    try:
        reactor.callWhenRunning(go)
        reactor.run()
    finally:
        server.stop()
    if result:
        print(result[0])
        sys.exit(1)


if __name__ == "__main__":
    main()

"""
Tests for L{llmgate.policy.redis} against a real C{redis-server}: limits
and budgets shared by several workers, leases that free a dead worker's
slots, spend rebuilt from the ledger, and the C{on_error} policies while
the server is killed, stopped and restarted.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from llmgate.policy.keys import KeyRecord, Limits
from llmgate.policy.limits import Quotas
from llmgate.policy.redis import RedisState, SharedReservation, from_config, parse_url
from llmgate.policy.resp import RedisClient
from tests.redisserver import RedisServer

T0 = 1893542400.0  # 2030-01-02T00:00Z


class WallAt:
    """A clock whose seconds() is C{T0} plus what the test advanced (callLater: the reactor)."""

    def __init__(self) -> None:
        self.offset = T0 - time.time()

    def seconds(self) -> float:
        return time.time() + self.offset

    def callLater(self, *a: Any, **kw: Any) -> Any:
        return reactor.callLater(*a, **kw)


def record(rid: str, tin: int | None, tout: int | None, cost: float | None) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, input_tokens=tin, output_tokens=tout, cost_usd=cost)


class RedisStateTests(TestCase):
    timeout = 60

    def setUp(self) -> Any:
        self.server = RedisServer()
        self.server.start()
        self.addCleanup(self.server.stop)
        self.clock = WallAt()

    @defer.inlineCallbacks
    def worker(self, on_error: str = "fail_closed", lease: float = 10.0, timeout: float = 0.2) -> Any:
        """A started RedisState (one gateway worker) and its Quotas, connected."""
        client = RedisClient(reactor, "127.0.0.1", self.server.port, timeout=timeout)
        state = RedisState(self.clock, client, on_error=on_error, lease=lease)
        state.startService()
        self.addCleanup(state.stopService)
        yield self.until(lambda: client.connected)
        q = Quotas(self.clock, state)
        q.load_spend({})
        return q

    @defer.inlineCallbacks
    def until(self, cond: Any, limit: float = 10.0) -> Any:
        end = time.monotonic() + limit
        while not cond():
            if time.monotonic() > end:
                self.fail("condition not reached")
            yield task.deferLater(reactor, 0.02, lambda: None)

    def test_parse_url(self) -> None:
        """redis://[:password@]host[:port][/db]; other schemes and bad databases are refused."""
        self.assertEqual(parse_url("redis://127.0.0.1:6380/2"), ("127.0.0.1", 6380, 2, None))
        self.assertEqual(parse_url("redis://:pw@h"), ("h", 6379, 0, "pw"))
        for bad in ("rediss://h", "http://h", "redis://h/x", "redis:///0"):
            self.assertRaises(ValueError, parse_url, bad)

    @defer.inlineCallbacks
    def test_rpm_and_concurrency_shared_by_two_workers(self) -> None:
        """Two workers share one rpm bucket and one concurrency count: the limit holds across them, not per worker."""
        a = yield self.worker()
        b = yield self.worker()
        key = KeyRecord("k", b"x" * 32, limits=Limits(rpm=3, concurrency=2))
        v1 = yield a.admit(key, "m", "openai", 10, None)
        v2 = yield b.admit(key, "m", "openai", 10, None)
        self.assertIsInstance(v1.reservation, SharedReservation)
        self.assertEqual(v2.headers[b"x-ratelimit-remaining-requests"], b"1")
        v3 = yield a.admit(key, "m", "openai", 10, None)
        self.assertEqual((v3.status, v3.code), (429, "rate_limit_exceeded"))
        self.assertIn("concurrent requests for this key (limit 2)", v3.message)
        a.hold("r1", v1.reservation)
        a.settle(record("r1", 5, 5, None))
        yield self.until(lambda: not a.state._inflight)
        v4 = yield b.admit(key, "m", "openai", 10, None)
        self.assertIsNotNone(v4.reservation)
        b.hold("r4", v4.reservation)
        b.settle(record("r4", 5, 5, None))
        yield self.until(lambda: not b.state._inflight)
        v5 = yield a.admit(key, "m", "openai", 10, None)
        self.assertEqual(v5.status, 429)
        self.assertIn("requests per minute", v5.message)
        self.assertEqual(v5.headers[b"retry-after"], b"20")

    @defer.inlineCallbacks
    def test_tpm_refund_and_budget(self) -> None:
        """Tokens reserved are replaced by those used; spend settles into the budget both workers read, 429 not retried once spent."""
        a = yield self.worker()
        b = yield self.worker()
        key = KeyRecord("k", b"x" * 32, limits=Limits(tpm=1000), budget_usd=1.0, period="day")
        v = yield a.admit(key, "m", "openai", 900, 0.6)
        self.assertIsNotNone(v.reservation)
        w = yield b.admit(key, "m", "openai", 200, 0.1)
        self.assertEqual((w.status, w.code), (429, "rate_limit_exceeded"))
        x = yield b.admit(key, "m", "openai", 50, 0.5)
        self.assertEqual((x.status, x.code), (429, "insufficient_quota"))  # 0.6 reserved + 0.5 > 1
        self.assertEqual(x.headers[b"x-should-retry"], b"false")
        a.hold("r", v.reservation)
        a.settle(record("r", 100, 0, 0.3))
        yield self.until(lambda: not a.state._inflight)
        y = yield b.admit(key, "m", "openai", 200, 0.5)  # 800 tokens back; 0.3 spent
        self.assertIsNotNone(y.reservation)
        z = yield b.admit(key, "m", "openai", 10, 0.25)
        self.assertEqual(z.code, "insufficient_quota")
        day = self.server.command("GET", f"llmgate:s:k:day:{int(T0)}")
        self.assertIn(b"0.3", day)
        ttl = int(self.server.command("TTL", f"llmgate:s:k:day:{int(T0)}")[1:-2])
        self.assertTrue(86400 < ttl <= 2 * 86400, ttl)
        self.assertEqual(self.server.command("TTL", "llmgate:s:k:total:0"), b":-1\r\n")

    @defer.inlineCallbacks
    def test_hedge_loser_charged_to_shared_budget(self) -> None:
        """A hedge loser's cost (no reservation) goes into the shared spend: the other worker refuses past the budget."""
        a = yield self.worker()
        b = yield self.worker()
        key = KeyRecord("k", b"x" * 32, budget_usd=1.0, period="day")
        a.charge(SimpleNamespace(key_name="k", cost_usd=0.7))
        yield self.until(lambda: not a.state._inflight)
        self.assertIn(b"0.7", self.server.command("GET", f"llmgate:s:k:day:{int(T0)}"))
        v = yield b.admit(key, "m", "openai", 10, 0.4)
        self.assertEqual(v.code, "insufficient_quota")

    @defer.inlineCallbacks
    def test_spend_view_is_every_workers(self) -> None:
        """
        A worker's view of a key's spend (its budget gauge, the cut-off)
        is every worker's: raised to Redis's after each of its own
        settles, and by refresh_spend between them; on_spend reports the
        budget left by that view.
        """
        a = yield self.worker()
        b = yield self.worker()
        left: list[tuple[str, float]] = []
        b.on_spend = lambda key, remaining: left.append((key, round(remaining, 9)))
        key = KeyRecord("k", b"x" * 32, budget_usd=1.0, period="month")
        v = yield a.admit(key, "m", "openai", 10, 0.4)
        a.hold("r1", v.reservation)
        a.settle(record("r1", 5, 5, 0.3))
        yield self.until(lambda: not a.state._inflight)
        w = yield b.admit(key, "m", "openai", 10, 0.4)
        b.hold("r2", w.reservation)
        b.settle(record("r2", 5, 5, 0.2))
        yield self.until(lambda: not b.state._inflight)
        now = self.clock.seconds()
        self.assertAlmostEqual(b.spent("k", "month", now), 0.5)
        self.assertAlmostEqual(b.spent("k", "total", now), 0.5)
        # First by its own settle, then once Redis answered.
        self.assertEqual(left, [("k", 0.8), ("k", 0.5)])
        self.assertAlmostEqual(a.spent("k", "month", now), 0.3)
        yield a.state.refresh_spend(["k", "unknown"])
        self.assertAlmostEqual(a.spent("k", "month", now), 0.5)
        self.assertEqual(a.spent("unknown", "month", now), 0.0)

    @defer.inlineCallbacks
    def test_dead_worker_slots_expire(self) -> None:
        """A worker that dies holding a concurrency slot and reserved spend frees both when its lease expires."""
        a = yield self.worker(lease=0.5)
        b = yield self.worker(lease=0.5)
        key = KeyRecord("k", b"x" * 32, limits=Limits(concurrency=1), budget_usd=1.0, period="total")
        v = yield a.admit(key, "m", "openai", 10, 0.9)
        self.assertIsNotNone(v.reservation)
        # a dies: no settle, no more lease renewals.
        a.state._renew.stop_timer()
        a.state.client.stop()
        refused = yield b.admit(key, "m", "openai", 10, 0.9)
        self.assertEqual(refused.status, 429)
        yield task.deferLater(reactor, 0.7, lambda: None)
        ok = yield b.admit(key, "m", "openai", 10, 0.9)
        self.assertIsNotNone(ok.reservation)

    @defer.inlineCallbacks
    def test_lost_settle_healed_on_reconnect(self) -> None:
        """
        A settle lost with its connection does not hold the slot and the
        reserved cost while the worker lives: on reconnecting (and at every
        lease refresh) the worker writes its true counts over its fields.
        """
        q = yield self.worker()
        key = KeyRecord("k", b"x" * 32, limits=Limits(concurrency=1), budget_usd=1.0, period="total")
        v = yield q.admit(key, "m", "openai", 10, 0.9)
        q.hold("r", v.reservation)
        self.assertEqual(self.server.command("HGET", "llmgate:c:k", q.state.worker), b"$1\r\n1\r\n")
        q.state.client.proto.transport.abortConnection()
        yield self.until(lambda: not q.state.client.connected)
        q.settle(record("r", 1, 1, 0.01))  # lost: no connection
        self.assertEqual(self.server.command("HGET", "llmgate:c:k", q.state.worker), b"$1\r\n1\r\n")
        yield self.until(lambda: q.state.client.connected)
        yield self.until(lambda: self.server.command("HEXISTS", "llmgate:c:k", q.state.worker) == b":0\r\n")
        self.assertEqual(self.server.command("HEXISTS", "llmgate:r:k", q.state.worker), b":0\r\n")
        ok = yield q.admit(key, "m", "openai", 10, 0.05)
        self.assertIsNotNone(ok.reservation)
        q.state._refresh()  # an in-flight reservation is written as it is
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.server.command("HGET", "llmgate:c:k", q.state.worker), b"$1\r\n1\r\n")
        self.assertEqual(self.server.command("HGET", "llmgate:r:k", q.state.worker), b"$4\r\n0.05\r\n")

    @defer.inlineCallbacks
    def test_spend_rebuilt_from_ledger_only_when_missing(self) -> None:
        """The ledger's sums are set where Redis has no spend for the period, and never over a running count."""
        self.server.command("SET", f"llmgate:s:k:day:{int(T0)}", "0.25")
        q = yield self.worker()
        q.state.load_spend(self.clock.seconds(), {"k": {"day": 0.9, "month": 0.95, "total": 2.0}})
        yield self.until(lambda: self.server.command("EXISTS", "llmgate:s:k:total:0") == b":1\r\n")
        self.assertEqual(self.server.command("GET", f"llmgate:s:k:day:{int(T0)}"), b"$4\r\n0.25\r\n")
        key = KeyRecord("k", b"x" * 32, budget_usd=1.0, period="month")
        v = yield q.admit(key, "m", "openai", 10, 0.1)
        self.assertEqual(v.code, "insufficient_quota")  # month: 0.95 from the ledger + 0.1

    @defer.inlineCallbacks
    def test_spend_reloaded_after_redis_restart(self) -> None:
        """
        Redis restarted empty: on reconnecting the ledger is summed again
        (as it is now) and set where missing; until it is in, budgeted
        requests follow the policy (503 here) while others go through.
        """
        q = yield self.worker()
        q.state.load_spend(self.clock.seconds(), {"k": {"day": 0.5, "month": 0.5, "total": 0.5}})
        ledger_now: defer.Deferred[Any] = defer.Deferred()
        q.state.reload_spend = lambda: ledger_now
        key = KeyRecord("k", b"x" * 32, budget_usd=1.0, period="day")
        free = KeyRecord("f", b"x" * 32, limits=Limits(rpm=10))
        self.server.kill()
        self.server.start()
        yield self.until(lambda: q.state.client.connects >= 2)
        v = yield q.admit(key, "m", "openai", 10, 0.1)
        self.assertEqual(v.status, 503)
        w = yield q.admit(free, "m", "openai", 10, None)
        self.assertIsNotNone(w.reservation)
        ledger_now.callback({"k": {"day": 0.95, "month": 0.95, "total": 0.95}})
        yield self.until(lambda: q.state._synced)
        self.assertEqual(self.server.command("GET", f"llmgate:s:k:day:{int(T0)}"), b"$4\r\n0.95\r\n")
        v = yield q.admit(key, "m", "openai", 10, 0.1)
        self.assertEqual(v.code, "insufficient_quota")
        v = yield q.admit(key, "m", "openai", 10, 0.04)
        self.assertIsNotNone(v.reservation)

    @defer.inlineCallbacks
    def test_noscript_falls_back_to_eval(self) -> None:
        """After SCRIPT FLUSH (or a restart) EVALSHA answers NOSCRIPT and the reserve goes through EVAL."""
        q = yield self.worker()
        self.server.command("SCRIPT", "FLUSH")
        v = yield q.admit(KeyRecord("k", b"x" * 32, limits=Limits(rpm=5)), "m", "openai", 1, None)
        self.assertIsNotNone(v.reservation)

    @defer.inlineCallbacks
    def test_fail_closed_while_down_then_recovers(self) -> None:
        """fail_closed: Redis killed, admission answers 503 with retry-after at once; after a restart it admits on Redis again."""
        q = yield self.worker("fail_closed")
        key = KeyRecord("k", b"x" * 32, limits=Limits(rpm=100))
        self.server.kill()
        yield self.until(lambda: not q.state.client.connected)
        started = time.monotonic()
        v = yield q.admit(key, "m", "openai", 1, None)
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual(v.status, 503)
        self.assertEqual(v.headers[b"retry-after"], b"1")
        self.assertGreaterEqual(q.state.errors, 1)
        self.server.start()
        yield self.until(lambda: q.state.client.connected)
        v = yield q.admit(key, "m", "openai", 1, None)
        self.assertIsInstance(v.reservation, SharedReservation)

    @defer.inlineCallbacks
    def test_fail_open_admits_on_local_limits(self) -> None:
        """fail_open: Redis killed, requests are admitted on this process's limits (still enforced), counted, and settled locally."""
        q = yield self.worker("fail_open")
        key = KeyRecord("k", b"x" * 32, limits=Limits(rpm=2))
        self.server.kill()
        yield self.until(lambda: not q.state.client.connected)
        v1 = yield q.admit(key, "m", "openai", 1, None)
        v2 = yield q.admit(key, "m", "openai", 1, None)
        v3 = yield q.admit(key, "m", "openai", 1, None)
        self.assertIsNotNone(v1.reservation)
        self.assertNotIsInstance(v1.reservation, SharedReservation)
        self.assertIsNotNone(v2.reservation)
        self.assertEqual(v3.status, 429)
        self.assertEqual(q.state.errors, 3)
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        q.state.count_in(registry)
        yield q.admit(key, "m", "openai", 1, None)
        self.assertEqual(registry.get_sample_value("llmgate_state_errors_total", {"policy": "fail_open"}), 1)
        self.assertEqual(q.state.errors, 4)
        q.hold("r", v1.reservation)
        q.settle(record("r", 1, 1, None))  # local: no call to the dead server
        self.assertEqual(q.state.errors, 4)

    @defer.inlineCallbacks
    def test_slow_redis_times_out(self) -> None:
        """A Redis that stops answering (SIGSTOP) costs each call its timeout, never a hang: fail_closed answers 503."""
        q = yield self.worker("fail_closed", timeout=0.1)
        key = KeyRecord("k", b"x" * 32, limits=Limits(rpm=100))
        self.server.pause()
        try:
            started = time.monotonic()
            v = yield q.admit(key, "m", "openai", 1, None)
            took = time.monotonic() - started
        finally:
            self.server.resume()
        self.assertEqual(v.status, 503)
        self.assertTrue(0.09 <= took < 0.5, took)

    def test_failures_logged_at_most_every_ten_seconds(self) -> None:
        """Each failed call is counted; the log says so at most once per 10 s (a dead Redis does not flood it)."""
        from twisted.internet.task import Clock
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        clock.advance(T0)
        state = RedisState(clock, RedisClient(clock, "127.0.0.1", 1), on_error="fail_open")
        q = Quotas(clock, state)
        q.load_spend({})
        key = KeyRecord("k", b"x" * 32, limits=Limits(rpm=1000))
        for _ in range(5):
            self.assertIsNotNone(self.successResultOf(q.admit(key, "m", "openai", 1, None)).reservation)
        clock.advance(10)
        self.successResultOf(q.admit(key, "m", "openai", 1, None))
        logged = [e for e in events if "redis {what} failed" in e.get("log_format", "")]
        self.assertEqual(state.errors, 6)
        self.assertEqual([e["n"] for e in logged], [1, 6])

    @defer.inlineCallbacks
    def test_no_cyclic_garbage(self) -> None:
        """Reserves and settles through Redis (admitted and refused) leave no cyclic garbage."""
        import gc
        from collections import Counter

        q = yield self.worker()
        key = KeyRecord("k", b"x" * 32, limits=Limits(rpm=10**6, concurrency=1), budget_usd=100.0, period="day")

        def one(i: int) -> Any:
            d = q.admit(key, "m", "openai", 10, 0.01)

            def got(v: Any) -> Any:
                if v.reservation is not None:
                    q.hold(str(i), v.reservation)
                    return q.admit(key, "m", "openai", 10, 0.01).addCallback(  # refused: concurrency
                        lambda _: q.settle(record(str(i), 1, 1, 0.001)))
                return None

            return d.addCallback(got)

        for i in range(5):
            yield one(i)
        yield self.until(lambda: not q.state._inflight)
        gc.collect()
        gc.disable()
        try:
            for i in range(5, 25):
                yield one(i)
            yield self.until(lambda: not q.state._inflight)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            found = Counter(type(o).__qualname__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
            gc.enable()
        self.assertEqual(found, Counter())

    @defer.inlineCallbacks
    def test_status_page_spend(self) -> None:
        """The status page's spend per key reads this process's view from a RedisState: the ledger's at start plus what it settled."""
        from llmgate.ops.status import key_spend

        q = yield self.worker()
        q.load_spend({"k": {"day": 0.5, "month": 0.5, "total": 0.5}})
        key = KeyRecord("k", b"x" * 32, budget_usd=2.0, period="month")
        yield self.until(lambda: q.state._synced)
        v = yield q.admit(key, "m", "openai", 10, 0.2)
        q.hold("r", v.reservation)
        q.settle(record("r", 1, 1, 0.25))
        self.assertEqual(key_spend(q, [key], self.clock.seconds()), [("k", 0.75, 2.0, "month", 0.75)])

    def test_from_config(self) -> None:
        """The config's URL, timeout and policy reach the client and the state."""
        s = from_config(reactor, "redis://127.0.0.1:7/3", 0.07, "fail_open")
        self.assertEqual((s.client.port, s.client.db, s.client.timeout, s.on_error), (7, 3, 0.07, "fail_open"))

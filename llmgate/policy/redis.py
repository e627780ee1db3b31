# -*- test-case-name: tests.policy.test_redis -*-
"""
Limit and spend state shared through Redis (C{[state] redis_url}), so
limits and budgets hold across workers and machines.

Every reserve and every settle is one Lua script (EVALSHA, or EVAL when
the server answers NOSCRIPT), so it is atomic across all the gateways
sharing the server, with the same arithmetic as
L{MemoryState <llmgate.policy.limits.MemoryState>}:

  - C{<p>b:<scope>}: a hash with the requests and tokens buckets of a key
    (or key-model pair): level, last refill and capacity.  It expires two
    minutes after its last use (a missing bucket is a full one).
  - C{<p>c:<scope>}: concurrent requests, one field per worker.  Each
    worker holds a lease C{<p>w:<worker>} (refreshed every third of
    L{LEASE}); a reserve counts only the fields of live workers and drops
    the others, so the slots of a killed worker free themselves.
  - C{<p>r:<key>}: the cost reserved by requests in flight, per worker,
    with the same leases: a dead worker's reservations expire with it.
    A live worker writes its own true values over its fields at every
    lease refresh and reconnection, so a settle lost with a connection
    does not hold a slot for as long as the worker lives.
  - C{<p>s:<key>:<period>:<start>}: settled spend per budget period, with a
    TTL past the period's end (none for C{total}).  At start, and after
    every reconnection (Redis may have restarted empty), a period's spend
    missing in Redis is set from the ledger's sum (C{SET NX}); until that
    is done, requests of keys with a budget follow the C{on_error} policy.

The scripts read keys beyond their declared C{KEYS} (the other workers'
leases), so the server must be a single Redis (or a primary), not a
Redis Cluster.

When Redis is down or slow (each call has a deadline, C{[state] timeout})
the C{on_error} policy decides: C{fail_closed} (the default: a budget is a
promise about money, and admitting on per-process state lets N gateways
spend N budgets) refuses with 503 and C{retry-after}; C{fail_open} admits
on this process's own limits (L{MemoryState}), logs (once per
L{LOG_EVERY} seconds) and counts each failure (L{errors}).
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any, Optional
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from prometheus_client import Counter

from llmgate.ops.periodic import Periodic
from llmgate.policy.keys import PERIODS, Limits, period_start
from llmgate.policy.limits import Bucket, MemoryState, Refusal, Reservation, Scope
from llmgate.policy.resp import RedisClient, RedisError

_log = Logger(namespace="llmgate.policy.redis")

LEASE = 10.0
LOG_EVERY = 10.0
PREFIX = "llmgate:"
# Past the period's end, a period's spend key lives this long (then expires).
_SPEND_TTL = {"day": 2 * 86400, "month": 33 * 86400}

# ARGV: now, worker, lease, prefix, tokens, cost, budget period ('' for none),
# budget limit, n, then rpm, tpm, concurrency per scope (-1: none).
# KEYS: bucket and concurrency hash per scope, reserved hash, spend key.
RESERVE = r"""
local now = tonumber(ARGV[1])
local worker, lease, prefix = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local tokens, cost = tonumber(ARGV[5]), tonumber(ARGV[6])
local period, limit, n = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
redis.call('SET', prefix .. 'w:' .. worker, '1', 'PX', math.floor(lease * 1000))
local function live(h)
  local t = redis.call('HGETALL', h)
  local sum = 0
  for j = 1, #t, 2 do
    if t[j] == worker or redis.call('EXISTS', prefix .. 'w:' .. t[j]) == 1 then
      sum = sum + tonumber(t[j + 1])
    else
      redis.call('HDEL', h, t[j])
    end
  end
  return sum
end
local function refill(b, name, cap)
  if cap < 0 then return nil end
  local v = redis.call('HMGET', b, name .. 'l', name .. 't', name .. 'c')
  local lvl, last, old = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  if lvl == nil then return cap end
  if old ~= nil and old ~= cap then lvl = lvl + cap - old end
  if now > last then lvl = math.min(cap, lvl + (now - last) * cap / 60) end
  return lvl
end
local function wait(lvl, cap, amount)
  local need = math.min(amount, cap)
  if lvl >= need then return 0 end
  return (need - lvl) * 60 / cap
end
local st = {}
for i = 1, n do
  local rpm, tpm, conc = tonumber(ARGV[7 + 3 * i]), tonumber(ARGV[8 + 3 * i]), tonumber(ARGV[9 + 3 * i])
  st[i] = {rpm = rpm, tpm = tpm, conc = conc, r = refill(KEYS[2 * i - 1], 'r', rpm), t = refill(KEYS[2 * i - 1], 't', tpm)}
end
local function levels(verdict, a, b)
  local out = {verdict, tostring(a), b}
  for i = 1, n do
    out[#out + 1] = st[i].r and tostring(st[i].r) or ''
    out[#out + 1] = st[i].t and tostring(st[i].t) or ''
  end
  return out
end
for i = 1, n do
  if st[i].conc >= 0 and live(KEYS[2 * i]) >= st[i].conc then return levels('concurrency', 1, tostring(st[i].conc)) end
end
for i = 1, n do
  if st[i].r and wait(st[i].r, st[i].rpm, 1) > 0 then return levels('requests', wait(st[i].r, st[i].rpm, 1), tostring(st[i].rpm)) end
end
for i = 1, n do
  if st[i].t and wait(st[i].t, st[i].tpm, tokens) > 0 then return levels('tokens', wait(st[i].t, st[i].tpm, tokens), tostring(st[i].tpm)) end
end
local rkey = KEYS[2 * n + 1]
if period ~= '' then
  local spent = tonumber(redis.call('GET', KEYS[2 * n + 2]) or '0')
  if spent + live(rkey) + cost > limit then return levels('budget', 0, '') end
end
for i = 1, n do
  local b = KEYS[2 * i - 1]
  if st[i].r then st[i].r = st[i].r - 1; redis.call('HSET', b, 'rl', tostring(st[i].r), 'rt', tostring(now), 'rc', st[i].rpm) end
  if st[i].t then st[i].t = st[i].t - tokens; redis.call('HSET', b, 'tl', tostring(st[i].t), 'tt', tostring(now), 'tc', st[i].tpm) end
  if st[i].r or st[i].t then redis.call('PEXPIRE', b, 120000) end
  if st[i].conc >= 0 then redis.call('HINCRBY', KEYS[2 * i], worker, 1) end
end
if cost > 0 then redis.call('HINCRBYFLOAT', rkey, worker, tostring(cost)) end
return levels('ok', 0, '')
"""

# ARGV: now, worker, estimated tokens, used tokens, reserved cost, cost,
# day ttl, month ttl, n, then 1/0 per scope (it holds a concurrency slot).
# KEYS: bucket and concurrency hash per scope, reserved hash, spend day,
# month and total.  Returns the key's spend in each period after it
# (every worker's; '' where Redis has none).
SETTLE = r"""
local now, worker = tonumber(ARGV[1]), ARGV[2]
local est, used, held, cost = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local n = tonumber(ARGV[9])
for i = 1, n do
  local b, c = KEYS[2 * i - 1], KEYS[2 * i]
  if ARGV[9 + i] == '1' and redis.call('HINCRBY', c, worker, -1) <= 0 then redis.call('HDEL', c, worker) end
  local v = redis.call('HMGET', b, 'tl', 'tt', 'tc')
  local lvl, last, cap = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  if lvl ~= nil then
    if now > last then lvl = math.min(cap, lvl + (now - last) * cap / 60); last = now end
    lvl = math.min(cap, lvl + est - used)
    redis.call('HSET', b, 'tl', tostring(lvl), 'tt', tostring(last))
  end
end
local rkey = KEYS[2 * n + 1]
if held > 0 then
  local left = tonumber(redis.call('HINCRBYFLOAT', rkey, worker, tostring(-held)))
  if left <= 1e-9 then redis.call('HDEL', rkey, worker) end
end
if cost > 0 then
  local ttls = {tonumber(ARGV[7]), tonumber(ARGV[8]), -1}
  for j = 1, 3 do
    local k = KEYS[2 * n + 1 + j]
    redis.call('INCRBYFLOAT', k, tostring(cost))
    if ttls[j] > 0 then redis.call('EXPIRE', k, ttls[j]) end
  end
end
local spent = {}
for j = 1, 3 do spent[j] = redis.call('GET', KEYS[2 * n + 1 + j]) or '' end
return spent
"""


def parse_url(url: str) -> tuple[str, int, int, Optional[str]]:
    """C{redis://[:password@]host[:port][/db]} as (host, port, db, password); ValueError if not."""
    u = urlsplit(url)
    if u.scheme != "redis":
        raise ValueError("must start with redis:// (TLS and unix sockets are not supported)")
    if not u.hostname:
        raise ValueError("names no host")
    try:
        port = u.port or 6379
    except ValueError:
        raise ValueError("has a bad port") from None
    path = u.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("database must be a number (redis://host:6379/0)")
    if u.query or u.fragment:
        raise ValueError("takes no query or fragment")
    return u.hostname, port, int(path or 0), u.password


class SharedReservation(Reservation):
    """A reservation held in Redis (settled there, with the worker that made it)."""

    __slots__ = ("concurrent",)

    def __init__(self, scopes: tuple[str, ...], tokens: int, key: str, cost: float, concurrent: tuple[bool, ...]) -> None:
        super().__init__(scopes, tokens, key, cost)
        self.concurrent = concurrent


class Script:
    """A Lua script run by EVALSHA, loaded again (by EVAL) after NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def run(self, client: RedisClient, keys: list[str], args: list[Any]) -> defer.Deferred[Any]:
        d = client.call("EVALSHA", self.sha, len(keys), *keys, *args)

        def noscript(f: Any) -> Any:
            if f.check(RedisError) and str(f.value).startswith("NOSCRIPT"):
                return client.call("EVAL", self.source, len(keys), *keys, *args)
            return f

        d.addErrback(noscript)
        return d


class RedisState(Service):
    """
    L{MemoryState}'s operations on Redis.  C{reserve} returns a Deferred
    (of the same pair); C{settle} and C{load_spend} send and forget
    (logging failures).  A Service: it connects when started.

    @param local: the per-process state used by C{fail_open}.
    """

    def __init__(self, clock: Any, client: RedisClient, on_error: str = "fail_closed",
                 worker: Optional[str] = None, prefix: str = PREFIX, local: Optional[MemoryState] = None,
                 lease: float = LEASE) -> None:
        self.clock = clock
        self.client = client
        self.on_error = on_error
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.prefix = prefix
        self.local = local if local is not None else MemoryState()
        self.lease = lease
        # Failed calls to Redis (reserve, settle, spend loads), for the metrics.
        self.errors = 0
        self._last_log: Optional[float] = None
        self._seen: dict[str, Scope] = {}
        self._inflight: set[defer.Deferred[Any]] = set()
        self._counter: Any = None
        self._starts: dict[str, tuple[int, int]] = {}
        # What this worker holds (sent reserves included): its own fields'
        # values, written over them at every lease refresh.
        self._held_conc: dict[str, int] = {}
        self._held_cost: dict[str, float] = {}
        # Whether Redis holds the ledger's spend (set where it was missing)
        # on this connection: until then budgets go by the on_error policy.
        self._synced = False
        self._syncing = False
        # Returns (a Deferred of) the ledger's spend now: read again after a
        # reconnection, in case Redis restarted empty.
        self.reload_spend: Optional[Any] = None
        self._totals: Optional[dict[str, dict[str, float]]] = None
        self._reserve = Script(RESERVE)
        self._settle = Script(SETTLE)
        # Composed, not a child: stopService waits on the settles first.
        self._renew = Periodic(clock, lease / 3, self._refresh)
        client.on_connect = self._connected

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.client.start()
        self._renew.start_timer()

    def stopService(self) -> defer.Deferred[None]:
        """Stop once the settles in flight are answered (each has a deadline)."""
        super().stopService()
        self._renew.stop_timer()
        d = defer.DeferredList(list(self._inflight), consumeErrors=True)
        d.addBoth(lambda _: self.client.stop())
        return d

    def count_in(self, registry: Any) -> None:
        """
        Count failures in C{llmgate_state_errors_total{policy}} of
        C{registry}: a plain Counter, so under C{--workers} (prometheus
        multiprocess mode) the supervisor sums the workers'.
        """
        self._counter = Counter(
            "llmgate_state_errors",
            "Calls to the shared limit state (Redis) that failed or timed out; "
            "a reserve among them was admitted on local limits (fail_open) or answered 503 (fail_closed).",
            ["policy"], registry=registry,
        ).labels(self.on_error)

    def _connected(self) -> None:
        # A new connection may be to a server that lost everything
        # (restarted without persistence): the spend is set again where
        # missing, from the ledger as it is now when it can be read.
        self._synced = False
        self._refresh()

    def _sync_spend(self) -> None:
        """Put the ledger's spend where Redis has none; budgets go through Redis once done."""
        if self._syncing or self._totals is None or not self.client.connected:
            return
        self._syncing = True
        d: defer.Deferred[Any]
        if self.reload_spend is not None and self.client.connects > 1:
            d = defer.maybeDeferred(self.reload_spend)
            d.addCallback(self._remember)
        else:
            d = defer.succeed(self._totals)
        d.addCallback(self._store_spend)

        def done(ok: Any) -> None:
            self._syncing = False
            self._synced = ok is True

        d.addErrback(lambda f: self._failed(f, "spend load"))
        d.addBoth(done)

    def _remember(self, totals: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        self._totals = totals
        return totals

    def _refresh(self) -> None:
        if not self._synced:
            self._sync_spend()
        if self.client.connected:
            d = self.client.call("SET", f"{self.prefix}w:{self.worker}", "1", "PX", int(self.lease * 1000))
            d.addErrback(self._failed, "lease refresh")
            self._restate()

    def _restate(self) -> None:
        """
        Write this worker's own truth over its fields: the concurrent
        requests it holds per scope and the cost it has reserved per key.
        A settle lost on the way (connection dropped before Redis read it)
        would otherwise hold a slot for as long as the worker lives.
        """
        for table, held, cmd in (("c", self._held_conc, "HSET"), ("r", self._held_cost, "HSET")):
            for name, n in list(held.items()):
                h = f"{self.prefix}{table}:{name}"
                if (n if table == "c" else abs(n) > 1e-9):
                    call = self.client.call(cmd, h, self.worker, n if table == "c" else repr(n))
                else:
                    call = self.client.call("HDEL", h, self.worker)
                    del held[name]
                call.addErrback(self._failed, "restate")

    def _claim(self, scopes: list[tuple[str, Limits]], key: str, cost: float, sign: int) -> None:
        """Count (or uncount) a reservation in this worker's own truth (L{_restate})."""
        for sid, limits in scopes:
            if limits.concurrency is not None:
                self._held_conc[sid] = self._held_conc.get(sid, 0) + sign
        if cost > 0:
            self._held_cost[key] = self._held_cost.get(key, 0.0) + sign * cost

    def _failed(self, f: Any, what: str) -> None:
        self.errors += 1
        if self._counter is not None:
            self._counter.inc()
        now = self.clock.seconds()
        if self._last_log is None or now - self._last_log >= LOG_EVERY:
            self._last_log = now
            _log.warn("redis {what} failed ({why}); policy {policy} ({n} failures so far)",
                      what=what, why=f.getErrorMessage(), policy=self.on_error, n=self.errors)

    # -- MemoryState's operations ----------------------------------------------

    def _spend_key(self, key: str, period: str, now: float) -> str:
        return f"{self.prefix}s:{key}:{period}:{self._start(period, now)}"

    def _start(self, period: str, now: float) -> int:
        """L{period_start} as an int, computed once per UTC day (it is on every call's path)."""
        day = int(now // 86400)
        got = self._starts.get(period)
        if got is None or got[0] != day:
            got = self._starts[period] = (day, int(period_start(period, now)))
        return got[1]

    def reserve(self, now: float, scopes: list[tuple[str, Limits]], tokens: int, key: str,
                budget: Optional[tuple[str, float]], cost: float) -> defer.Deferred[tuple[Optional[Refusal], Optional[Reservation]]]:
        if budget is not None and not self._synced:
            # Redis may not hold the spend yet (just reconnected): policy.
            return defer.succeed(None).addCallback(
                lambda _: self._reserve_failed(_NotSynced(), now, scopes, tokens, key, budget, cost))
        keys: list[str] = []
        args: list[Any] = [repr(now), self.worker, repr(self.lease), self.prefix, tokens, repr(cost),
                           budget[0] if budget else "", repr(budget[1]) if budget else "0", len(scopes)]
        for sid, limits in scopes:
            keys += [f"{self.prefix}b:{sid}", f"{self.prefix}c:{sid}"]
            args += [_cap(limits.rpm), _cap(limits.tpm), _cap(limits.concurrency)]
        keys.append(f"{self.prefix}r:{key}")
        keys.append(self._spend_key(key, budget[0] if budget else "total", now))
        self._claim(scopes, key, cost, 1)
        d = self._reserve.run(self.client, keys, args)
        d.addCallback(self._reserved, now, scopes, tokens, key, cost)
        d.addErrback(self._unclaim, scopes, key, cost)
        d.addErrback(self._reserve_failed, now, scopes, tokens, key, budget, cost)
        return d

    def _unclaim(self, f: Any, scopes: list[tuple[str, Limits]], key: str, cost: float) -> Any:
        self._claim(scopes, key, cost, -1)
        return f

    def _reserved(self, reply: list[Any], now: float, scopes: list[tuple[str, Limits]], tokens: int, key: str,
                  cost: float) -> tuple[Optional[Refusal], Optional[Reservation]]:
        verdict, a, b = reply[0].decode(), float(reply[1]), reply[2].decode()
        for i, (sid, limits) in enumerate(scopes):
            st = self._seen.get(sid) or Scope()
            for attr, cap, raw in (("requests", limits.rpm, reply[3 + 2 * i]), ("tokens", limits.tpm, reply[4 + 2 * i])):
                if cap is None or not raw:
                    setattr(st, attr, None)
                    continue
                bucket = Bucket(cap, now)
                bucket.level = float(raw)
                setattr(st, attr, bucket)
            self._seen[sid] = st
        if verdict == "ok":
            conc = tuple(limits.concurrency is not None for _, limits in scopes)
            return None, SharedReservation(tuple(sid for sid, _ in scopes), tokens, key, cost, conc)
        self._claim(scopes, key, cost, -1)
        if verdict == "concurrency":
            return Refusal("concurrency", 1.0, f"too many concurrent requests for this key (limit {b})"), None
        if verdict == "requests":
            return Refusal("requests", a, f"rate limit reached: {b} requests per minute"), None
        if verdict == "tokens":
            return Refusal("tokens", a, f"rate limit reached: {b} tokens per minute (this request reserves {tokens})"), None
        return Refusal("budget", None, "the key's budget for this period is spent"), None

    def _reserve_failed(self, f: Any, now: float, scopes: list[tuple[str, Limits]], tokens: int, key: str,
                        budget: Optional[tuple[str, float]], cost: float) -> tuple[Optional[Refusal], Optional[Reservation]]:
        self._failed(f, "reserve")
        if self.on_error == "fail_open":
            return self.local.reserve(now, scopes, tokens, key, budget, cost)
        return Refusal("unavailable", 1.0, "the gateway's limit store is unavailable; retry shortly"), None

    def settle(self, now: float, res: Reservation, tokens: int, cost: float) -> Optional[defer.Deferred[Any]]:
        if not isinstance(res, SharedReservation):
            # Admitted on local limits (fail_open): settled there.
            self.local.settle(now, res, tokens, cost)
            return None
        # The local spend follows, for a fail_open admission later.
        self.local._spend(res.key, now).add(cost)
        for sid, c in zip(res.scopes, res.concurrent):
            if c:
                self._held_conc[sid] = self._held_conc.get(sid, 0) - 1
        if res.cost > 0:
            self._held_cost[res.key] = self._held_cost.get(res.key, 0.0) - res.cost
        keys: list[str] = []
        for sid in res.scopes:
            keys += [f"{self.prefix}b:{sid}", f"{self.prefix}c:{sid}"]
        keys.append(f"{self.prefix}r:{res.key}")
        keys += [self._spend_key(res.key, p, now) for p in PERIODS]
        args: list[Any] = [repr(now), self.worker, res.tokens, tokens, repr(res.cost), repr(cost),
                           _ttl("day", now), _ttl("month", now), len(res.scopes)]
        args += ["1" if c else "0" for c in res.concurrent]
        d = self._settle.run(self.client, keys, args)
        d.addCallback(self._shared_spend, res.key, now)
        d.addErrback(self._failed, "settle")
        self._inflight.add(d)
        d.addBoth(self._done, d)
        return d

    def charge(self, now: float, key: str, cost: float) -> Optional[defer.Deferred[Any]]:
        """Spend held by no reservation (a hedge loser's cost): the settle script with no scopes and nothing held."""
        return self.settle(now, SharedReservation((), 0, key, 0.0, ()), 0, cost)

    def _shared_spend(self, reply: Any, key: str, now: float) -> None:
        """
        Raise this process's view of C{key}'s spend (day, month, total) to
        what Redis holds: every worker's settles, not only this one's.  Only
        up: Redis may lack a period this process knows (lost, not synced yet).
        """
        if not isinstance(reply, list) or len(reply) != len(PERIODS) or not any(reply):
            return
        spend = self.local._spend(key, now)
        for period, raw in zip(PERIODS, reply):
            if raw:
                v = float(raw)
                if v > spend.spent[period]:
                    spend.spent[period] = v

    def refresh_spend(self, keys: list[str]) -> defer.Deferred[Any]:
        """
        Read C{keys}' spend from Redis into this process's view (for checks
        that go by it between this process's own settles: the budget
        cut-off).  Fires when done; a failure is logged, never raised.
        """
        if not keys or not self.client.connected:
            return defer.succeed(None)
        now = self.clock.seconds()
        names = [self._spend_key(k, p, now) for k in keys for p in PERIODS]
        d = self.client.call("MGET", *names)

        def got(reply: Any) -> None:
            if isinstance(reply, list):
                n = len(PERIODS)
                for i, key in enumerate(keys):
                    self._shared_spend(reply[i * n:(i + 1) * n], key, now)

        d.addCallback(got)
        d.addErrback(self._failed, "spend read")
        return d

    def _done(self, result: Any, d: defer.Deferred[Any]) -> Any:
        self._inflight.discard(d)
        return result

    def load_spend(self, now: float, totals: dict[str, dict[str, float]]) -> None:
        """
        The ledger's spend, for periods Redis has none of (lost or never
        written): set only where missing, so a running count is kept.
        """
        self.local.load_spend(now, totals)
        self._totals = totals
        self._synced = False
        self._sync_spend()

    def _store_spend(self, totals: dict[str, dict[str, float]]) -> defer.Deferred[bool]:
        """C{SET NX} every period's spend: fires True once all are answered."""
        now = self.clock.seconds()
        calls = []
        for key, per in totals.items():
            for p, v in per.items():
                if p not in PERIODS or v <= 0:
                    continue
                args: list[Any] = ["SET", self._spend_key(key, p, now), repr(float(v)), "NX"]
                if p in _SPEND_TTL:
                    args += ["EX", _ttl(p, now)]
                calls.append(self.client.call(*args))
        d = defer.gatherResults(calls, consumeErrors=True)
        d.addCallback(lambda _: True)
        return d

    @property
    def spend(self) -> dict[str, Any]:
        """
        This process's view of the spend per key (the ledger's at start plus
        what it settled), for the status page; Redis holds the shared one.
        """
        return self.local.spend

    def quota(self, now: float, sid: str, limits: Limits) -> Optional[Scope]:
        """The levels seen in this scope's last reply (headers only)."""
        st = self._seen.get(sid)
        if st is not None:
            st.refill(now, limits)
        return st


class _NotSynced:
    """Stands for a failure: the spend is not in Redis yet."""

    @staticmethod
    def getErrorMessage() -> str:
        return "the ledger's spend is not in redis yet (just connected)"


def _cap(v: Optional[int]) -> int:
    return -1 if v is None else v


def _ttl(period: str, now: float) -> int:
    """Seconds a period's spend key lives: to the period's end, plus a margin."""
    start = period_start(period, now)
    return max(1, int(start + _SPEND_TTL[period] - now))


def from_config(reactor: Any, url: str, timeout: float, on_error: str) -> RedisState:
    host, port, db, password = parse_url(url)
    client = RedisClient(reactor, host, port, db=db, timeout=timeout, password=password)
    return RedisState(reactor, client, on_error=on_error)


__all__ = ["RedisState", "SharedReservation", "parse_url", "from_config"]

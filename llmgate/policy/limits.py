# -*- test-case-name: tests.policy.test_limits -*-
"""
Rate limits and budgets per gateway key, enforced at admission.

Before a request goes upstream it I{reserves}: one request, its estimated
tokens (L{estimate_tokens}: input as body bytes / 4, output as its
C{max_tokens} or a default) against the key's requests and tokens per
minute, one concurrent slot, and the estimate's price against the key's
budget.  It is admitted only if every one fits (all or nothing).  When it
ends -- completed, failed or cancelled -- its usage record I{settles} it:
the estimate is replaced by the record's tokens and cost, the numbers the
ledger and the metrics get (L{Quotas.settle} is called from
L{Accounting <llmgate.accounting.recorder.Accounting>} with each record).

Overshoot bound: a request is admitted only while settled spend + the
reservations of the requests in flight + its own estimate fit the budget
(the same for tokens per minute).  So the spend can exceed the budget only
by what the requests in flight at that moment cost beyond their estimates:
at most one request's estimate error per concurrently admitted request,
and none when the estimates are upper bounds (an output stops at
C{max_tokens}; the input estimate is an upper bound for text whose tokens
average 4 bytes or more).

Requests and tokens per minute are token buckets holding a minute's
allowance and refilled continuously, as the providers' own limits are: a
full bucket allows a burst of a minute's worth.  A request estimated above
a whole minute's tokens waits for a full bucket and then drives it below
zero, so it is served (late) rather than refused forever.

The state lives in this process (L{MemoryState}).  With C{--workers N}
each worker has its own, so the limits hold per worker: N times the
configured rate at most.  With C{[state] redis_url} it is shared
(L{llmgate.policy.redis.RedisState}: the same three operations, each one
atomic Lua script), and the limits hold across workers and machines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred

from llmgate.policy.budgets import Spend
from llmgate.policy.keys import KeyRecord, Limits, format_time, period_start

# A refusal's kind -> its reason label in llmgate_rejections_total.
_REASONS = {"requests": "rpm", "tokens": "tpm", "concurrency": "concurrency", "budget": "budget"}

# Output tokens reserved when the request names no maximum: embeddings and
# token counts produce none.
_NO_OUTPUT_APIS = frozenset(["openai.embeddings", "anthropic.count_tokens"])
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def estimate_tokens(api: str, body_size: int, doc: dict[str, Any], default_output: int) -> int:
    """
    Tokens to reserve for a request: its body bytes / 4 (cheap, on the
    reactor thread, and above the token count of ordinary text because the
    JSON around it counts too) plus its maximum output.
    """
    out = 0
    if api not in _NO_OUTPUT_APIS:
        out = default_output
        for name in _MAX_TOKEN_FIELDS:
            v = doc.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                out = v
                break
    return -(-body_size // 4) + out


class Bucket:
    """A token bucket holding a minute's allowance C{cap}."""

    __slots__ = ("cap", "level", "last")

    def __init__(self, cap: int, now: float) -> None:
        self.cap = cap
        self.level = float(cap)
        self.last = now

    def refill(self, now: float, cap: int) -> None:
        if cap != self.cap:
            # A reload changed the limit: keep what was used of it.
            self.level += cap - self.cap
            self.cap = cap
        if now > self.last:
            self.level = min(float(cap), self.level + (now - self.last) * cap / 60.0)
        self.last = max(now, self.last)

    def wait(self, amount: float) -> float:
        """Seconds until C{amount} (at most a full bucket) fits."""
        need = min(amount, self.cap)
        if self.level >= need:
            return 0.0
        return (need - self.level) * 60.0 / self.cap

    def reset(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.cap - self.level) * 60.0 / self.cap)


class Scope:
    """The rate state of a key, or of a key-model pair."""

    __slots__ = ("requests", "tokens", "active")

    def __init__(self) -> None:
        self.requests: Optional[Bucket] = None
        self.tokens: Optional[Bucket] = None
        self.active = 0

    def refill(self, now: float, limits: Limits) -> None:
        for attr, cap in (("requests", limits.rpm), ("tokens", limits.tpm)):
            b = getattr(self, attr)
            if cap is None:
                setattr(self, attr, None)
            elif b is None:
                setattr(self, attr, Bucket(cap, now))
            else:
                b.refill(now, cap)


@dataclass
class Refusal:
    """Why a reservation was refused: C{kind} is concurrency, requests, tokens or budget."""

    kind: str
    retry_after: Optional[float]
    message: str


class Reservation:
    """What an admitted request holds until its record settles it (names and numbers only)."""

    __slots__ = ("scopes", "tokens", "key", "cost")

    def __init__(self, scopes: tuple[str, ...], tokens: int, key: str, cost: float) -> None:
        self.scopes = scopes
        self.tokens = tokens
        self.key = key
        self.cost = cost


class MemoryState:
    """
    The limit and spend state of one process.  Its three operations --
    L{reserve}, L{settle} and L{load_spend} -- are each atomic (they run on
    the reactor thread); a shared backend must make them atomic across
    processes.
    """

    def __init__(self) -> None:
        self.scopes: dict[str, Scope] = {}
        self.spend: dict[str, Spend] = {}

    def _spend(self, key: str, now: float) -> Spend:
        s = self.spend.get(key)
        if s is None:
            s = self.spend[key] = Spend(now)
        else:
            s.roll(now)
        return s

    def reserve(
        self,
        now: float,
        scopes: list[tuple[str, Limits]],
        tokens: int,
        key: str,
        budget: Optional[tuple[str, float]],
        cost: float,
    ) -> tuple[Optional[Refusal], Optional[Reservation]]:
        states = []
        for sid, limits in scopes:
            st = self.scopes.get(sid)
            if st is None:
                st = self.scopes[sid] = Scope()
            st.refill(now, limits)
            states.append((st, limits))
        for st, limits in states:
            if limits.concurrency is not None and st.active >= limits.concurrency:
                return Refusal("concurrency", 1.0, f"too many concurrent requests for this key (limit {limits.concurrency})"), None
        for st, limits in states:
            if st.requests is not None and st.requests.wait(1) > 0:
                return Refusal("requests", st.requests.wait(1), f"rate limit reached: {limits.rpm} requests per minute"), None
        for st, limits in states:
            if st.tokens is not None and st.tokens.wait(tokens) > 0:
                return Refusal("tokens", st.tokens.wait(tokens), f"rate limit reached: {limits.tpm} tokens per minute (this request reserves {tokens})"), None
        spend = self._spend(key, now)
        if budget is not None:
            period, limit = budget
            if spend.spent[period] + spend.reserved + cost > limit:
                return Refusal("budget", None, f"the key's budget of ${limit:g} per {period if period != 'total' else 'lifetime'} is spent"), None
        for st, limits in states:
            st.active += 1
            if st.requests is not None:
                st.requests.level -= 1
            if st.tokens is not None:
                st.tokens.level -= tokens
        spend.reserved += cost
        return None, Reservation(tuple(sid for sid, _ in scopes), tokens, key, cost)

    def settle(self, now: float, res: Reservation, tokens: int, cost: float) -> None:
        for sid in res.scopes:
            st = self.scopes.get(sid)
            if st is None:
                continue
            st.active -= 1
            if st.tokens is not None:
                st.tokens.refill(now, st.tokens.cap)
                st.tokens.level = min(float(st.tokens.cap), st.tokens.level + res.tokens - tokens)
        spend = self._spend(res.key, now)
        spend.reserved -= res.cost
        spend.add(cost)

    def charge(self, now: float, key: str, cost: float) -> None:
        """Add spend held by no reservation (an upstream attempt that lost a hedge race)."""
        self._spend(key, now).add(cost)

    def load_spend(self, now: float, totals: dict[str, dict[str, float]]) -> None:
        """Add the ledger's spend (at start) to what this process counted."""
        for key, per in totals.items():
            s = self._spend(key, now)
            for p, v in per.items():
                s.spent[p] += v

    def quota(self, now: float, sid: str, limits: Limits) -> Optional[Scope]:
        st = self.scopes.get(sid)
        if st is not None:
            st.refill(now, limits)
        return st


def go_duration(seconds: float) -> str:
    """OpenAI's reset format: C{12ms}, C{1s}, C{6m0s}, C{1h2m3s}."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


@dataclass
class Verdict:
    """L{Quotas.admit}'s answer: a reservation, or a refusal to send."""

    reservation: Optional[Reservation] = None
    status: int = 200
    message: str = ""
    code: Optional[str] = None
    headers: dict[bytes, bytes] = field(default_factory=dict)


class Quotas:
    """
    Admission and settlement against the keys' limits and budgets.

    @param clock: C{IReactorTime}; its C{seconds()} is wall time (periods
        are calendar days and months).
    @param state: L{MemoryState} or a shared backend with its methods.
    """

    def __init__(self, clock: Any, state: Optional[MemoryState] = None) -> None:
        self.clock = clock
        self.state = state if state is not None else MemoryState()
        # request_id -> Reservation, until its record settles it.
        self._held: dict[str, Reservation] = {}
        # Budgets are enforced once the ledger's spend is loaded.
        self.spend_ready = False
        # Observers (the metrics): on_refuse(key name, reason) for each
        # request refused here, reason rpm, tpm, concurrency, budget or
        # unpriced_model; on_spend(key name, budget left) when a request of
        # a key with a budget settles.
        self.on_refuse: Optional[Callable[[str, str], Any]] = None
        self.on_spend: Optional[Callable[[str, float], Any]] = None
        # Key name -> (period, budget) of the keys with a budget, as last
        # admitted (a reload's change applies from the key's next request).
        self._budgets: dict[str, tuple[str, float]] = {}

    @staticmethod
    def _scopes(key: KeyRecord, model: str) -> list[tuple[str, Limits]]:
        scopes = []
        if key.limits.any():
            scopes.append((key.name, key.limits))
        pair = key.model_limits(model)
        if pair is not None:
            scopes.append((f"{key.name}\0{pair[0]}", pair[1]))
        return scopes

    def admit(self, key: KeyRecord, model: str, kind: str, tokens: int, cost: Optional[float]) -> Any:
        """
        Reserve for a request of C{key} to C{model} (C{kind}: the route's
        dialect, for its headers) estimated at C{tokens} costing C{cost}:
        a L{Verdict}, or a Deferred of one when the state is shared.
        """
        now = self.clock.seconds()
        budget = None
        if key.budget_usd is not None:
            self._budgets[key.name] = (key.period, key.budget_usd)
            if cost is None:
                self._refused(key.name, "unpriced_model")
                return Verdict(status=403, code="permission_error", message=(
                    f"the model {model!r} has no price, and a key with a budget may only use priced models"
                ))
            if not self.spend_ready:
                return Verdict(status=503, message="the gateway is loading its spend records; retry shortly",
                               headers={b"retry-after": b"1"})
            budget = (key.period, key.budget_usd)
        scopes = self._scopes(key, model)
        result = self.state.reserve(now, scopes, tokens, key.name, budget, cost or 0.0)
        if isinstance(result, Deferred):
            # A shared state (llmgate.policy.redis) answers later.
            return result.addCallback(lambda r: self._verdict(kind, now, scopes, *r, key=key.name))
        return self._verdict(kind, now, scopes, *result, key=key.name)

    def _refused(self, key: str, reason: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(key, reason)

    def _verdict(self, kind: str, now: float, scopes: list[tuple[str, Limits]],
                 refusal: Optional[Refusal], res: Optional[Reservation], key: str = "") -> Verdict:
        headers = self.headers(kind, now, scopes)
        if refusal is None:
            return Verdict(reservation=res, headers=headers)
        if refusal.kind in _REASONS:
            self._refused(key, _REASONS[refusal.kind])
        if refusal.kind == "unavailable":
            # The shared state did not answer (fail_closed).
            headers[b"retry-after"] = b"1"
            return Verdict(status=503, message=refusal.message, headers=headers)
        if refusal.kind == "budget":
            headers[b"x-should-retry"] = b"false"
            return Verdict(status=429, message=refusal.message, code="insufficient_quota", headers=headers)
        wait = refusal.retry_after or 1.0
        headers[b"retry-after"] = str(max(1, math.ceil(wait))).encode()
        headers[b"retry-after-ms"] = str(max(1, math.ceil(wait * 1000))).encode()
        return Verdict(status=429, message=refusal.message, code="rate_limit_exceeded", headers=headers)

    def hold(self, request_id: str, res: Reservation) -> None:
        """Keep C{res} until the record of C{request_id} settles it."""
        self._held[request_id] = res

    def settle(self, rec: Any) -> None:
        """
        Replace a request's reservation with what its usage record says it
        used.  A record without token counts (the request never reached a
        provider) used nothing; tokens without a price keep the estimated
        cost, never less spend than was reserved for an unknown amount.
        """
        res = self._held.pop(rec.request_id, None)
        if res is None:
            return
        tin, tout = rec.input_tokens, rec.output_tokens
        if tin is None and tout is None:
            tokens, cost = 0, 0.0
        else:
            tokens = (tin or 0) + (tout or 0)
            cost = rec.cost_usd if rec.cost_usd is not None else res.cost
        now = self.clock.seconds()
        shared = self.state.settle(now, res, tokens, cost)
        budget = self._budgets.get(res.key)
        if budget is not None and self.on_spend is not None:
            self.on_spend(res.key, budget[1] - self.spent(res.key, budget[0], now))
            if shared is not None:
                # Shared state: again once Redis answered with every
                # worker's spend (a metric by this process's own settles
                # alone would show more left than there is).
                key, (period, limit), on_spend = res.key, budget, self.on_spend
                shared.addCallback(lambda _: on_spend(key, limit - self.spent(key, period, self.clock.seconds())))

    def charge(self, rec: Any) -> None:
        """
        Add the cost of an upstream attempt that served no client (a hedge
        that lost the race, L{llmgate.routing.attempts}) to its key's
        spend. The provider bills it, so the key's budget pays for it; it
        held no reservation and no rate-limit slot of its own (the client
        request's reservation covers those).
        """
        cost = rec.cost_usd
        if not cost or cost <= 0 or not rec.key_name:
            return
        now = self.clock.seconds()
        shared = self.state.charge(now, rec.key_name, cost)
        budget = self._budgets.get(rec.key_name)
        if budget is not None and self.on_spend is not None:
            key, (period, limit), on_spend = rec.key_name, budget, self.on_spend
            on_spend(key, limit - self.spent(key, period, now))
            if shared is not None:
                shared.addCallback(lambda _: on_spend(key, limit - self.spent(key, period, self.clock.seconds())))

    def spent(self, key: str, period: str, now: float) -> float:
        """
        The settled spend of C{key} in the C{period} C{now} is in, as this
        process sees it (with Redis: the ledger's at start and what this
        process settled since).  Reads, never mutates.
        """
        s = getattr(self.state, "spend", {}).get(key)
        if s is None or (period != "total" and s.starts.get(period) != period_start(period, now)):
            return 0.0
        return float(s.spent.get(period, 0.0))

    def release(self, res: Reservation) -> None:
        """Give back a reservation whose request never started (nothing used)."""
        self.state.settle(self.clock.seconds(), res, 0, 0.0)

    def load_spend(self, totals: dict[str, dict[str, float]]) -> None:
        self.state.load_spend(self.clock.seconds(), totals)
        self.spend_ready = True

    @property
    def held(self) -> int:
        return len(self._held)

    def headers(self, kind: str, now: float, scopes: list[tuple[str, Limits]]) -> dict[bytes, bytes]:
        """The remaining quota, in the dialect's rate-limit headers (key-level first)."""
        out: dict[bytes, bytes] = {}
        for sid, limits in scopes:
            st = self.state.quota(now, sid, limits)
            if st is None:
                continue
            for name, bucket in (("requests", st.requests), ("tokens", st.tokens)):
                if bucket is None:
                    continue
                if kind == "anthropic":
                    prefix = f"anthropic-ratelimit-{name}-".encode()
                    if prefix + b"limit" in out:
                        continue
                    out[prefix + b"limit"] = str(bucket.cap).encode()
                    out[prefix + b"remaining"] = str(max(0, math.floor(bucket.level))).encode()
                    out[prefix + b"reset"] = format_time(math.ceil(now + bucket.reset())).encode()
                else:
                    if f"x-ratelimit-limit-{name}".encode() in out:
                        continue
                    out[f"x-ratelimit-limit-{name}".encode()] = str(bucket.cap).encode()
                    out[f"x-ratelimit-remaining-{name}".encode()] = str(max(0, math.floor(bucket.level))).encode()
                    out[f"x-ratelimit-reset-{name}".encode()] = go_duration(bucket.reset()).encode()
        return out

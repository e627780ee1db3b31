# -*- test-case-name: tests.routing.test_attempts,tests.routing.test_hedge -*-
"""
The upstream attempts of one client request.

Each attempt is one L{Relay}; the client-facing L{Exchange} is carried from
one to the next. A relay whose attempt failed before anything was written
to the client (connect failure, no headers in time, a retryable status, an
Anthropic stream that began with an C{error} event) asks
L{Attempts.attempt_failed}: while the attempt budget and the deadline
allow and some deployment is usable, the failed attempt gets its own ledger
record (linked by C{parent_request_id}), its error body is dropped, and the
next deployment (another of the model's, then the fallbacks') takes the
client over. When none is usable and the failed one answered 429/503 with
a short C{retry-after} (at most C{[routing] retry_after_wait}), the same
deployment is tried again after that wait. Once the first byte went out
the relay never asks: a second provider's output is never spliced onto a
partial stream. The last attempt's error is relayed as before.

While another attempt could still follow, a 200 event stream is held by
its relay until its first content (L{gate}, L{llmgate.relay.gate}): an
error event before content is still a failure before the first byte.

Hedging (per model, C{hedge_after}): when the first attempt has not
committed (no first content) in time, the same request starts on another
deployment; the first attempt to reach content commits
(L{attempt_answered}) and the other is let go at once (its upstream
connection closed), with its own "hedge_lost" record and the tokens it
cost. A hedge that fails before its first byte leaves the first attempt
running.

The relays refer to this object only while their attempts run, and this
object lets go of the relays (and cancels its timers) when the request is
recorded: no cycle outlives the request.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional

from twisted.logger import Logger
from twisted.web.http_headers import Headers

from llmgate import dialects
from llmgate.config import Deployment, Routing, Timeouts
from llmgate.edge.requestid import HEADER as REQUEST_ID
from llmgate.relay.headers import upstream_request_headers
from llmgate.relay.stream import Exchange, Relay
from llmgate.routing.balance import Group, key, pick

log = Logger(namespace="llmgate.routing.attempts")


# What an answered request's attempts hold instead of their groups and
# tried deployments (read only before an attempt answered): one object for
# all of them.
_NOTHING_TRIED: frozenset[tuple[str, str]] = frozenset()


def _serialize(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


class HedgeBudget:
    """
    The hedging policy of one public model, shared by its requests: when
    to hedge (C{after}: seconds, or "p95") and how often at most: a hedge
    is allowed while hedges stay within C{fraction} of the model's
    requests (counted since start; two integers, no window).
    """

    __slots__ = ("after", "fraction", "requests", "hedges")

    def __init__(self, after: Any, fraction: float) -> None:
        self.after = after
        self.fraction = fraction
        self.requests = 0
        self.hedges = 0

    def configure(self, after: Any, fraction: float) -> None:
        """New settings (a reload); the counts are kept."""
        self.after = after
        self.fraction = fraction

    def take(self) -> bool:
        """Whether one more hedge stays within the fraction (then counted)."""
        if self.hedges + 1 > self.fraction * self.requests:
            return False
        self.hedges += 1
        return True


class _Try:
    """One upstream attempt in flight: its relay, deployment and exchange."""

    __slots__ = ("relay", "dep", "key", "n", "started", "exchange", "reason")

    def __init__(self, relay: Any, dep: Deployment, n: int, started: float, exchange: Exchange, reason: str) -> None:
        self.relay = relay
        self.dep = dep
        self.key = key(dep)
        self.n = n
        self.started = started
        self.exchange = exchange
        self.reason = reason


class _Wait:
    """
    Stands in the relays' set (the watchdog's and the drain's) for a
    request waiting out a C{retry-after} with nothing in flight: a stop
    still answers it (L{abort}) rather than leave it unanswered.
    """

    __slots__ = ("exchange", "_attempts")

    def __init__(self, attempts: "Attempts") -> None:
        self.exchange = attempts.exchange
        self._attempts: Optional[Attempts] = attempts

    def check(self, now: float) -> None:
        """No timeout of its own: the wait is bounded by retry_after_wait."""

    def cut_for_budget(self, message: str) -> bool:
        return False

    def abort(self, message: str) -> None:
        attempts, self._attempts = self._attempts, None
        if attempts is not None:
            attempts._abort_wait(message)


# The fields of an exchange that describe its upstream attempt: a hedge
# that takes the client over brings them to the client-facing exchange.
_ATTEMPT_FIELDS = (
    "provider", "upstream_model", "attempt", "status", "outcome", "phase", "error",
    "headers_at", "upstream_request_id", "counter", "first_byte_at",
)


class Attempts:
    """
    @param request: the client's request.
    @param exchange: the client-facing exchange (its C{request_id} is the
        client request's; another attempt's record gets C{<id>-<n>}).
    @param groups: the deployment groups (L{llmgate.routing.balance.plan}).
    @param body: the request body for the first deployment's upstream
        model; other upstream models get C{doc} with their name.
    @param visible_id: the request id sent upstream.
    @param done: called once with the exchange when the request is over.
    @param active: the relays in flight (the watchdog's set).
    @param hedge: the model's L{HedgeBudget}, or L{None} (no hedging).
    @param metrics: L{llmgate.ops.metrics.Metrics} (attempt and hedge
        counters), or L{None}.
    """

    def __init__(
        self,
        *,
        request: Any,
        http: Any,
        clock: Any,
        timeouts: Timeouts,
        routing: Routing,
        breakers: Any,
        providers: Any,
        rng: Any,
        exchange: Exchange,
        groups: list[Group],
        doc: dict[str, Any],
        body: bytes,
        visible_id: str,
        accounting: Any,
        active: set[Relay],
        coalescer: Any,
        done: Callable[[Exchange], None],
        hedge: Optional[HedgeBudget] = None,
        metrics: Any = None,
    ) -> None:
        self.request = request
        self.http = http
        self.clock = clock
        self.timeouts = timeouts
        self.routing = routing
        self.breakers = breakers
        self.providers = providers
        self.rng = rng
        self.exchange = exchange
        self.groups = groups
        self.doc = doc
        self.accounting = accounting
        self.active = active
        self.coalescer = coalescer
        self.hedge = hedge
        self.metrics = metrics
        self._done: Optional[Callable[[Exchange], None]] = done
        self._visible_id = visible_id
        self._bodies = {exchange.upstream_model: body}
        self._tried: set[tuple[str, str]] = set()
        # The attempts in flight: the first is the client-facing one (its
        # exchange is C{exchange}); a second one is a hedge.
        self._tries: list[_Try] = []
        self._committed = False
        self._hedge_call: Any = None
        self._wait_call: Any = None
        self._wait: Optional[_Wait] = None
        self._hedge_counted = False
        self.n = 0

    def start(self, deployment: Deployment) -> None:
        """The first attempt, on C{deployment}; the hedge timer, if any."""
        self._launch(deployment, "first")
        if self.hedge is not None and self.hedge.after is not None:
            self.hedge.requests += 1
            self._arm_hedge()

    def _body(self, upstream_model: str) -> bytes:
        body = self._bodies.get(upstream_model)
        if body is None:
            # Another upstream model's name: re-serialized on the reactor
            # thread (only on a retry to a differently named model).
            doc = dict(self.doc)
            doc["model"] = upstream_model
            body = self._bodies[upstream_model] = _serialize(doc)
        return body

    def _launch(self, dep: Deployment, reason: str) -> None:
        self.n += 1
        base = self.exchange
        provider = self.providers[dep.provider]
        if not self._tries:
            ex = base
            ex.provider, ex.upstream_model, ex.attempt = provider, dep.upstream_model, self.n
        else:
            # A hedge: its own exchange (and counter) until it wins.
            ex = dataclasses.replace(
                base,
                request_id=f"{base.request_id}-{self.n}",
                parent_request_id=base.request_id,
                provider=provider,
                upstream_model=dep.upstream_model,
                attempt=self.n,
                counter=self.accounting.attempt_counter(base),
                status=0, outcome="completed", phase=None, error=None, headers_at=None,
                upstream_request_id=None, first_byte_at=None, first_write_at=None, bytes_out=0,
                hedged=False, added_max=0.0, added_sum=0.0, added_n=0,
            )
        self._tried.add(key(dep))
        self.breakers.taken(key(dep))
        if self.metrics is not None:
            self.metrics.attempt(provider.name, reason)
        headers = upstream_request_headers(
            self.request.requestHeaders,
            dialects.auth_headers(provider.kind, provider.api_key, provider.anthropic_version),
        )
        headers.setRawHeaders(b"content-type", [b"application/json"])
        headers.setRawHeaders(REQUEST_ID, [self._visible_id.encode("ascii")])
        url = dialects.upstream_url(provider.kind, provider.base_url, ex.endpoint.path)
        # Told of every attempt's outcome, the last one's too (its breaker
        # counts it); attempt_failed decides whether another may follow.
        relay = Relay(
            self.request, self.http, self.clock, self.timeouts, ex, self._finished,
            coalescer=self.coalescer, attempts=self,
        )
        t = _Try(relay, dep, self.n, self.clock.seconds(), ex, reason)
        self._tries.append(t)
        self.active.add(relay)
        try:
            relay.start(url, headers, self._body(dep.upstream_model))
        except Exception:
            # Never leave a relay (or the active gauge) behind, and still
            # record the request once.
            log.failure("could not start the upstream request")
            self._forget(t)
            if ex is not base:
                # A hedge that could not start: the first attempt goes on.
                return
            self._cancel_timers()
            for other in list(self._tries):
                self._lose(other, "gateway_error")
            ex.status, ex.outcome, ex.counter = 500, "gateway_error", None
            ex.ended = self.clock.seconds()
            self._finished(ex)
            req = self.request
            if not req.finished and not req._disconnected:
                body = dialects.error_body(ex.endpoint.kind, 500, "internal gateway error")
                req.setResponseCode(500)
                req.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
                req.write(body)
                req.finish()

    def _find(self, relay: Any) -> Optional[_Try]:
        for t in self._tries:
            if t.relay is relay:
                return t
        return None

    def _forget(self, t: _Try) -> None:
        """C{t} is over: out of the tries, the watchdog's set and the outstanding count."""
        if t in self._tries:
            self._tries.remove(t)
        self.active.discard(t.relay)
        self.breakers.released(t.key)

    def _reason(self, dep: Deployment) -> str:
        """A next attempt on C{dep}: another of the model's deployments, or a fallback."""
        return "retry" if dep in self.groups[0] else "fallback"

    # -- hedging ---------------------------------------------------------------

    def _arm_hedge(self) -> None:
        after = self.hedge.after if self.hedge is not None else None
        if after == "p95":
            # The p95 TTFT of the model's fastest deployment (by p95), not
            # only the first attempt's own: a deployment slow on some
            # requests has those in its own p95 (10% slow = a p95 of the
            # slow TTFT), and waiting that long hedges nothing. A hedge pays
            # when the wait already exceeds what another deployment
            # delivers 95% of the time; hedge_max_fraction caps the cost.
            known = [p for p in (self.breakers.ttft_p95(key(d)) for d in self.groups[0]) if p is not None]
            after = min(known) if known and self._tries else None
        if after is None:
            return
        self._hedge_call = self.clock.callLater(after, self._start_hedge)

    def _start_hedge(self) -> None:
        """No first content in time: the same request on another deployment."""
        self._hedge_call = None
        routing = self.routing
        if self._committed or len(self._tries) != 1 or self.request._disconnected:
            return
        if self.n >= routing.max_attempts or self.clock.seconds() - self.exchange.started >= routing.deadline:
            return
        dep = pick(self.groups, self.breakers, self.rng, routing.balance, self._tried)
        if dep is None or self.hedge is None or not self.hedge.take():
            return
        self.exchange.hedged = True
        self._launch(dep, "hedge")

    def _cancel_timers(self) -> None:
        for name in ("_hedge_call", "_wait_call"):
            call = getattr(self, name)
            if call is not None:
                setattr(self, name, None)
                if call.active():
                    call.cancel()

    def _count_hedge(self, winner: Optional[_Try]) -> None:
        """Count the hedge once: won if C{winner} is it, else lost."""
        if not self.exchange.hedged or self._hedge_counted:
            return
        self._hedge_counted = True
        if self.metrics is not None:
            self.metrics.hedge(self.exchange.model, "won" if winner is not None and winner.reason == "hedge" else "lost")

    def _adopt(self, t: _Try) -> None:
        """The hedge C{t} takes the client over: the client-facing exchange becomes its."""
        base = self.exchange
        hx = t.exchange
        if hx is base:
            return
        for name in _ATTEMPT_FIELDS:
            setattr(base, name, getattr(hx, name))
        t.exchange = base
        t.relay.exchange = base
        self._tries.remove(t)
        self._tries.insert(0, t)

    def _attempt_record(self, t: _Try, **changes: Any) -> Exchange:
        """A copy of C{t}'s exchange as its own attempt's record."""
        base = self.exchange
        return dataclasses.replace(
            t.exchange,
            request_id=f"{base.request_id}-{t.n}",
            parent_request_id=base.request_id,
            started=t.started,
            hedged=False,
            ended=self.clock.seconds(),
            **changes,
        )

    def _lose(self, t: _Try, outcome: str = "hedge_lost") -> None:
        """
        Let C{t} go at once (its upstream closed): its own record, with
        what it cost (estimated from the prompt and what it streamed).
        """
        held = t.relay.let_go()
        if outcome == "hedge_lost" and t.reason != "hedge":
            # Its TTFT is at least this long. Observing only the attempts
            # that served would hide a slow deployment's slow requests
            # behind the hedges that beat them (survivor bias), and latency
            # balancing would keep sending it traffic. A lower bound says
            # something only above the estimate: a hedge that lost after a
            # few milliseconds is no sign its deployment is fast.
            waited = self.clock.seconds() - t.started
            known = self.breakers.ttft_ewma(t.key)
            if known is None or waited > known:
                self.breakers.observe_ttft(t.key, waited)
        self._forget(t)
        counter = t.exchange.counter
        if t.exchange is self.exchange:
            # The client-facing exchange keeps the winner's counter.
            t.exchange.counter = None
        if counter is not None and held:
            counter.feed(held)
        phase = t.exchange.phase or ("body" if t.exchange.status else "headers")
        self.accounting.attempt_ended(self._attempt_record(t, outcome=outcome, phase=phase, counter=counter))

    # -- what the relays report ------------------------------------------------

    def gate(self, relay: Relay) -> bool:
        """
        Whether routing may still act on C{relay}'s attempt after its 200
        event-stream headers: a hedge races it (or may start), or another
        attempt could follow a failure (budget, deadline, a deployment
        left untried and usable).
        """
        if self._committed:
            return False
        if len(self._tries) > 1 or self._hedge_call is not None:
            return True
        routing = self.routing
        if self.n >= routing.max_attempts or self.clock.seconds() - self.exchange.started >= routing.deadline:
            return False
        return any(
            key(d) not in self._tried and self.breakers.available(key(d)) for g in self.groups for d in g
        )

    def attempt_answered(self, relay: Relay) -> None:
        """C{relay}'s attempt commits: any other attempt is let go."""
        t = self._find(relay)
        if t is None:
            return
        self._committed = True
        self._cancel_timers()
        self.breakers.succeeded(t.key)
        for other in [o for o in self._tries if o is not t]:
            self._lose(other)
        self._adopt(t)
        self._count_hedge(t)
        # No attempt follows one that was answered: let go now of what only
        # another attempt would read, rather than hold it for the whole
        # stream: the request body's bytes for other deployments (up to the
        # body cap), the parsed body (a dict, a list and a dict per message,
        # all walked by the cyclic collector while the stream is open) and
        # the client's request headers (one list per header). The ledger's
        # estimate, if the provider reports no usage, reads the body sent
        # upstream instead of the parsed one (llmgate.accounting.recorder).
        ex = self.exchange
        sent = self._bodies.get(ex.upstream_model)
        if sent is not None:
            ex.body = sent
        self.doc = {}
        self._bodies.clear()
        self.groups = ()  # type: ignore[assignment]
        self._tried = _NOTHING_TRIED  # type: ignore[assignment]
        # (Replaced, not emptied: see llmgate.relay.stream.Relay._respond.)
        self.request.requestHeaders = Headers()

    def attempt_failed(
        self, relay: Relay, status: int, phase: str, message: str, retry_after: Optional[float]
    ) -> bool:
        routing = self.routing
        if retry_after is not None:
            retry_after = min(retry_after, routing.retry_after_cap)
        t = self._find(relay)
        if t is None:
            return False
        # A 429 or 408 says "not this request now", not "down".
        self.breakers.failed(t.key, retry_after, health=status not in (408, 429))
        others = [o for o in self._tries if o is not t]
        if others:
            # A hedge (or the first attempt) still races: it goes on alone.
            self._record_failed(t, status, phase, message)
            self._forget(t)
            if t.reason == "hedge":
                self._count_hedge(None)
            self._adopt(others[0])
            return True
        ex = self.exchange
        now = self.clock.seconds()
        if self.n >= routing.max_attempts or now - ex.started >= routing.deadline or self.request._disconnected:
            return False
        dep = pick(self.groups, self.breakers, self.rng, routing.balance, self._tried)
        wait = 0.0
        if dep is None:
            # Nobody else can take it: the same deployment again after its
            # retry-after, when that is short.
            if (
                status not in (429, 503)
                or retry_after is None
                or retry_after > routing.retry_after_wait
                or now + retry_after - ex.started >= routing.deadline
            ):
                return False
            dep, wait = t.dep, retry_after
        self._cancel_timers()
        if t.reason == "hedge":
            self._count_hedge(None)
        self._record_failed(t, status, phase, message)
        self._forget(t)
        # The client-facing exchange starts over (nothing was written).
        ex.status, ex.outcome, ex.phase, ex.error = 0, "completed", None, None
        ex.headers_at = ex.upstream_request_id = ex.first_byte_at = None
        if wait > 0:
            self._wait_call = self.clock.callLater(wait, self._retry_same, dep)
            self._wait = _Wait(self)
            self.active.add(self._wait)  # type: ignore[arg-type]
        else:
            self._launch(dep, self._reason(dep))
        return True

    def _record_failed(self, t: _Try, status: int, phase: str, message: str) -> None:
        self.accounting.attempt_failed(
            self._attempt_record(t, status=status, outcome="upstream_error", phase=phase, error=message, counter=None)
        )

    def _retry_same(self, dep: Deployment) -> None:
        """The retry-after wait is over: the same deployment again."""
        self._wait_call = None
        self._end_wait()
        if self.request._disconnected:
            # The client left while we waited: nothing in flight to cancel.
            ex = self.exchange
            ex.outcome, ex.phase, ex.counter = "client_cancelled", "connect", None
            ex.ended = self.clock.seconds()
            self._finished(ex)
            return
        self._launch(dep, "retry")

    def _end_wait(self) -> None:
        wait, self._wait = self._wait, None
        if wait is not None:
            wait._attempts = None
            self.active.discard(wait)  # type: ignore[arg-type]

    def _abort_wait(self, message: str) -> None:
        """The gateway stops during a retry-after wait: a 503 in dialect, recorded."""
        self._cancel_timers()
        self._end_wait()
        ex = self.exchange
        ex.status, ex.outcome, ex.phase, ex.error, ex.counter = 503, "upstream_error", "headers", message, None
        ex.ended = self.clock.seconds()
        req = self.request
        if not req.finished and not req._disconnected:
            body = dialects.error_body(ex.endpoint.kind, 503, message)
            req.setResponseCode(503)
            req.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
            req.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
            req.write(body)
            ex.bytes_out += len(body)
            req.finish()
        self._finished(ex)

    def _finished(self, ex: Exchange) -> None:
        """A relay recorded its exchange (the request is over, or a racing attempt ended on its own)."""
        t = next((t for t in self._tries if t.exchange is ex), None)
        if ex is not self.exchange:
            # A hedge that ended without the client (its client left, or
            # the gateway stops): its own attempt record.
            if t is not None:
                self._forget(t)
                ex.ended = self.clock.seconds()
                self.accounting.attempt_ended(ex)
            return
        if t is not None:
            # The served attempt's own TTFT (from its own start, not the
            # client request's) feeds latency balancing and the p95 hedge;
            # not a hedge's: a hedge serves only when it beat the first
            # attempt, so its TTFTs are the fast ones (selection bias).
            if t.reason != "hedge":
                self.breakers.observe_ttft(
                    t.key, None if ex.status != 200 or ex.first_byte_at is None else ex.first_byte_at - t.started
                )
            self._forget(t)
        self._cancel_timers()
        self._end_wait()
        for other in list(self._tries):
            self._lose(other, "client_cancelled" if self.request._disconnected else "hedge_lost")
        self._bodies.clear()
        done, self._done = self._done, None
        if done is not None:
            done(ex)

# -*- test-case-name: tests.routing.test_attempts -*-
"""
The upstream attempts of one client request.

Each attempt is one L{Relay}; the client-facing L{Exchange} is carried from
one to the next. A relay whose attempt failed before anything was written
to the client (connect failure, no headers in time, a retryable status)
asks L{Attempts.attempt_failed}: while the attempt budget and the deadline
allow and some deployment is usable, the failed attempt gets its own ledger
record (linked by C{parent_request_id}), its error body is dropped, and the
next deployment (another of the model's, then the fallbacks') takes the
client over. Once the first byte went out the relay never asks: a second
provider's output is never spliced onto a partial stream. The last
attempt's error is relayed as before.

The relay refers to this object only while its attempt runs, and this
object lets go of the relay when the request is recorded: no cycle
outlives the request.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional

from twisted.logger import Logger

from llmgate import dialects
from llmgate.config import Deployment, Routing, Timeouts
from llmgate.edge.requestid import HEADER as REQUEST_ID
from llmgate.relay.headers import upstream_request_headers
from llmgate.relay.stream import Exchange, Relay
from llmgate.routing.balance import Group, key, pick

log = Logger(namespace="llmgate.routing.attempts")


def _serialize(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


class Attempts:
    """
    @param request: the client's request.
    @param exchange: the client-facing exchange (its C{request_id} is the
        client request's; a failed attempt's record gets C{<id>-<n>}).
    @param groups: the deployment groups (L{llmgate.routing.balance.plan}).
    @param body: the request body for the first deployment's upstream
        model; other upstream models get C{doc} with their name.
    @param visible_id: the request id sent upstream.
    @param done: called once with the exchange when the request is over.
    @param active: the relays in flight (the watchdog's set).
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
        self._done: Optional[Callable[[Exchange], None]] = done
        self._visible_id = visible_id
        self._bodies = {exchange.upstream_model: body}
        self._tried: set[tuple[str, str]] = set()
        self._relay: Optional[Relay] = None
        self._key: Optional[tuple[str, str]] = None
        self._attempt_started = exchange.started
        self.n = 0

    def start(self, deployment: Deployment) -> None:
        """The first attempt, on C{deployment}."""
        self._launch(deployment)

    def _body(self, upstream_model: str) -> bytes:
        body = self._bodies.get(upstream_model)
        if body is None:
            # Another upstream model's name: re-serialized on the reactor
            # thread (only on a retry to a differently named model).
            doc = dict(self.doc)
            doc["model"] = upstream_model
            body = self._bodies[upstream_model] = _serialize(doc)
        return body

    def _launch(self, dep: Deployment) -> None:
        self.n += 1
        ex = self.exchange
        provider = self.providers[dep.provider]
        ex.provider, ex.upstream_model, ex.attempt = provider, dep.upstream_model, self.n
        self._key = key(dep)
        self._tried.add(self._key)
        self.breakers.taken(self._key)
        self._attempt_started = self.clock.seconds()
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
        self._relay = relay
        self.active.add(relay)
        try:
            relay.start(url, headers, self._body(dep.upstream_model))
        except Exception:
            # Never leave a relay (or the active gauge) behind, and still
            # record the request once.
            log.failure("could not start the upstream request")
            self.active.discard(relay)
            self._relay = None
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

    # -- what the relay reports ----------------------------------------------

    def attempt_answered(self, relay: Relay) -> None:
        if self._key is not None:
            self.breakers.succeeded(self._key)
        # No attempt follows one that was answered: let the request body go
        # now rather than hold it (up to the body cap) for the whole stream.
        self._bodies.clear()

    def attempt_failed(
        self, relay: Relay, status: int, phase: str, message: str, retry_after: Optional[float]
    ) -> bool:
        routing = self.routing
        if retry_after is not None:
            retry_after = min(retry_after, routing.retry_after_cap)
        failed_key = self._key
        if failed_key is not None:
            # A 429 or 408 says "not this request now", not "down".
            self.breakers.failed(failed_key, retry_after, health=status not in (408, 429))
        ex = self.exchange
        now = self.clock.seconds()
        if self.n >= routing.max_attempts or now - ex.started >= routing.deadline or self.request._disconnected:
            return False
        dep = pick(self.groups, self.breakers, self.rng, routing.balance, self._tried)
        if dep is None:
            return False
        if failed_key is not None:
            self.breakers.released(failed_key)
        self.accounting.attempt_failed(
            dataclasses.replace(
                ex,
                request_id=f"{ex.request_id}-{self.n}",
                parent_request_id=ex.request_id,
                started=self._attempt_started,
                status=status,
                outcome="upstream_error",
                phase=phase,
                error=message,
                counter=None,
                ended=now,
            )
        )
        # The client-facing exchange starts over (nothing was written).
        ex.status, ex.outcome, ex.phase, ex.error = 0, "completed", None, None
        ex.headers_at = ex.upstream_request_id = None
        self.active.discard(relay)
        self._relay = None
        self._launch(dep)
        return True

    def _finished(self, ex: Exchange) -> None:
        relay, self._relay = self._relay, None
        if relay is not None:
            self.active.discard(relay)
        if self._key is not None:
            self.breakers.observe_ttft(self._key, None if ex.status != 200 or ex.first_byte_at is None else ex.first_byte_at - self._attempt_started)
            self.breakers.released(self._key)
            self._key = None
        self._bodies.clear()
        done, self._done = self._done, None
        if done is not None:
            done(ex)

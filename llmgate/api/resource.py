# -*- test-case-name: tests.relay.test_stream -*-
"""
The gateway's twisted.web Resource: checks the gateway key, parses the body
just enough to route it by model, and hands the request to a L{Relay}.

Errors the gateway makes itself are answered in the dialect of the route
the client called.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llmgate import dialects
from llmgate.accounting.usage import Usage
from llmgate.api.body import BodyError, parse_body
from llmgate.config import Config, Provider
from llmgate.edge.requestid import HEADER as REQUEST_ID, ids_for
from llmgate.ops.executors import Overloaded
from llmgate.policy import keys as keymod
from llmgate.policy.limits import Quotas, estimate_tokens
from llmgate.relay.headers import upstream_request_headers
from llmgate.relay.stream import ActiveRelays, Coalescer, Exchange, Relay, Watchdog, new_exchange
from llmgate.routing import balance
from llmgate.routing.attempts import Attempts, HedgeBudget
from llmgate.routing.breaker import Breakers

log = Logger(namespace="llmgate.api.resource")

# Bodies above this are parsed off the reactor thread: a multi-megabyte
# json.loads would stall every stream for tens of milliseconds. (A 64 kB
# body of small objects takes up to ~4 ms to parse and depth-check.)
_THREAD_PARSE_BYTES = 64 * 1024

_GET_ROUTES = (b"/v1/models", b"/healthz")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None, model: str = "", headers: Optional[dict[bytes, bytes]] = None) -> None:
        super().__init__(message)
        self.headers = headers
        self.model = model
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def _parse_body(body: bytes) -> dict[str, Any]:
    try:
        return parse_body(body)
    except BodyError as e:
        raise _BadRequest(400, str(e), param=e.param) from None


def _serialize(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _write_error(request: Any, kind: str, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None, headers: Optional[dict[bytes, bytes]] = None) -> bytes:
    body = dialects.error_body(kind, status, message, code=code, param=param)
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    for name, value in (headers or {}).items():
        request.responseHeaders.setRawHeaders(name, [value])
    return body


def _client_host(request: Any) -> str:
    """The client's address (IP, or a Unix socket's path) for the access log."""
    try:
        addr = request.getClientAddress()
    except Exception:
        return ""
    host = getattr(addr, "host", None) or getattr(addr, "name", None)
    if isinstance(host, bytes):
        host = host.decode("utf-8", "replace")
    return host if isinstance(host, str) else ""


def _who(request: Any) -> dict[str, Any]:
    """The request's ids, method and client, for a rejected request's record."""
    ids = ids_for(request)
    return {
        "request_id": ids.gateway,
        "client_request_id": ids.client,
        "method": request.method.decode("latin-1"),
        "client": _client_host(request),
    }


@dataclass(slots=True)
class _Admission:
    """
    A request whose body was parsed and routed, on its way upstream: what
    reserving its limits and starting its first attempt need.
    """

    request: Any
    endpoint: dialects.Endpoint
    key_name: str
    doc: dict[str, Any]
    body: bytes
    model: str
    provider: Provider
    upstream_model: str
    streamed: bool
    strip_usage: bool
    route: Any


class GatewayResource(Resource):
    """
    Routes C{/v1/...} requests by path and body C{model}.

    @param config: the validated L{Config}.
    @param http: the treq client of the gateway's own pool.
    @param clock: C{IReactorTime} for the relay's timers.
    @param accounting: makes a counter per request and takes each finished
        L{Exchange} (see L{llmgate.accounting.recorder.Accounting}).
    @param parse_in_thread: C{f(*args, size=, alive=) -> Deferred}, runs
        C{f} off the reactor thread (L{BoundedExecutor.submit
        <llmgate.ops.executors.BoundedExecutor.submit>}); used for large
        bodies. It may fail with L{Overloaded} (answered 503), and skips
        the job if C{alive()} is false when its turn comes.
    @param on_big_body_done: called with a large body's size once its
        request is over (to give the memory back, see
        L{llmgate.ops.memory.Trimmer}).
    """

    isLeaf = True

    def __init__(
        self,
        config: Config,
        http: Any,
        clock: Any,
        accounting: Any,
        parse_in_thread: Optional[Callable[..., Any]] = None,
        coalesce: bool = False,
        on_big_body_done: Optional[Callable[[int], Any]] = None,
        quotas: Optional[Quotas] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.http = http
        self.clock = clock
        self.accounting = accounting
        self._parse_in_thread = parse_in_thread
        self._on_big_body_done = on_big_body_done
        self.active = ActiveRelays()
        self._coalescer = Coalescer(clock) if coalesce else None
        # Start it (it is a Service) to enforce the relays' timeouts.
        self.watchdog = Watchdog(clock, self.active)
        self.draining = False
        # Called once per stream started upstream (the collector's young
        # collections: llmgate.ops.gcstats.YoungCollections.stream_started).
        self.stream_started: Callable[[], None] = lambda: None
        # Routing: the deployment pick's randomness (injected by tests) and
        # each deployment's breaker, kept across reloads.
        self.rng = rng if rng is not None else random.Random()
        self.breakers = Breakers(clock)
        # Each hedging model's policy and counts (the hedge cap), kept
        # across reloads.
        self.hedges: dict[str, HedgeBudget] = {}
        # Limits and budgets: every usage record settles its request's
        # reservation (the same record the ledger and metrics get).
        self.quotas = quotas if quotas is not None else Quotas(clock)
        if hasattr(accounting, "on_settle"):
            accounting.on_settle = self.quotas.settle
            accounting.on_charge = self.quotas.charge
        # Refusals and budget left, to the accounting's metrics.
        self.quotas.on_refuse = self._count_refusal
        self.quotas.on_spend = self._budget_left
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """
        Serve requests from now on with C{config} (a SIGHUP reload). Relays
        in flight hold their own provider, model and timeouts, so they
        finish on the config they started with.
        """
        self.config = config
        self.keys = keymod.store_for(config.keys, config.key_records)
        r = config.routing
        self.breakers.configure(
            r.breaker_failures, r.breaker_cooldown, r.breaker_failure_ratio, r.breaker_window,
            r.breaker_min_requests, balance.configured_keys(config),
        )
        hedges = {}
        for name, m in config.models.items():
            if m.hedge_after is None:
                continue
            budget = self.hedges.get(name) or HedgeBudget(m.hedge_after, m.hedge_max_fraction)
            budget.configure(m.hedge_after, m.hedge_max_fraction)
            hedges[name] = budget
        self.hedges = hedges

    # -- dispatch ------------------------------------------------------------

    def render(self, request: Any) -> Any:
        ids_for(request)
        path = request.path.split(b"?", 1)[0]
        if len(path) > 1:
            path = path.rstrip(b"/")
        endpoint = dialects.ENDPOINTS.get(path)
        kind = dialects.kind_for_path(path)
        if endpoint is not None:
            if request.method != b"POST":
                self._rejected(request, path, 405)
                return _write_error(
                    request, kind, 405, f"method {request.method.decode('latin-1')} not allowed on {path.decode('latin-1')}",
                    headers={b"allow": b"POST"},
                )
            return self._render_relay(request, endpoint)
        if path in _GET_ROUTES:
            if request.method not in (b"GET", b"HEAD"):
                return _write_error(
                    request, kind, 405, "method not allowed", headers={b"allow": b"GET"}
                )
            if path == b"/healthz":
                request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
                return b'{"status":"ok"}'
            return self._render_models(request)
        self._rejected(request, path, 404)
        return _write_error(
            request, kind, 404, f"no route for {path.decode('latin-1')}", code="not_found"
        )

    def _render_models(self, request: Any) -> bytes:
        # -- GET /v1/models: what this caller can actually be served --
        # The configured model names whose provider exists and which the
        # caller's key may use.  Names a default provider would take are
        # not listed: any name goes there, and the gateway cannot know
        # which the provider serves.
        key_name = self.authenticate(request)
        if key_name is None:
            return _write_error(request, "openai", 401, "invalid or missing gateway key", code="invalid_api_key")
        key = self.keys.by_name.get(key_name)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": m.provider}
            for name, m in sorted(self.config.models.items())
            if m.provider in self.config.providers and (key is None or key.allows(name))
        ]
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        return json.dumps({"object": "list", "data": data}).encode()

    @property
    def keyed(self) -> bool:
        """
        Whether gateway keys are configured; without them the edge admits
        only loopback clients (see L{llmgate.edge.admission}).
        """
        return bool(len(self.keys))

    def authenticate(self, request: Any) -> Optional[str]:
        """
        The name of the gateway key the request carries, C{"anonymous"} when
        no keys are configured, or L{None} when it carries no valid key.

        The edge calls this as soon as the headers arrive, before reading
        the body; two C{Authorization} or two C{x-api-key} headers are no
        valid key (which one would be billed?).
        """
        if not len(self.keys):
            return "anonymous"
        key = self.keys.find(keymod.presented_secret(request.requestHeaders))
        if key is None or key.expired(self.clock.seconds()):
            return None
        return key.name

    def unauthenticated(self, request: Any) -> str:
        """
        Why L{authenticate} refused the request, for its 401.  Called once
        per such refusal (by the edge, or here), so it counts the refusal
        in the metrics too (reason expired, or invalid_key).
        """
        key = self.keys.find(keymod.presented_secret(request.requestHeaders))
        if key is not None and key.expires is not None:
            self._count_refusal(key.name, "expired")
            return f"this gateway key expired at {keymod.format_time(key.expires)}"
        self._count_refusal("", "invalid_key")
        return "invalid or missing gateway key"

    # -- per-key metrics --
    def _count_refusal(self, key_name: str, reason: str) -> None:
        metrics = getattr(self.accounting, "metrics", None)
        if metrics is not None:
            metrics.rejected(key_name, reason)

    def _budget_left(self, key_name: str, remaining: float) -> None:
        metrics = getattr(self.accounting, "metrics", None)
        if metrics is not None:
            metrics.budget_left(key_name, remaining)

    # -- relay ---------------------------------------------------------------

    def _render_relay(self, request: Any, endpoint: dialects.Endpoint) -> Any:
        kind = endpoint.kind
        if self.draining:
            self._rejected(request, endpoint.path, 503)
            request.setHeader(b"connection", b"close")
            return _write_error(
                request, kind, 503, "the gateway is shutting down", headers={b"retry-after": b"1"}
            )
        key_name = self.authenticate(request)
        if key_name is None:
            self._rejected(request, endpoint.path, 401)
            return _write_error(
                request, kind, 401, self.unauthenticated(request), code="invalid_api_key"
            )
        body = request.content.getvalue()
        # The request's buffer holds the same bytes: from here on only the
        # parse (and then the relay) keeps them, so they go when it does.
        # (None, not an empty buffer: Twisted's Request ends with either,
        # and a stream keeps one tracked object fewer.)
        request.content = None
        if len(body) > _THREAD_PARSE_BYTES and self._parse_in_thread is not None:
            d = self._parse_in_thread(
                _parse_body, body, size=len(body), alive=lambda: not request._disconnected
            )
            # A client that hangs up while its body waits for a thread takes
            # the job (and its body) out of the queue.
            request.notifyFinish().addErrback(lambda _: d.cancel())
            if self._on_big_body_done is not None:
                n = len(body)
                request.notifyFinish().addBoth(lambda _: self._on_big_body_done(n))  # type: ignore[misc]
            d.addCallback(self._relay, request, endpoint, key_name, body)
            del body
            d.addErrback(self._relay_failed, request, endpoint, key_name)
            return NOT_DONE_YET
        # A small body: parsed and relayed in this call, without a Deferred
        # chain (its allocations and callbacks were ~2 us per request).
        try:
            started = self._relay(_parse_body(body), request, endpoint, key_name, body)
        except Exception:
            self._relay_failed_now(Failure(), request, endpoint, key_name)
            return NOT_DONE_YET
        if isinstance(started, Deferred):
            # A large rewritten body is serialized in a thread.
            started.addErrback(self._relay_failed, request, endpoint, key_name)
        return NOT_DONE_YET

    def _relay_failed_now(self, failure: Failure, request: Any, endpoint: dialects.Endpoint, key_name: str) -> None:
        """L{_relay_failed} outside a Deferred: its own failure is logged, as a Deferred's would be."""
        try:
            self._relay_failed(failure, request, endpoint, key_name)
        except Exception:
            log.failure("answering a refused request failed")

    def _rejected(self, request: Any, path: bytes, status: int, key_name: str = "", model: str = "", outcome: str = "rejected") -> None:
        self.accounting.rejected(
            path.decode("latin-1"), status, key_name, model, request.received, outcome=outcome, **_who(request)
        )

    def _relay_failed(self, failure: Any, request: Any, endpoint: dialects.Endpoint, key_name: str) -> None:
        kind = endpoint.kind
        headers = None
        if failure.check(CancelledError):
            # Its client left while the body waited for (or was in) a
            # parse thread: still one record.
            self._rejected(request, endpoint.path, 0, key_name, outcome="client_cancelled")
            return
        if failure.check(_BadRequest):
            e = failure.value
            status, args = e.status, (e.message, e.code, e.param)
            headers = e.headers
        elif failure.check(Overloaded):
            status, args = 503, ("the gateway is overloaded; retry shortly", None, None)
            headers = {b"retry-after": b"1"}
        else:
            log.failure("failed to start relay", failure)
            status, args = 500, ("internal gateway error", None, None)
        self._rejected(request, endpoint.path, status, key_name, getattr(failure.value, "model", ""))
        if request._disconnected or request.finished:
            return
        request.write(_write_error(request, kind, status, *args, headers=headers))
        request.finish()

    def _relay(self, doc: dict[str, Any], request: Any, endpoint: dialects.Endpoint, key_name: str, body: bytes) -> Any:
        if request._disconnected:
            # Gone while its body was being parsed: still one record.
            self.accounting.rejected(
                endpoint.path.decode(), 0, key_name, str(doc.get("model", "")), len(body), outcome="client_cancelled",
                **_who(request),
            )
            return None
        model = doc.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest(400, "you must provide a model parameter", param="model")
        key = self.keys.by_name.get(key_name)
        if key is None and len(self.keys):
            # Revoked by a reload while its body was being read.
            self._count_refusal("", "invalid_key")
            raise _BadRequest(401, "invalid or missing gateway key", code="invalid_api_key", model=model)
        if key is not None and not key.allows(model):
            self._count_refusal(key_name, "model_not_allowed")
            raise _BadRequest(
                403, f"this gateway key may not use the model {model!r}", code="permission_error", param="model", model=model
            )
        try:
            tags = balance.request_tags(request.requestHeaders.getRawHeaders(balance.TAGS_HEADER))
        except ValueError as e:
            raise _BadRequest(400, str(e), model=model) from None
        groups = balance.plan(self.config, endpoint.kind, model, tags)
        if groups == []:
            raise _BadRequest(
                400, f"no deployment of the model {model!r} carries the tags {', '.join(tags)} (x-llmgate-tags)",
                param="model", model=model,
            )
        if groups is None:
            raise _BadRequest(
                404,
                f"the model {model!r} does not exist or you do not have access to it",
                code="model_not_found",
                param="model",
                model=model,
            )
        routing = self.config.routing
        dep = balance.first(groups, self.breakers, self.rng, routing.balance)
        if dep is None:
            # Every deployment's breaker is open (or it asked us to wait):
            # answer at once rather than make the client wait for a failure.
            wait = max(1, math.ceil(balance.wait(groups, self.breakers)))
            raise _BadRequest(
                503,
                f"every deployment of the model {model!r} is failing; retry in {wait} s",
                model=model,
                headers={b"retry-after": str(wait).encode()},
            )
        provider = self.config.providers[dep.provider]
        upstream_model = dep.upstream_model
        route = (groups, dep)
        streamed = endpoint.streams and doc.get("stream") is True
        rewrite = False
        if upstream_model != model:
            doc["model"] = upstream_model
            rewrite = True
        strip_usage = False
        client_opts = "stream_options" in doc
        if (
            streamed
            and self.config.accounting_enabled
            and endpoint.api in ("openai.chat", "openai.completions")
        ):
            opts = doc.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                # Ask upstream for the usage chunk, and take it back out
                # before the client sees a shape it did not ask for.
                opts = dict(opts) if isinstance(opts, dict) else {}
                opts["include_usage"] = True
                doc["stream_options"] = opts
                strip_usage = True
                rewrite = True
        if rewrite and strip_usage and upstream_model == model and not client_opts:
            # Only the usage request to add: splice it in, leaving the
            # client's bytes as they were (and skipping a full re-dump).
            start = body.index(b"{") + 1
            body = body[:start] + b'"stream_options":{"include_usage":true},' + body[start:]
            rewrite = False
        adm = _Admission(
            request, endpoint, key_name, doc, body, model, provider, upstream_model, streamed, strip_usage, route
        )
        if rewrite:
            if len(body) > _THREAD_PARSE_BYTES and self._parse_in_thread is not None:
                d = self._parse_in_thread(
                    _serialize, doc, size=len(body), alive=lambda: not request._disconnected
                )
                d.addCallback(self._serialized, adm)
                return d
            adm.body = _serialize(doc)
        self._start(adm)
        return None

    def _serialized(self, body: bytes, adm: _Admission) -> None:
        adm.body = body
        self._start(adm)

    def _start(self, adm: _Admission) -> None:
        request = adm.request
        if request._disconnected:
            self.accounting.rejected(
                adm.endpoint.path.decode(), 0, adm.key_name, adm.model, len(adm.body), outcome="client_cancelled",
                **_who(request),
            )
            return
        reservation = self._reserve(
            request, adm.endpoint, adm.key_name, adm.doc, len(adm.body), adm.model, adm.upstream_model
        )
        if isinstance(reservation, Deferred):
            # The limit state is shared (Redis): go on when it answers.
            reservation.addCallback(self._reserved, adm)
            reservation.addErrback(lambda f: log.failure("admission failed", f))
            return
        self._launch(adm, reservation)

    def _reserved(self, reservation: Any, adm: _Admission) -> None:
        request = adm.request
        if reservation is not None and reservation is not False and request._disconnected:
            # Gone while the reservation was made: give it back.
            self.quotas.release(reservation)
            self.accounting.rejected(
                adm.endpoint.path.decode(), 0, adm.key_name, adm.model, len(adm.body), outcome="client_cancelled",
                **_who(request),
            )
            return
        self._launch(adm, reservation)

    def _launch(self, adm: _Admission, reservation: Any) -> None:
        request, endpoint, key_name, doc, body = adm.request, adm.endpoint, adm.key_name, adm.doc, adm.body
        model, provider, upstream_model = adm.model, adm.provider, adm.upstream_model
        streamed, strip_usage, route = adm.streamed, adm.strip_usage, adm.route
        if reservation is False:
            return
        self.stream_started()
        ids = ids_for(request)
        ex = new_exchange(
            request_id=ids.gateway,
            client_request_id=ids.client,
            client=_client_host(request),
            started=self.clock.seconds(),
            key_name=key_name,
            endpoint=endpoint,
            model=model,
            provider=provider,
            upstream_model=upstream_model,
            body=doc,
            bytes_in=request.received,
            streamed=streamed,
        )
        if reservation is not None:
            self.quotas.hold(ex.request_id, reservation)
        ex.counter = self.accounting.counter(ex, strip_usage)
        groups, dep = route
        Attempts(
            request=request,
            http=self.http,
            clock=self.clock,
            timeouts=self.config.timeouts,
            routing=self.config.routing,
            breakers=self.breakers,
            providers=self.config.providers,
            rng=self.rng,
            exchange=ex,
            groups=groups,
            doc=doc,
            body=body,
            visible_id=ids.visible,
            accounting=self.accounting,
            active=self.active,
            coalescer=self._coalescer,
            done=self.accounting.finished,
            hedge=self.hedges.get(model),
            metrics=getattr(self.accounting, "metrics", None),
        ).start(dep)

    # -- limits and budgets ---------------------------------------------------

    def _reserve(self, request: Any, endpoint: dialects.Endpoint, key_name: str, doc: dict[str, Any], size: int, model: str, upstream_model: str) -> Any:
        """
        Reserve the request's estimate against its key's limits and budget
        (L{llmgate.policy.limits}): the reservation (L{None} for a key
        without limits), or C{False} once it was answered 429 (or 403, 503).
        """
        key = self.keys.by_name.get(key_name)
        if key is None or (not key.limits.any() and not key.per_model and key.budget_usd is None):
            return None
        tokens = estimate_tokens(endpoint.api, size, doc, self.config.default_output_tokens)
        cost = _estimated_cost(self.accounting.prices, upstream_model, model, endpoint.api, tokens, size)
        verdict = self.quotas.admit(key, model, endpoint.kind, tokens, cost)
        if isinstance(verdict, Deferred):
            return verdict.addCallback(self._answer, request, endpoint, key_name, model)
        return self._answer(verdict, request, endpoint, key_name, model)

    def _answer(self, verdict: Any, request: Any, endpoint: dialects.Endpoint, key_name: str, model: str) -> Any:
        """The verdict's reservation, or C{False} once its refusal is sent."""
        if request._disconnected and verdict.reservation is None:
            # Gone while the shared state answered: recorded, nothing to send.
            self._rejected(request, endpoint.path, 0, key_name, model, outcome="client_cancelled")
            return False
        for name, value in verdict.headers.items():
            request.responseHeaders.setRawHeaders(name, [value])
        if verdict.reservation is not None:
            return verdict.reservation
        self._rejected(request, endpoint.path, verdict.status, key_name, model)
        request.write(_write_error(request, endpoint.kind, verdict.status, verdict.message, code=verdict.code, headers=verdict.headers))
        request.finish()
        return False


def _estimated_cost(prices: Any, upstream_model: str, model: str, api: str, tokens: int, size: int) -> Optional[float]:
    """The price of an estimate: the body's tokens as input, the rest as output."""
    tin = min(tokens, -(-size // 4))
    usage = Usage(input_tokens=tin, output_tokens=tokens - tin, source="estimated")
    cost = prices.cost(upstream_model, usage)
    if cost is None and model != upstream_model:
        cost = prices.cost(model, usage)
    return cost

# -*- test-case-name: tests.accounting.test_recorder -*-
"""
Accounting: a counter per request on the relay path, and, when the request
ends, one access-log line and exactly one usage record.

The per-event work on the relay path is the SSE parser plus the usage
accumulator, which JSON-parses only the few events that can carry usage.
Everything heavier -- parsing a large non-streaming body, counting a prompt
or a cancelled stream's text with tiktoken -- runs off the reactor thread
after the request has ended.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from llmgate.accounting import tokens
from llmgate.accounting.clip import clip, clip_record
from llmgate.accounting.ledger import UsageRecord
from llmgate.accounting.prices import PriceTable
from llmgate.relay.stream import Exchange
from llmgate.dialects.sse import EventStreamParser, EventTooLarge
from llmgate.accounting.usage import Usage, has_nonnull_usage, is_usage_only_chunk, make_accumulator

log = Logger(namespace="llmgate.access")

# A non-streaming body is kept for its usage up to this size; past it the
# usage is estimated (embeddings of thousands of inputs can be large).
_BODY_CAP = 16 * 1024 * 1024
# Bodies above this are parsed off the reactor thread.
_THREAD_BYTES = 128 * 1024

_EVENT_SPLIT = re.compile(rb"((?:\r\n|\r|\n)(?:\r\n|\r|\n))")


def strip_usage_chunks(data: bytes) -> bytes:
    """
    Remove OpenAI usage-only chunks (C{"choices": []} with usage) from
    whole events, leaving every other byte as it was.
    """
    parts = _EVENT_SPLIT.split(data)
    out = []
    # parts alternates event, separator, event, separator, ..., tail
    for i in range(0, len(parts), 2):
        event = parts[i]
        sep = parts[i + 1] if i + 1 < len(parts) else b""
        payload = event[5:].lstrip(b" ") if event.startswith(b"data:") else b""
        if payload and is_usage_only_chunk(payload):
            continue
        out.append(event)
        out.append(sep)
    return b"".join(out)


class RequestCounter:
    """
    Fed every relayed chunk of one response; knows the usage the provider
    reported and keeps what an estimate needs.
    """

    __slots__ = ("api", "acc", "sse", "_parser", "_body", "_body_len", "_strip", "unparsed")

    def __init__(self, api: str, strip_usage: bool) -> None:
        self.api = api
        self.acc = make_accumulator(api)
        self.sse = True
        self._parser = EventStreamParser()
        self._body: list[bytes] = []
        self._body_len = 0
        self._strip = strip_usage
        self.unparsed = False

    def feed(self, data: bytes) -> None:
        if self.sse:
            try:
                events = self._parser.feed(data)
            except EventTooLarge:
                self.unparsed = True
                return
            on_event = self.acc.on_event
            for name, payload in events:
                on_event(name, payload)
        elif self._body_len < _BODY_CAP:
            self._body.append(data)
            self._body_len += len(data)
        else:
            self.unparsed = True

    def strip(self, data: bytes) -> bytes:
        if self._strip and has_nonnull_usage(data):
            return strip_usage_chunks(data)
        return data

    def body(self) -> Optional[bytes]:
        """The non-streaming body, if it was kept whole."""
        if self.sse or self.unparsed or not self._body:
            return None
        return b"".join(self._body)


def _reported(counter: RequestCounter) -> Optional[Usage]:
    """The provider's usage, if it reported a complete one."""
    acc = counter.acc
    usage = acc.usage
    if usage is not None and acc.complete and not acc.error and usage.output_tokens is not None:
        return usage
    return None


def estimate_usage(counter: RequestCounter, model: str, request_body: dict[str, Any]) -> Usage:
    """
    Estimate with tiktoken what the provider did not report: the prompt
    (unless the provider gave its input count) and the text relayed so far.
    Runs in a thread: a prompt may be hundreds of thousands of tokens.
    """
    acc = counter.acc
    usage = acc.usage
    est = Usage(source="estimated")
    if usage is not None and usage.input_tokens is not None:
        est.input_tokens = usage.input_tokens
        est.cached_input_tokens = usage.cached_input_tokens
        est.cache_creation_tokens = usage.cache_creation_tokens
    else:
        est.input_tokens = tokens.estimate_prompt_tokens(model, request_body, counter.api)
    text = acc.sample_text()
    out = tokens.count_text(model, text) if text else 0
    sampled = len(text.encode("utf-8")) if text else 0
    if sampled and acc.text_bytes > sampled:
        # Past the kept sample only bytes were counted: scale by the
        # sample's bytes per token.
        out = round(out * acc.text_bytes / sampled)
    if usage is not None and usage.output_tokens is not None:
        out = max(out, usage.output_tokens)
    est.output_tokens = out
    return est


class Accounting:
    """
    Makes a L{RequestCounter} per request and turns each finished
    L{Exchange} into an access-log line and one L{UsageRecord}.

    @param clock: C{IReactorTime}.
    @param ledger: where usage records go (L{llmgate.accounting.ledger.Ledger}), or
        L{None}.
    @param in_thread: C{f(*args) -> Deferred} running C{f} off the reactor
        thread; L{None} runs inline (tests).
    """

    def __init__(
        self,
        clock: Any,
        ledger: Any = None,
        enabled: bool = True,
        prices: Optional[PriceTable] = None,
        in_thread: Optional[Callable[..., Deferred[Any]]] = None,
        metrics: Any = None,
    ) -> None:
        self.clock = clock
        self.metrics = metrics
        self.ledger = ledger
        self.enabled = enabled
        self.prices = prices if prices is not None else PriceTable.from_config({})
        self._in_thread = in_thread
        self.finished_count = 0
        self.errors = 0
        # Records still being counted (some in threads), and who waits for
        # them to be handed to the ledger at shutdown.
        self._counting = 0
        self._idle_waiters: list[Deferred[None]] = []

    def counter(self, exchange: Exchange, strip_usage: bool) -> Optional[RequestCounter]:
        """Called as a relay starts: its counter, or None if not counting."""
        if self.metrics is not None:
            self.metrics.active.inc()
        if not self.enabled:
            return None
        return RequestCounter(exchange.endpoint.api, strip_usage)

    def finished(self, ex: Exchange) -> None:
        self.finished_count += 1
        if self.metrics is not None:
            self.metrics.active.dec()
        self._access_log(ex)
        counter = ex.counter
        if counter is None:
            self._record(ex, None)
            return
        body = counter.body()
        if body is not None:
            d = self._run(counter.acc.on_body, body, heavy=len(body) > _THREAD_BYTES)
        else:
            d = maybeDeferred(lambda: None)
        d.addCallback(lambda _: self._usage(ex, counter))
        d.addCallback(lambda usage: self._record(ex, usage))
        d.addErrback(self._failed, ex)
        self._counting += 1
        d.addBoth(self._counted)

    def _counted(self, result: Any) -> Any:
        self._counting -= 1
        if not self._counting:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)
        return result

    def idle(self) -> Deferred[None]:
        """
        Fires once every finished request's record has been handed to the
        ledger (estimates run in threads): the drain waits for it so that a
        clean stop loses no record.
        """
        if not self._counting:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _run(self, f: Callable[..., Any], *args: Any, heavy: bool) -> Deferred[Any]:
        if heavy and self._in_thread is not None:
            return self._in_thread(f, *args)
        return maybeDeferred(f, *args)

    def _usage(self, ex: Exchange, counter: RequestCounter) -> Any:
        reported = _reported(counter)
        if reported is not None:
            return reported
        # Estimate only when the provider may bill without telling us: the
        # request reached it and was not refused with an error status.
        if ex.status not in (0, 200) or ex.phase == "connect":
            return counter.acc.usage
        return self._run(estimate_usage, counter, ex.upstream_model, ex.body, heavy=True)

    def _failed(self, failure: Any, ex: Exchange) -> None:
        # A counting bug must never lose the record: keep it without tokens.
        self.errors += 1
        log.failure("counting failed for {rid}", failure, rid=ex.request_id)
        self._record(ex, None)

    def _record(self, ex: Exchange, usage: Optional[Usage]) -> None:
        counter = ex.counter
        upstream_id = ex.upstream_request_id
        if counter is not None and counter.acc.upstream_id:
            upstream_id = counter.acc.upstream_id
        outcome = ex.outcome
        if outcome == "completed" and counter is not None and counter.acc.error:
            outcome = "upstream_error"
        cost = None
        if usage is not None:
            cost = self.prices.cost(ex.upstream_model, usage)
            if cost is None and ex.model != ex.upstream_model:
                cost = self.prices.cost(ex.model, usage)
        ttft = ex.ttft
        rec = UsageRecord(
            request_id=ex.request_id,
            ts=ex.wall_start,
            key_name=ex.key_name,
            route=ex.endpoint.path.decode(),
            model=ex.model,
            provider=ex.provider.name,
            upstream_model=ex.upstream_model,
            upstream_id=upstream_id,
            status=ex.status,
            streamed=ex.streamed,
            outcome=outcome,
            phase=ex.phase,
            input_tokens=None if usage is None else usage.input_tokens,
            output_tokens=None if usage is None else usage.output_tokens,
            cached_input_tokens=0 if usage is None else usage.cached_input_tokens,
            cache_creation_tokens=0 if usage is None else usage.cache_creation_tokens,
            reasoning_tokens=0 if usage is None else usage.reasoning_tokens,
            source=None if usage is None else usage.source,
            cost_usd=cost,
            ttft_ms=None if ttft is None else ttft * 1000.0,
            duration_ms=ex.duration * 1000.0,
            bytes_in=ex.bytes_in,
            bytes_out=ex.bytes_out,
        )
        self._sink(rec)

    def _sink(self, rec: UsageRecord) -> None:
        rec = clip_record(rec)
        if self.metrics is not None:
            self.metrics.observe(rec)
        if self.ledger is not None:
            self.ledger.record(rec)

    def rejected(
        self, route: str, status: int, key_name: str = "", model: str = "", bytes_in: int = 0, outcome: str = "rejected"
    ) -> None:
        """
        Record a request the gateway answered itself without calling an
        upstream (bad JSON, unknown model, bad key, body too large): every
        request gets its one record, with no tokens.
        """
        now = time.time()
        route, model = clip(route), clip(model)
        log.info(
            "POST {route} model={model} key={key} status={status} outcome={outcome}",
            route=route,
            outcome=outcome,
            model=model or "-",
            key=key_name or "-",
            status=status,
        )
        self._sink(
            UsageRecord(
                request_id=uuid.uuid4().hex,
                ts=now,
                key_name=key_name,
                route=route,
                model=model,
                provider="",
                upstream_model="",
                upstream_id=None,
                status=status,
                streamed=False,
                outcome=outcome,
                phase=None,
                input_tokens=None,
                output_tokens=None,
                cached_input_tokens=0,
                cache_creation_tokens=0,
                reasoning_tokens=0,
                source=None,
                cost_usd=None,
                ttft_ms=None,
                duration_ms=0.0,
                bytes_in=bytes_in,
                bytes_out=0,
            )
        )

    def _access_log(self, ex: Exchange) -> None:
        # One pre-built line and a single format field: twisted.logger's
        # PEP 3101 formatting of a dozen fields cost ~5% of the CPU per
        # request at a thousand requests a second.
        ttft = ex.ttft
        log.info(
            "{line}",
            line=(
                f"POST {ex.endpoint.path.decode()} model={clip(ex.model)} provider={ex.provider.name} "
                f"key={ex.key_name} status={ex.status} outcome={ex.outcome}"
                f"{'/' + ex.phase if ex.phase else ''} stream={int(ex.streamed)} "
                f"ttft_ms={'-' if ttft is None else f'{ttft * 1000:.1f}'} ms={ex.duration * 1000:.1f} "
                f"bytes_out={ex.bytes_out} id={ex.request_id}"
            ),
        )

# -*- test-case-name: tests.accounting.test_recorder -*-
"""
Accounting: an open ledger row and a counter per request as it is admitted,
its progress about once a second while it relays, and, when the request
ends, one access-log line and exactly one usage record (replacing the open
row).

The per-read work on the relay path is a few byte searches over the whole
events the relay framed (L{RequestCounter.relay}); only the blocks with
the events that can carry an id, usage, an error or the end go through the
SSE parser and the usage accumulator, which JSON-parses only those.
Everything heavier -- parsing a large non-streaming body, counting a prompt
or a cancelled stream's text with tiktoken -- runs off the reactor thread
after the request has ended.  A non-streaming body is kept whole up to
1 MiB; past that only its first and last 64 KiB, where its top-level
C{usage} is (L{llmgate.accounting.bigbody}): bounded memory per request,
and the reported usage of a body of any size.

The served model: a router deployment (Azure's C{model-router}) or a
fallback list (OpenRouter's C{models}) serves another model than the one
asked for, and the response names it (C{model} of a body or of the first
chunks, Anthropic's C{message_start}, Responses' C{response.created}).  It
is found with a byte search and one regex on the first events only, and
the request is priced by it (L{Accounting.cost}).

Usage the gateway asked for (it injected C{stream_options.include_usage})
is taken back out before the client sees it (L{strip_usage_chunks}).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import LogLevel, Logger
from twisted.python.failure import Failure

from llmgate.accounting import tokens
from llmgate.accounting.bigbody import HeadTail
from llmgate.accounting.clip import clip, clip_record
from llmgate.accounting.ledger import OPEN, Progress, UsageRecord
from llmgate.accounting.prices import PriceTable
from llmgate.relay.stream import Exchange
from llmgate.dialects.sse import EventStreamParser, EventTooLarge
from llmgate.accounting.usage import Usage, has_nonnull_usage, loads_json, make_accumulator

_ACCESS = "llmgate.access"
_INFO = LogLevel.info
log = Logger(namespace=_ACCESS)

# A non-streaming body is kept whole for its usage (and its text, for an
# estimate if it has no usage) up to this size; past it only its head and
# tail (embeddings of thousands of inputs can be tens of MB).
_BODY_CAP = 1024 * 1024
# Bodies above this are parsed off the reactor thread.
_THREAD_BYTES = 128 * 1024

# For the progress of open requests only: a rough English average, so an
# interrupted stream's row carries a ballpark, not a tiktoken count.
_BYTES_PER_TOKEN = 4

_EVENT_SPLIT = re.compile(rb"((?:\r\n|\r|\n)(?:\r\n|\r|\n))")

# The (still JSON-escaped) string value of a "model" key.  Outside a JSON
# string every quote is structural and inside one every quote is escaped,
# so this matches only a real "model" key with a string value.
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
# Events searched for the served model before giving up: it is in the first
# (chat chunk, message_start, response.created) or, on Azure, the second
# (after a prompt_filter_results chunk with an empty model).
_SEEK_EVENTS = 8
# A served model name longer than this is cut: it is a label, not a payload.
_MAX_MODEL = 200
# The events after which a stream is whole, whatever the connection does.
# Chat and completions streams complete on their usage chunk, which comes
# before the terminal [DONE]; the other streaming APIs complete on theirs.
_USAGE_BEFORE_TERMINAL = frozenset(["openai.chat", "openai.completions"])


def _model_name(raw: bytes) -> Optional[str]:
    """A served model's name from its raw JSON string value; None if empty."""
    if not raw:
        return None
    if b"\\" in raw:
        try:
            name = json.loads(b'"' + raw + b'"')
        except ValueError:
            name = raw.decode("utf-8", "replace")
    else:
        name = raw.decode("utf-8", "replace")
    return name[:_MAX_MODEL] or None


def _without_usage(payload: bytes) -> Optional[bytes]:
    """
    A chat chunk's payload with its (non-null) C{usage} removed: C{b""} if
    the chunk is a usage-only one (C{"choices": []}) to drop whole, the
    chunk re-serialized without C{usage} if usage rides on a content or
    finish chunk, None to keep it as it is.
    """
    try:
        obj = loads_json(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("usage") is None:
        return None
    if obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
        return b""
    del obj["usage"]
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def strip_usage_chunks(data: bytes) -> bytes:
    """
    Take the usage the gateway asked for back out of whole chat events: drop
    the usage-only chunks (C{"choices": []} with usage), and remove the
    C{usage} member of a chunk that carries it with its choices (some
    providers put it on the finish chunk).  Only events with a non-null
    C{usage} are parsed (and only those are re-serialized); every other byte
    is left as it was.
    """
    parts = _EVENT_SPLIT.split(data)
    out = []
    # parts alternates event, separator, event, separator, ..., tail
    for i in range(0, len(parts), 2):
        event = parts[i]
        sep = parts[i + 1] if i + 1 < len(parts) else b""
        payload = event[5:].lstrip(b" ") if event.startswith(b"data:") else b""
        if payload and has_nonnull_usage(payload):
            rest = _without_usage(payload)
            if rest == b"":
                continue
            if rest is not None:
                event = b"data: " + rest
        out.append(event)
        out.append(sep)
    return b"".join(out)


class RequestCounter:
    """
    Fed every relayed chunk of one response; knows the usage the provider
    reported and keeps what an estimate needs.
    """

    __slots__ = (
        "api", "acc", "sse", "_parser", "_body", "_body_len", "_ends", "_strip", "unparsed",
        "served", "terminal", "_seek",
    )

    def __init__(self, api: str, strip_usage: bool) -> None:
        self.api = api
        self.acc = make_accumulator(api)
        self.sse = True
        self._parser = EventStreamParser()
        self._body: list[bytes] = []
        self._body_len = 0
        self._ends: Optional[HeadTail] = None
        self._strip = strip_usage
        self.unparsed = False
        # The model the stream's first events named (see _seek_model).
        self.served: Optional[str] = None
        self._seek = _SEEK_EVENTS
        # The stream's terminal event ([DONE], message_stop,
        # response.completed or .incomplete) was fed.
        self.terminal = False

    def relay(self, data: bytes) -> bytes:
        """
        Account for C{data}, the whole events (or body bytes) the relay is
        about to write, and return what to write: C{data} without the
        usage the gateway asked for (L{strip}).

        The relay's framer already found the events' end, so a block of
        plain content events is not framed again: the accumulator's byte
        searches (L{UsageAccumulator.on_block}) show that nothing in it is
        to parse, and it is held as it is for its text, extracted only if
        an estimate or the progress needs it. Only the blocks with the
        stream's first events (id, served model), its usage, errors and
        end go through the parser, event by event.
        """
        if (
            self.sse
            and self._seek <= 0
            and data.endswith(b"\n\n")
            and data.find(b"\r") < 0
            and self._parser.between_events
            and self.acc.on_block(data)
        ):
            if self._strip and self.api not in _USAGE_BEFORE_TERMINAL:
                return self.strip(data)
            # The chat accumulators hold no block with a non-null usage:
            # nothing to strip.
            return data
        self.feed(data)
        return self.strip(data)

    def feed(self, data: bytes) -> None:
        if self.sse:
            try:
                events = self._parser.feed(data)
            except EventTooLarge:
                self.unparsed = True
                return
            acc = self.acc
            on_event = acc.on_event
            for name, payload in events:
                on_event(name, payload)
            if self._seek > 0 and events:
                self._seek_model(events)
            # Looked for only once the accumulator saw the stream complete
            # (on these same events, or the usage chunk before [DONE]).
            if acc.complete and not self.terminal:
                if self.api not in _USAGE_BEFORE_TERMINAL:
                    # Anthropic and Responses accumulators complete on the
                    # terminal event itself, however it was named (OpenRouter
                    # sends Responses events as data-only lines).
                    self.terminal = True
                else:
                    for name, payload in events:
                        if payload[:6] == b"[DONE]":
                            self.terminal = True
                            break
        elif self._ends is not None:
            self._ends.feed(data)
        else:
            self._body.append(data)
            self._body_len += len(data)
            if self._body_len > _BODY_CAP:
                ends = self._ends = HeadTail()
                for piece in self._body:
                    ends.feed(piece)
                self._body = []

    def _seek_model(self, events: list[tuple[Optional[bytes], bytes]]) -> None:
        """
        The served model from the first of the first L{_SEEK_EVENTS} events
        that names a non-empty one: a byte search per event, a regex on the
        ones that have a C{"model"} key.  Nothing after that.
        """
        for _, payload in events:
            self._seek -= 1
            if b'"model"' in payload:
                m = _MODEL.search(payload)
                name = _model_name(m.group(1)) if m is not None else None
                if name is not None:
                    self.served = name
                    self._seek = 0
                    return
            if self._seek <= 0:
                return

    def served_model(self) -> Optional[str]:
        """
        The model the response named: from the first events of a stream,
        or the C{model} of a body (once counted).
        """
        if self.served is not None:
            return self.served
        model = self.acc.model
        if isinstance(model, str) and model:
            return model[:_MAX_MODEL]
        return None

    def strip(self, data: bytes) -> bytes:
        if self._strip and has_nonnull_usage(data):
            return strip_usage_chunks(data)
        return data

    def body(self) -> Optional[bytes]:
        """The non-streaming body, if it was kept whole."""
        if self.sse or self.unparsed or not self._body:
            return None
        return b"".join(self._body)

    def ends(self) -> Optional[HeadTail]:
        """The head and tail of a non-streaming body too large to keep."""
        return None if self.sse else self._ends

    @property
    def kept(self) -> int:
        """Bytes of the non-streaming body held."""
        return self._ends.kept if self._ends is not None else sum(map(len, self._body))


def _on_ends(acc: Any, ends: HeadTail) -> None:
    """Account for the top-level members of a body too large to keep."""
    acc.on_object(ends.members())


def _reported(counter: RequestCounter) -> Optional[Usage]:
    """
    The provider's usage, if it reported a complete one: at the end of a
    stream that ended well, or on the error event itself (OpenRouter bills
    the usage its mid-stream error chunk carries).
    """
    acc = counter.acc
    usage = acc.usage
    if usage is None or usage.output_tokens is None:
        return None
    if (acc.complete and not acc.error) or acc.error_usage:
        return usage
    return None


def estimate_usage(counter: RequestCounter, model: str, request_body: Any) -> Usage:
    """
    Estimate with tiktoken what the provider did not report: the prompt
    (unless the provider gave its input count) and the text relayed so far.
    Runs in a thread: a prompt may be hundreds of thousands of tokens.

    C{request_body} is the parsed body, or the bytes sent upstream (what an
    answered stream keeps instead of the parsed body: L{Exchange.body}),
    parsed here, off the reactor thread.
    """
    if isinstance(request_body, (bytes, bytearray)):
        try:
            request_body = json.loads(request_body)
        except ValueError:
            request_body = {}
        if not isinstance(request_body, dict):
            request_body = {}
    acc = counter.acc
    usage = acc.usage
    est = Usage(source="estimated")
    if usage is not None and usage.input_tokens is not None:
        est.input_tokens = usage.input_tokens
        est.cached_input_tokens = usage.cached_input_tokens
        est.cache_creation_tokens = usage.cache_creation_tokens
        est.cache_creation_1h_tokens = usage.cache_creation_1h_tokens
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


# Open requests one progress call reports at most (the ledger asks 20
# times a second): about 1.1 ms of reactor time (~18 us each, mostly
# extracting the held events' text). A process's requests are each
# reported about once a second up to 1,260 open, every N / 1,260 s beyond
# (the same budget as 250 a call at 5 calls a second, in shorter stops).
MAX_PROGRESS_PER_CALL = 63


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
        # Requests admitted and not finished: request_id -> [exchange,
        # bytes_out at the last progress report].
        self._open: dict[str, list[Any]] = {}
        # The open requests still to report in the current progress round
        # (L{progress}), last first, and how many each call takes.
        self._round: list[list[Any]] = []
        self._round_share = 0
        # Called with every final record (L{llmgate.policy.limits.Quotas.settle}):
        # budgets and limits settle on the numbers the ledger gets.
        self.on_settle: Optional[Callable[[UsageRecord], Any]] = None
        # Told of each upstream attempt that served no client but cost
        # something (a hedge that lost): its key's budget pays for it.
        self.on_charge: Optional[Callable[[UsageRecord], Any]] = None
        # OpenTelemetry GenAI metrics and spans (llmgate.ops.otel), fed the
        # finished record: None unless [otel] is configured.
        self.telemetry: Any = None
        if ledger is not None and hasattr(ledger, "progress_source"):
            ledger.progress_source = self.progress

    def counter(self, exchange: Exchange, strip_usage: bool) -> Optional[RequestCounter]:
        """
        Called as a relay starts (the request is admitted): queues its open
        ledger row, so a gateway killed while it relays still leaves a row
        for it; returns its counter, or None if not counting.
        """
        if self.metrics is not None:
            self.metrics.active.inc()
        self._opened(exchange)
        if not self.enabled:
            return None
        return RequestCounter(exchange.endpoint.api, strip_usage)

    def _opened(self, ex: Exchange) -> None:
        later = getattr(self.ledger, "open_later", None)
        if later is not None:
            self._open[ex.request_id] = [ex, 0]
            # Built at the ledger's next batch only if the request has not
            # ended by then (most short requests have: no record to build).
            later(ex.request_id, self._open_record, ex)
            return
        opener = getattr(self.ledger, "open", None)
        if opener is None:
            return
        self._open[ex.request_id] = [ex, 0]
        opener(self._open_record(ex))

    def _open_record(self, ex: Exchange) -> UsageRecord:
        return clip_record(self._make_record(ex, None, OPEN))

    def progress(self, parts: int = 1) -> list[Progress]:
        """
        The progress of open requests that relayed bytes since their last
        report, a C{parts}-th of them per call: the ledger asks C{parts}
        times per progress interval, so every open request is reported
        about once an interval and the work is spread over the calls. One
        call for all of them stopped the reactor for ~20 ms a second at
        1,000 open streams (the held events' text is extracted for the
        estimate), and that was in the TTFT tail. Each
        call takes the next share of a round of the requests open when the
        round began; requests opened since wait for the next round. A call
        reports at most L{MAX_PROGRESS_PER_CALL} requests (about 1 ms), so
        past that many per call the rounds take longer than an interval.

        Cheap per request, on the reactor thread: output tokens not
        reported yet are estimated as text bytes / 4, not with tiktoken.
        """
        out: list[Progress] = []
        round_ = self._round
        if not round_:
            round_.extend(self._open.values())
            round_.reverse()
            share = -(-len(round_) // max(1, parts))
            self._round_share = share if parts <= 1 else min(share, MAX_PROGRESS_PER_CALL)
        now = self.clock.seconds()
        is_open = self._open.get
        for _ in range(min(self._round_share, len(round_))):
            entry = round_.pop()
            ex, seen = entry
            if ex.bytes_out == seen or is_open(ex.request_id) is not entry:
                continue
            entry[1] = ex.bytes_out
            out.append(self._progress(ex, now))
        return out

    def _progress(self, ex: Exchange, now: float) -> Progress:
        upstream_id = ex.upstream_request_id
        est = Usage(source="estimated")
        source = cost = served = None
        counter = ex.counter
        # A JSON body is parsed only once whole: no text to go by before.
        if isinstance(counter, RequestCounter) and counter.sse:
            acc = counter.acc
            upstream_id = acc.upstream_id or upstream_id
            reported = acc.usage
            est.output_tokens = -(-acc.text_bytes // _BYTES_PER_TOKEN)
            if reported is not None:
                # Anthropic reports the prompt as the stream starts.
                est.input_tokens = reported.input_tokens
                est.cached_input_tokens = reported.cached_input_tokens
                est.cache_creation_tokens = reported.cache_creation_tokens
                # For the in-flight cost only (the row's 1-hour count comes
                # with the final record).
                est.cache_creation_1h_tokens = reported.cache_creation_1h_tokens
                est.output_tokens = max(est.output_tokens, reported.output_tokens or 0)
            source = "estimated"
            served = counter.served_model()
            if est.input_tokens is not None:
                # Priced only with both counts: a cost without the prompt
                # would look like a (too small) real one.
                cost = self.cost(ex, served, est)
        ttft = ex.ttft
        return Progress(
            request_id=ex.request_id,
            status=ex.status,
            upstream_id=upstream_id,
            input_tokens=est.input_tokens,
            output_tokens=est.output_tokens,
            cached_input_tokens=est.cached_input_tokens,
            cache_creation_tokens=est.cache_creation_tokens,
            source=source,
            cost_usd=cost,
            ttft_ms=None if ttft is None else ttft * 1000.0,
            duration_ms=(now - ex.started) * 1000.0,
            bytes_out=ex.bytes_out,
            served_model=served,
        )

    def in_flight_cost(self, ex: Exchange) -> Optional[float]:
        """
        The estimated cost so far of a stream being relayed (for the budget
        cut-off, L{llmgate.policy.cutoff}): as L{progress} estimates it,
        with the body's bytes / 4 as its input until the provider reports
        the prompt (OpenAI does only at the end).  L{None} for a JSON body
        or an unpriced model.  Cheap: no tokenizer.
        """
        p = self._progress(ex, self.clock.seconds())
        if p.cost_usd is not None or p.output_tokens is None:
            return p.cost_usd
        est = Usage(input_tokens=-(-ex.bytes_in // _BYTES_PER_TOKEN), output_tokens=p.output_tokens, source="estimated")
        return self.cost(ex, p.served_model, est)

    def cost(self, ex: Exchange, served: Optional[str], usage: Usage) -> Optional[float]:
        """
        The cost of C{usage}, priced by the model that served it.

        When the response named a served model other than the upstream one,
        only its price counts (or, for an OpenRouter-style C{vendor/model}
        name, the price of C{model}): pricing a router's or a fallback's
        tokens at the rate of the model asked for would be a made-up number
        that looks like a real cost, so an unpriced served model leaves the
        cost unknown (C{None}, counted as unpriced by C{llmgate usage};
        C{--by served_model} shows which names need a price).  When the
        response named no model, or the one sent upstream, the upstream
        model's price is used, then the price of the name the client asked
        for.
        """
        prices = self.prices
        if served is not None and served != ex.upstream_model:
            cost = prices.cost(served, usage)
            if cost is None and "/" in served:
                cost = prices.cost(served.rsplit("/", 1)[1], usage)
            return cost
        cost = prices.cost(ex.upstream_model, usage)
        if cost is None and ex.model != ex.upstream_model:
            cost = prices.cost(ex.model, usage)
        return cost

    def finished(self, ex: Exchange) -> None:
        self.finished_count += 1
        self._open.pop(ex.request_id, None)
        if self.metrics is not None:
            self.metrics.active.dec()
        counter = ex.counter
        if counter is None:
            self._record(ex, None)
            return
        body = counter.body()
        ends = counter.ends()
        if body is None and ends is None:
            reported = _reported(counter)
            if reported is not None:
                # The common end of a stream: the provider's usage is
                # known, nothing to parse or estimate. Recorded at once,
                # without a Deferred chain per request.
                try:
                    self._record(ex, reported)
                except Exception:
                    self._failed(Failure(), ex)
                return
        if body is not None:
            d = self._run(counter.acc.on_body, body, heavy=len(body) > _THREAD_BYTES)
        elif ends is not None:
            d = self._run(_on_ends, counter.acc, ends, heavy=True)
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
        served = None
        if isinstance(counter, RequestCounter):
            served = counter.served_model()
        cost = None
        if usage is not None:
            cost = self.cost(ex, served, usage)
        # Logged here, once counted: a body's served model is known only
        # after it was parsed (maybe in a thread).
        rec = clip_record(self._make_record(ex, usage, outcome, upstream_id, cost, served))
        self._access_log(ex, rec)
        self._sink(rec, ex)

    def _make_record(
        self,
        ex: Exchange,
        usage: Optional[Usage],
        outcome: str,
        upstream_id: Optional[str] = None,
        cost: Optional[float] = None,
        served: Optional[str] = None,
    ) -> UsageRecord:
        ttft = ex.ttft
        return UsageRecord(
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
            served_model=served,
            cache_creation_1h_tokens=0 if usage is None else usage.cache_creation_1h_tokens,
            client_request_id=ex.client_request_id,
            attempt=ex.attempt,
            parent_request_id=ex.parent_request_id,
            hedged=ex.hedged,
        )

    def attempt_failed(self, ex: Exchange) -> None:
        """
        An upstream attempt that failed before anything reached the client,
        and was retried (L{llmgate.routing.attempts}): its own record, no
        tokens (the provider answered an error or nothing), linked to the
        client request by C{parent_request_id}. It settles no budget and is
        no request in the metrics: the client request's record does both.
        """
        rec = clip_record(self._make_record(ex, None, "upstream_error", ex.upstream_request_id))
        self._access_log(ex, rec)
        if self.telemetry is not None:
            # Its span, under its request's (llmgate.ops.otel).
            self.telemetry.attempt(rec, ex.provider.kind, ex.started, ex.ended or ex.started)
        if self.ledger is not None:
            self.ledger.record(rec)

    def attempt_counter(self, ex: Exchange) -> Optional[RequestCounter]:
        """
        A counter for another attempt racing the client request C{ex}'s
        (a hedge): no open row (the attempt gets its own record when it
        ends), the same stripping as the request's own counter.
        """
        counter = ex.counter
        if not self.enabled or not isinstance(counter, RequestCounter):
            return None
        return RequestCounter(counter.api, counter._strip)

    def attempt_ended(self, ex: Exchange) -> None:
        """
        An upstream attempt that ended without serving the client (a hedge
        that lost the race, cancelled at once): its own record, with the
        tokens it cost (the provider's, or estimated from the prompt and
        what it streamed), linked by C{parent_request_id}. Its cost is
        charged to its key's budget (L{on_charge}: the provider bills it);
        like L{attempt_failed} it is no request in the metrics.
        """
        counter = ex.counter
        if counter is None:
            self._attempt_record(None, ex)
            return
        d = maybeDeferred(self._usage, ex, counter)
        d.addCallback(self._attempt_record, ex)
        d.addErrback(self._attempt_failed_count, ex)
        self._counting += 1
        d.addBoth(self._counted)

    def _attempt_failed_count(self, failure: Any, ex: Exchange) -> None:
        self.errors += 1
        log.failure("counting failed for {rid}", failure, rid=ex.request_id)
        self._attempt_record(None, ex)

    def _attempt_record(self, usage: Optional[Usage], ex: Exchange) -> None:
        counter = ex.counter
        served = counter.served_model() if isinstance(counter, RequestCounter) else None
        cost = None if usage is None else self.cost(ex, served, usage)
        rec = clip_record(self._make_record(ex, usage, ex.outcome, ex.upstream_request_id, cost, served))
        self._access_log(ex, rec)
        if self.on_charge is not None and rec.cost_usd:
            self.on_charge(rec)
        if self.ledger is not None:
            self.ledger.record(rec)

    def _sink(self, rec: UsageRecord, ex: Optional[Exchange] = None) -> None:
        # rec is clipped (clip_record) by every caller.
        if self.on_settle is not None:
            self.on_settle(rec)
        if self.metrics is not None:
            self.metrics.observe(rec, ex)
        if self.telemetry is not None:
            self.telemetry.observe(rec, ex)
        if self.ledger is not None:
            self.ledger.record(rec)

    def rejected(
        self,
        route: str,
        status: int,
        key_name: str = "",
        model: str = "",
        bytes_in: int = 0,
        outcome: str = "rejected",
        request_id: Optional[str] = None,
        client_request_id: Optional[str] = None,
        method: str = "POST",
        client: str = "",
    ) -> None:
        """
        Record a request the gateway answered itself without calling an
        upstream (bad JSON, unknown model, bad key, body too large): every
        request gets its one record, with no tokens.
        """
        now = time.time()
        route, model = clip(route), clip(model)
        rec = UsageRecord(
            request_id=request_id or uuid.uuid4().hex,
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
            client_request_id=client_request_id,
            attempt=0,
        )
        rec = clip_record(rec)
        _log_access(clip(method), clip(client), rec)
        self._sink(rec)

    # -- access log (one line per request) -----------------------------------

    def _access_log(self, ex: Exchange, rec: UsageRecord) -> None:
        _log_access("POST", ex.client, rec)


def _fmt_ms(ms: Optional[float]) -> str:
    return "-" if ms is None else f"{ms:.1f}"


def _log_access(method: str, client: str, rec: UsageRecord) -> None:
    """
    One access event per request, from its (clipped) usage record: a
    pre-built text line (C{line}), and the same facts as plain fields
    (C{access}) for the JSON log format (L{llmgate.ops.logformat}).

    The text is built here, with a single format field: twisted.logger's
    PEP 3101 formatting of a dozen fields cost ~5% of the CPU per request
    at a thousand requests a second.
    """
    phase = rec.phase
    cost = rec.cost_usd
    fields = {
        "method": method,
        "route": rec.route,
        "client": client or None,
        "key": rec.key_name or None,
        "model": rec.model or None,
        "served_model": rec.served_model,
        "provider": rec.provider or None,
        "status": rec.status,
        "outcome": rec.outcome,
        "phase": phase,
        "stream": rec.streamed,
        "input_tokens": rec.input_tokens,
        "output_tokens": rec.output_tokens,
        "cost_usd": cost,
        "ttft_ms": None if rec.ttft_ms is None else round(rec.ttft_ms, 1),
        "duration_ms": round(rec.duration_ms, 1),
        "bytes_in": rec.bytes_in,
        "bytes_out": rec.bytes_out,
        "request_id": rec.request_id,
        "client_request_id": rec.client_request_id,
        "upstream_id": rec.upstream_id,
        "attempt": rec.attempt,
        "parent_request_id": rec.parent_request_id,
    }
    tokens_in = "-" if rec.input_tokens is None else rec.input_tokens
    tokens_out = "-" if rec.output_tokens is None else rec.output_tokens
    line = (
        f"{method} {rec.route} client={client or '-'} key={rec.key_name or '-'} model={rec.model or '-'} "
        f"provider={rec.provider or '-'} served={rec.served_model or '-'} status={rec.status} "
        f"outcome={rec.outcome}{'/' + phase if phase else ''} stream={int(rec.streamed)} "
        f"in={tokens_in} out={tokens_out} cost={'-' if cost is None else f'{cost:.6f}'} "
        f"ttft_ms={_fmt_ms(rec.ttft_ms)} ms={rec.duration_ms:.1f} bytes_out={rec.bytes_out} "
        f"id={rec.request_id}"
        f"{' client_id=' + rec.client_request_id if rec.client_request_id else ''}"
        f"{' upstream_id=' + rec.upstream_id if rec.upstream_id else ''}"
        f"{f' attempt={rec.attempt}' if rec.attempt > 1 else ''}"
        f"{' parent=' + rec.parent_request_id if rec.parent_request_id else ''}"
    )
    # Logger.info's event, handed straight to its observer (the global
    # publisher): Logger.emit re-validates the level against every
    # LogLevel constant on each call.
    log.observer(
        {
            "line": line,
            "access": fields,
            "log_logger": log,
            "log_level": _INFO,
            "log_namespace": _ACCESS,
            "log_source": None,
            "log_format": "{line}",
            "log_time": time.time(),
        }
    )

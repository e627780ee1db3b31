# -*- test-case-name: tests.mock.test_provider -*-
"""
A fake OpenAI- and Anthropic-compatible LLM provider on twisted.web.

It is deterministic (the text, the usage and the ids depend only on the
request and the order of requests) and controlled per request by
C{x-mock-*} headers, so the gateway's tests and benchmarks can ask for slow
streams, big streams, byte-exact fixture replays and broken upstreams.

Every response, streamed or not, is a list of I{pieces} (C{(delay, bytes)})
written by one L{_Stream}, a push producer: it is the only place that deals
with timers, backpressure, faults and the client going away.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import os
import random
import struct
import zlib
from typing import Any, Callable, Iterator

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

# Single tokens (with their leading space) in both cl100k_base and o200k_base,
# so N words are exactly N tokens for the gateway's offline estimates too.
MOCK_WORDS: tuple[str, ...] = tuple(
    " " + w
    for w in (
        "the and of to in is it that for on with as was he be at by this had"
        " not are but from or have an they which one you were all"
    ).split()
)

_FIXTURES_DIR = os.path.join(os.path.dirname(__file__), "fixtures")
_SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
}
_JSON = "application/json"
_TURN_BYTES = 64 * 1024  # most bytes written per reactor turn: keeps the reactor responsive
_MODELS = ("gpt-4o-mini", "gpt-4.1", "text-embedding-3-small", "claude-sonnet-4-5")
_STATS_KEYS = (
    "requests",
    "streams_started",
    "streams_completed",
    "streams_cancelled",
    "faults",
)
_FAULTS = (
    "reset-mid",
    "stall-headers",
    "stall-mid",
    "status-429",
    "status-529",
    "status-500",
    "html-200",
    "error-first",
    "stall-first",
)

# Headers from fixtures/README.md, "Headers to send with the error fixtures".
_OPENAI_429_HEADERS = {
    "retry-after": "1",
    "x-request-id": "req_fixture429",
    "x-ratelimit-limit-requests": "5000",
    "x-ratelimit-remaining-requests": "4987",
    "x-ratelimit-reset-requests": "156ms",
    "x-ratelimit-limit-tokens": "200000",
    "x-ratelimit-remaining-tokens": "0",
    "x-ratelimit-reset-tokens": "336ms",
}
_ANTHROPIC_529_HEADERS = {
    "request-id": "req_011CVdX8k2pQm4rTz7WbN3yH",
    "x-should-retry": "true",
}
_ANTHROPIC_429_HEADERS = {
    "retry-after": "7",
    "anthropic-ratelimit-requests-limit": "1000",
    "anthropic-ratelimit-requests-remaining": "0",
    "anthropic-ratelimit-requests-reset": "2025-11-30T00:00:07Z",
}
_FIXTURE_ERRORS = {
    "openai_error_429.json": (429, _OPENAI_429_HEADERS),
    "anthropic_error_529.json": (529, _ANTHROPIC_529_HEADERS),
}

Piece = tuple[float, bytes]  # (seconds to wait before writing, bytes for one write())


def mock_text(n: int) -> str:
    """The text the mock generates for C{n} tokens: C{n} words from L{MOCK_WORDS}."""
    return "".join(MOCK_WORDS[i % len(MOCK_WORDS)] for i in range(n))


def mock_prompt_tokens(body: bytes) -> int:
    """The input/prompt token count the mock reports for a request body."""
    return max(1, len(body) // 4)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _data(obj: Any) -> bytes:
    """One OpenAI chat/completions SSE event."""
    return b"data: " + _dumps(obj) + b"\n\n"


def _event(name: str, obj: Any) -> bytes:
    """One named SSE event (Responses API and Anthropic)."""
    return b"event: " + name.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def _load_fixtures() -> dict[str, bytes]:
    fixtures = {}
    for name in sorted(os.listdir(_FIXTURES_DIR)):
        if name.endswith((".sse", ".json")):
            with open(os.path.join(_FIXTURES_DIR, name), "rb") as f:
                fixtures[name] = f.read()
    return fixtures


class _BadControl(ValueError):
    """A malformed C{x-mock-*} header or request body: answered with a 400."""


class _Call:
    """
    What the generators need to know about one API request.

    @ivar n: content tokens to generate (C{x-mock-tokens}).
    @ivar delay: seconds between tokens (C{x-mock-delay-ms}).
    @ivar ttft: seconds before the first piece (C{x-mock-ttft-ms}).
    @ivar linger: seconds between the last piece and the end of the body
        (C{x-mock-linger-ms}): the end of body arrives after the terminal
        event, as from a provider whose close lags its last event.
    @ivar served: the model the response names (C{x-mock-served-model}),
        as a router or fallback list that serves another model than the
        one asked for; by default the one asked for.
    """

    def __init__(self, headers: dict[str, str], path: str, body: bytes, seq: int, now: int):
        self.headers = headers
        self.path = path
        self.body = body
        self.seq = seq
        self.now = now
        self.anthropic = path.startswith("/v1/messages")
        self.n = self._number("x-mock-tokens", 16, int)
        self.delay = self._number("x-mock-delay-ms", 0.0, float) / 1000.0
        self.ttft = self._number("x-mock-ttft-ms", 0.0, float) / 1000.0
        self.linger = self._number("x-mock-linger-ms", 0.0, float) / 1000.0
        self.served = headers.get("x-mock-served-model")
        self.fault_after = self._number("x-mock-fault-after", -1, int)
        self.bytes = self._number("x-mock-bytes", -1, int)
        self.fault = headers.get("x-mock-fault")
        self.fail_status = 0  # set by L{Fractions}: answer this status at once
        if self.fault is not None and self.fault not in _FAULTS:
            raise _BadControl(f"unknown x-mock-fault {self.fault!r}")
        self.json: dict[str, Any] = {}

    def _number(self, name: str, default: Any, kind: Callable[[str], Any]) -> Any:
        raw = self.headers.get(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise _BadControl(f"{name} must be a number, not {raw!r}") from None
        if value < 0:
            raise _BadControl(f"{name} must not be negative")
        return value

    def parse(self) -> None:
        try:
            body = json.loads(self.body) if self.body else {}
        except ValueError as e:
            raise _BadControl(f"could not parse the JSON body: {e}") from None
        if not isinstance(body, dict):
            raise _BadControl("the JSON body must be an object")
        self.json = body

    @property
    def model(self) -> str:
        return self.served or str(self.json.get("model") or "mock-model")

    @property
    def stream(self) -> bool:
        return self.json.get("stream") is True

    @property
    def include_usage(self) -> bool:
        options = self.json.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    @property
    def prompt_tokens(self) -> int:
        return mock_prompt_tokens(self.body)

    def tokens(self) -> Iterator[tuple[float, str]]:
        """C{(delay, word)} for each content token."""
        for i in range(self.n):
            yield self.delay, MOCK_WORDS[i % len(MOCK_WORDS)]

    def error_body(self, status: int, message: str) -> bytes:
        """An error body in the dialect of the route."""
        if self.anthropic:
            kind = {400: "invalid_request_error", 404: "not_found_error",
                    429: "rate_limit_error", 500: "api_error"}.get(status, "api_error")
            return _dumps({"type": "error", "error": {"type": kind, "message": message},
                           "request_id": f"req_mock_{self.seq}"})
        kind = {400: "invalid_request_error", 404: "invalid_request_error",
                500: "server_error"}.get(status, "server_error")
        return _dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


# ---------------------------------------------------------------------------
# Generators: each returns (status, headers, pieces, is_stream).

Reply = tuple[int, dict[str, str], "list[Piece] | _Sized", bool]


def _json_reply(call: _Call, obj: Any) -> Reply:
    """A non-streamed body, sent after the time a real model would take."""
    return 200, {"content-type": _JSON}, [(call.n * call.delay, _dumps(obj))], False


def _sse_reply(pieces: list[Piece]) -> Reply:
    return 200, dict(_SSE_HEADERS), pieces, True


def _chat(call: _Call) -> Reply:
    text = mock_text(call.n)
    usage = {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.n,
             "total_tokens": call.prompt_tokens + call.n}
    cid = f"chatcmpl-mock{call.seq}"
    if not call.stream:
        return _json_reply(call, {
            "id": cid, "object": "chat.completion", "created": call.now, "model": call.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                 "refusal": None, "annotations": []},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": usage, "system_fingerprint": None})

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid, "object": "chat.completion.chunk", "created": call.now,
            "model": call.model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if call.include_usage:
            obj["usage"] = None
        return _data(obj)

    def pieces() -> Iterator[Piece]:
        yield 0.0, chunk({"role": "assistant", "content": "", "refusal": None})
        for delay, word in call.tokens():
            yield delay, chunk({"content": word})
        yield 0.0, chunk({}, "stop")
        if call.include_usage:
            yield 0.0, _data({"id": cid, "object": "chat.completion.chunk", "created": call.now,
                              "model": call.model, "system_fingerprint": None,
                              "choices": [], "usage": usage})
        yield 0.0, b"data: [DONE]\n\n"

    return _sse_reply(list(pieces()))


def _chat_bytes(call: _Call) -> Reply:
    """
    About C{x-mock-bytes} bytes of chat chunks, made lazily: the stream may
    be far larger than we want to hold in memory.
    """
    cid = f"chatcmpl-mock{call.seq}"
    per_chunk = 64  # words per content chunk

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid, "object": "chat.completion.chunk", "created": call.now,
            "model": call.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if call.include_usage:
            obj["usage"] = None
        return _data(obj)

    content = chunk({"content": mock_text(per_chunk)})
    count = max(1, call.bytes // len(content))

    def pieces() -> Iterator[Piece]:
        yield 0.0, chunk({"role": "assistant", "content": "", "refusal": None})
        for _ in range(count):
            yield call.delay, content
        yield 0.0, chunk({}, "stop")
        if call.include_usage:
            n = count * per_chunk
            yield 0.0, _data({"id": cid, "object": "chat.completion.chunk", "created": call.now,
                              "model": call.model, "choices": [],
                              "usage": {"prompt_tokens": call.prompt_tokens, "completion_tokens": n,
                                        "total_tokens": call.prompt_tokens + n}})
        yield 0.0, b"data: [DONE]\n\n"

    return 200, dict(_SSE_HEADERS), _Sized(pieces(), count + 4), True


class _Sized:
    """A lazy iterable of pieces that still knows roughly how many there are."""

    def __init__(self, it: Iterator[Piece], size: int):
        self._it = it
        self._size = size

    def __iter__(self) -> Iterator[Piece]:
        return self._it

    def __len__(self) -> int:
        return self._size


def _completions(call: _Call) -> Reply:
    text = mock_text(call.n)
    usage = {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.n,
             "total_tokens": call.prompt_tokens + call.n}
    cid = f"cmpl-mock{call.seq}"
    if not call.stream:
        return _json_reply(call, {
            "id": cid, "object": "text_completion", "created": call.now, "model": call.model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": usage})

    def chunk(text: str, finish: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid, "object": "text_completion", "created": call.now, "model": call.model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        if call.include_usage:
            obj["usage"] = None
        return _data(obj)

    pieces: list[Piece] = [(delay, chunk(word)) for delay, word in call.tokens()]
    pieces.append((0.0, chunk("", "stop")))
    if call.include_usage:
        pieces.append((0.0, _data({"id": cid, "object": "text_completion", "created": call.now,
                                   "model": call.model, "choices": [], "usage": usage})))
    pieces.append((0.0, b"data: [DONE]\n\n"))
    return _sse_reply(pieces)


def _responses(call: _Call) -> Reply:
    text = mock_text(call.n)
    rid, mid = f"resp_mock{call.seq}", f"msg_mock{call.seq}"
    usage = {"input_tokens": call.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": call.n, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": call.prompt_tokens + call.n}
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item = {"id": mid, "type": "message", "status": "completed", "role": "assistant",
            "content": [part]}

    def response(status: str, output: list[Any], usage: Any) -> dict[str, Any]:
        return {"id": rid, "object": "response", "created_at": call.now, "status": status,
                "error": None, "incomplete_details": None, "model": call.model,
                "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "usage": usage}

    if not call.stream:
        return _json_reply(call, response("completed", [item], usage))
    seq = itertools.count()

    def ev(name: str, **fields: Any) -> bytes:
        return _event(name, {"type": name, "sequence_number": next(seq), **fields})

    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    pieces: list[Piece] = [
        (0.0, ev("response.created", response=response("in_progress", [], None))),
        (0.0, ev("response.in_progress", response=response("in_progress", [], None))),
        (0.0, ev("response.output_item.added", output_index=0,
                 item={**item, "status": "in_progress", "content": []})),
        (0.0, ev("response.content_part.added", **where, part={**part, "text": ""})),
    ]
    pieces += [(delay, ev("response.output_text.delta", **where, delta=word, logprobs=[]))
               for delay, word in call.tokens()]
    pieces += [
        (0.0, ev("response.output_text.done", **where, text=text, logprobs=[])),
        (0.0, ev("response.content_part.done", **where, part=part)),
        (0.0, ev("response.output_item.done", output_index=0, item=item)),
        (0.0, ev("response.completed", response=response("completed", [item], usage))),
    ]
    return _sse_reply(pieces)


def _embeddings(call: _Call) -> Reply:
    """One deterministic unit-ish vector per input; base64 is what the openai SDK asks for."""
    inputs = call.json.get("input", "")
    if not isinstance(inputs, list) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    dims = int(call.json.get("dimensions") or 8)
    data = []
    for i, text in enumerate(inputs):
        rng = random.Random(zlib.crc32(_dumps(text)))
        vector = [round(rng.uniform(-1.0, 1.0), 4) for _ in range(dims)]
        embedding: Any = vector
        if call.json.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    obj = {"object": "list", "data": data, "model": call.model,
           "usage": {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens}}
    return 200, {"content-type": _JSON}, [(0.0, _dumps(obj))], False


def _messages(call: _Call) -> Reply:
    text = mock_text(call.n)
    mid = f"msg_mock{call.seq}"
    usage = {"input_tokens": call.prompt_tokens, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": 0, "output_tokens": call.n}
    if not call.stream:
        return _json_reply(call, {
            "id": mid, "type": "message", "role": "assistant", "model": call.model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": usage})
    start = {"id": mid, "type": "message", "role": "assistant", "model": call.model,
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 1}}
    pieces: list[Piece] = [
        (0.0, _event("message_start", {"type": "message_start", "message": start})),
        (0.0, _event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}})),
        (0.0, b'event: ping\ndata: {"type": "ping"}\n\n'),  # the real wire's spacing
    ]
    pieces += [(delay, _event("content_block_delta", {
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": word}})) for delay, word in call.tokens()]
    pieces += [
        (0.0, _event("content_block_stop", {"type": "content_block_stop", "index": 0})),
        (0.0, _event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": usage})),
        (0.0, _event("message_stop", {"type": "message_stop"})),
    ]
    return _sse_reply(pieces)


def _error_first(call: _Call) -> Reply:
    """
    C{error-first}: a 200 event stream whose first events are an error
    before any content, as Anthropic sends when it is overloaded after the
    headers went out (C{message_start}, then an C{overloaded_error}).
    """
    call.parse()
    error = {"type": "overloaded_error", "message": "Overloaded"}
    if not call.anthropic:
        return _sse_reply([(0.0, _data({"error": {**error, "code": None, "param": None}}))])
    start = {"id": f"msg_mock{call.seq}", "type": "message", "role": "assistant", "model": call.model,
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": call.prompt_tokens, "output_tokens": 1}}
    return _sse_reply([
        (0.0, _event("message_start", {"type": "message_start", "message": start})),
        (0.0, _event("error", {"type": "error", "error": error})),
    ])


def _note_cancel(provider: "MockProvider") -> None:
    """Keep the time of a cancelled stream (the last 100)."""
    provider.cancels.append(provider.reactor.seconds())
    del provider.cancels[:-100]


def _count_tokens(call: _Call) -> Reply:
    return 200, {"content-type": _JSON}, [(0.0, _dumps({"input_tokens": call.prompt_tokens}))], False


def _models(call: _Call) -> Reply:
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "llmgate-mock"}
            for m in _MODELS]
    return 200, {"content-type": _JSON}, [(0.0, _dumps({"object": "list", "data": data}))], False


_ROUTES: dict[tuple[str, str], Callable[[_Call], Reply]] = {
    ("GET", "/v1/models"): _models,
    ("POST", "/v1/chat/completions"): _chat,
    ("POST", "/v1/completions"): _completions,
    ("POST", "/v1/responses"): _responses,
    ("POST", "/v1/embeddings"): _embeddings,
    ("POST", "/v1/messages"): _messages,
    ("POST", "/v1/messages/count_tokens"): _count_tokens,
}


# ---------------------------------------------------------------------------


@implementer(IPushProducer)
class Fractions:
    """
    Seeded per-process fractions of slow and failing requests
    (C{--slow-fraction F --slow-ttft S}, C{--fail-fraction F --fail-status N}):
    a deployment that is slow or fails on some requests only, for the routing
    benchmark and tests of retries and hedging. One draw per API request, in
    arrival order, from its own generator: a given seed and order always
    picks the same requests. A request's own C{x-mock-fault} wins.

    @ivar slowed: requests made slow so far.
    @ivar failed: requests failed so far.
    """

    def __init__(self, seed: int = 0, slow_fraction: float = 0.0, slow_ttft: float = 2.0,
                 fail_fraction: float = 0.0, fail_status: int = 503):
        if not (0.0 <= slow_fraction and 0.0 <= fail_fraction and slow_fraction + fail_fraction <= 1.0):
            raise ValueError("slow and fail fractions must be >= 0 with a sum <= 1")
        if slow_ttft < 0:
            raise ValueError("slow_ttft must not be negative")
        if not 400 <= fail_status <= 599:
            raise ValueError("fail_status must be 400..599")
        self.slow_fraction, self.slow_ttft = slow_fraction, slow_ttft
        self.fail_fraction, self.fail_status = fail_fraction, fail_status
        self._random = random.Random(seed)
        self.slowed = self.failed = 0

    def apply(self, call: _Call) -> None:
        """Draw this request's fate: fail it (C{call.fail_status}), make its
        first piece wait C{slow_ttft} more, or leave it alone."""
        if not self.slow_fraction and not self.fail_fraction:
            return
        x = self._random.random()
        if x < self.fail_fraction:
            self.failed += 1
            call.fail_status = self.fail_status
        elif x < self.fail_fraction + self.slow_fraction:
            self.slowed += 1
            call.ttft += self.slow_ttft


class _Stream:
    """
    Writes one response's pieces, each with ONE C{request.write()}.

    Waits each piece's delay with C{callLater}, stops while paused
    (backpressure), writes at most L{_TURN_BYTES} per reactor turn, and
    carries out C{reset-mid}/C{stall-mid} after C{fault_after} pieces.
    State: C{running} → C{done} (finished, aborted by a fault, or the client
    left); C{stalled} waits for the client to leave.
    """

    def __init__(self, provider: MockProvider, request: Request, pieces: list[Piece] | _Sized,
                 counted: bool, ttft: float, fault: str | None, fault_after: int,
                 linger: float = 0.0):
        self._provider = provider
        self._request = request
        self._pieces = iter(pieces)
        self._counted = counted  # an SSE stream: counts in the streams_* stats
        self._fault = fault
        self._fault_after = fault_after
        self._sent = 0
        self._next: bytes | None = None  # the piece whose delay is being waited out
        self._ttft = ttft  # added to the first piece's delay
        self._linger = linger  # waited after the last piece, before the end
        self._timer: IDelayedCall | None = None
        self._paused = False
        self.state = "running"

    def start(self) -> None:
        if self._counted:
            self._provider.stats["streams_started"] += 1
        self._request.registerProducer(self, True)
        self._advance()

    def _advance(self) -> None:
        budget = _TURN_BYTES
        while self.state == "running" and not self._paused:
            if self._sent == self._fault_after:
                return self._break()
            if self._next is None:
                piece = next(self._pieces, None)
                if piece is None:
                    if self._linger > 0:
                        self._timer = self._provider.reactor.callLater(self._linger, self._fire)
                        self._linger = 0.0
                        return
                    return self._finish()
                delay, self._next = piece
                delay, self._ttft = delay + self._ttft, 0.0
                if delay > 0:
                    self._timer = self._provider.reactor.callLater(delay, self._fire)
                    return
            if budget <= 0:
                self._timer = self._provider.reactor.callLater(0, self._fire)
                return
            data, self._next = self._next, None
            self._request.write(data)
            self._sent += 1
            budget -= len(data)

    def _fire(self) -> None:
        self._timer = None
        self._advance()

    def _break(self) -> None:
        self._provider.stats["faults"] += 1
        if self._sent == 0:
            self._request.write(b"")  # both faults come after the headers
        if self._fault in ("stall-mid", "stall-first"):
            self.state = "stalled"
            return
        self.state = "done"  # an abort we chose: neither completed nor cancelled
        self._request.channel.transport.abortConnection()

    def _finish(self) -> None:
        self.state = "done"
        self._request.unregisterProducer()
        self._request.finish()
        if self._counted:
            self._provider.stats["streams_completed"] += 1

    def clientGone(self, reason: Failure | None = None) -> None:
        """The client disconnected: drop our timers and count the lost stream."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.state != "done" and self._counted:
            self._provider.stats["streams_cancelled"] += 1
            _note_cancel(self._provider)
        self.state = "done"

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self.state == "running" and self._timer is None:
            self._timer = self._provider.reactor.callLater(0, self._fire)

    def stopProducing(self) -> None:
        self.clientGone()


class _Root(Resource):
    isLeaf = True

    def __init__(self, provider: MockProvider):
        super().__init__()
        self._provider = provider

    def render(self, request: Request) -> bytes | int:
        return self._provider._render(request)


def _default_ttft(headers: dict[str, str], ttft_ms: float | None) -> None:
    """
    A provider that is slow to start every response (C{--ttft-ms}): the
    process's default C{x-mock-ttft-ms}, for a request that names none.
    """
    if ttft_ms is not None and "x-mock-ttft-ms" not in headers:
        headers["x-mock-ttft-ms"] = repr(float(ttft_ms))


class MockProvider:
    """
    The fake provider. Serve C{Site(mock.resource, reactor=reactor)}.

    @ivar stats: counters; C{/mock/*} control requests are not counted.
    @ivar requests: the last 100 API requests, as dicts with C{method},
        C{path}, C{headers} (lowercased names) and C{body} (bytes).
    """

    def __init__(self, reactor: IReactorTime, seed: int = 0, fault: str | None = None, ttft_ms: float | None = None,
                 fractions: Fractions | None = None):
        if fault is not None and fault not in _FAULTS:
            raise ValueError(f"unknown fault {fault!r} (one of: {', '.join(_FAULTS)})")
        self.reactor = reactor
        # The fault of every request that names none (C{--fault}): a
        # provider that is down, whatever the gateway forwards.
        self.fault = fault
        # The x-mock-ttft-ms of every request that sends none (C{--ttft-ms}).
        self.ttft_ms = ttft_ms
        self.resource = _Root(self)
        self.stats: dict[str, int] = dict.fromkeys(_STATS_KEYS, 0)
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self._fixtures = _load_fixtures()  # read once: no disk I/O per request
        self._random = random.Random(seed)
        self._seq = itertools.count(1)
        # When (reactor seconds) each cancelled stream's client went away
        # (GET /mock/cancels): hedging tests time the gateway's cancel.
        self.cancels: list[float] = []
        self.fractions = fractions or Fractions()

    def _render(self, request: Request) -> bytes | int:
        finished = request.notifyFinish()  # first: it never fires if asked for late
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        body = request.content.read() if request.content is not None else b""
        if path.startswith("/mock/"):
            finished.addErrback(lambda _: None)
            return self._control(request, method, path)
        headers = {k.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in vs)
                   for k, vs in request.requestHeaders.getAllRawHeaders()}
        if self.fault is not None and "x-mock-fault" not in headers:
            headers["x-mock-fault"] = self.fault
        _default_ttft(headers, self.ttft_ms)
        self.stats["requests"] += 1
        self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
        seq = next(self._seq)
        call: _Call | None = None
        try:
            call = _Call(headers, path, body, seq, int(self.reactor.seconds()))
            self.fractions.apply(call)
            status, resp_headers, pieces, counted = self._reply(call, method)
        except _BadControl as e:
            finished.addErrback(lambda _: None)
            anthropic = path.startswith("/v1/messages")
            if call is None:
                call = _Call({}, path, body, seq, 0)
            request.setResponseCode(400)
            request.setHeader("content-type", _JSON)
            request.setHeader("request-id" if anthropic else "x-request-id", f"req_mock_{seq}")
            return call.error_body(400, str(e))
        if status == 0:  # stall-headers: never answer
            finished.addErrback(lambda _: None)
            return NOT_DONE_YET
        request.setResponseCode(status)
        request.setHeader("request-id" if call.anthropic else "x-request-id", f"req_mock_{seq}")
        for name, value in resp_headers.items():
            request.setHeader(name, value)
        fault_after = call.fault_after
        if not counted:  # one JSON body: framed by content-length, split for mid faults
            request.setHeader("content-length", str(sum(len(p[1]) for p in pieces)))
            if call.fault in ("reset-mid", "stall-mid"):
                (delay, data), = pieces
                pieces = [(delay, data[:len(data) // 2]), (0.0, data[len(data) // 2:])]
        if call.fault == "stall-first":
            fault_after = 1
        elif call.fault not in ("reset-mid", "stall-mid"):
            fault_after = -1
        elif fault_after < 0:
            fault_after = 3 if call.fault == "stall-mid" else max(1, len(pieces) // 2)
        stream = _Stream(self, request, pieces, counted, call.ttft, call.fault, fault_after, call.linger)
        finished.addErrback(stream.clientGone)
        stream.start()
        return NOT_DONE_YET

    def _reply(self, call: _Call, method: str) -> Reply:
        """Choose the response: a fault, a fixture, a byte flood, or the route's own."""
        route = _ROUTES.get((method, call.path))
        if route is None:
            return 404, {"content-type": _JSON}, [(0.0, call.error_body(
                404, f"no mock route for {method} {call.path}"))], False
        fault = call.fault
        if fault == "stall-headers":
            self.stats["faults"] += 1
            return 0, {}, [], False
        if fault == "error-first":
            self.stats["faults"] += 1
            return _error_first(call)
        if fault in ("status-429", "status-529", "status-500", "html-200"):
            self.stats["faults"] += 1
            return self._fault_reply(call, fault)
        if call.fail_status:
            return self._fraction_reply(call)
        fixture = call.headers.get("x-mock-fixture")
        if fixture is not None:
            return self._fixture_reply(fixture, call.delay)
        call.parse()
        if call.bytes >= 0:
            return _chat_bytes(call)
        return route(call)

    def _fault_reply(self, call: _Call, fault: str) -> Reply:
        if fault == "status-429" and not call.anthropic:
            return self._fixture_reply("openai_error_429.json")
        if fault == "status-429":
            body = call.error_body(429, "Number of request tokens has exceeded your rate limit.")
            return 429, {"content-type": _JSON, **_ANTHROPIC_429_HEADERS}, [(0.0, body)], False
        if fault == "status-529":
            return self._fixture_reply("anthropic_error_529.json")
        if fault == "status-500":
            body = call.error_body(500, "The server had an error while processing your request.")
            return 500, {"content-type": _JSON}, [(0.0, body)], False
        html = b"<html><body><h1>502 Bad Gateway</h1><p>mock html-200</p></body></html>\n"
        return 200, {"content-type": "text/html; charset=utf-8"}, [(0.0, html)], False

    def _fraction_reply(self, call: _Call) -> Reply:
        """A request L{Fractions} failed: its status at once, an error body in its dialect."""
        self.stats["faults"] += 1
        body = call.error_body(call.fail_status, "mock: injected failure (--fail-fraction)")
        return call.fail_status, {"content-type": _JSON}, [(0.0, body)], False

    def _fixture_reply(self, name: str, delay: float = 0.0) -> Reply:
        data = self._fixtures.get(name)
        if data is None:
            raise _BadControl(f"unknown x-mock-fixture {name!r}")
        if name.endswith(".json"):
            status, headers = _FIXTURE_ERRORS.get(name, (200, {}))
            return status, {"content-type": _JSON, **headers}, [(0.0, data)], False
        return _sse_reply(self._slices(data, delay))

    def _slices(self, data: bytes, delay: float) -> list[Piece]:
        """Random 1..64-byte slices, so that lines and UTF-8 characters get split."""
        pieces: list[Piece] = []
        i = 0
        while i < len(data):
            size = self._random.randint(1, 64)
            pieces.append((delay if i else 0.0, data[i:i + size]))
            i += size
        return pieces

    def _control(self, request: Request, method: str, path: str) -> bytes:
        request.setHeader("content-type", _JSON)
        if (method, path) == ("GET", "/mock/stats"):
            return _dumps(self.stats)
        if (method, path) == ("GET", "/mock/requests"):
            # What the provider saw, for tests of the gateway's header hygiene.
            return _dumps([
                {**r, "body": r["body"].decode("utf-8", "replace")} for r in self.requests
            ])
        if (method, path) == ("GET", "/mock/cancels"):
            return _dumps(self.cancels)
        if (method, path) == ("POST", "/mock/reset"):
            self.stats.update(dict.fromkeys(self.stats, 0))
            self.requests.clear()
            return _dumps(self.stats)
        request.setResponseCode(404)
        return _dumps({"error": {"message": f"no mock route for {method} {path}",
                                 "type": "invalid_request_error", "param": None, "code": None}})

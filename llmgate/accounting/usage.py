# -*- test-case-name: tests.accounting.test_usage -*-
"""
Token usage from provider responses: streamed events and whole bodies.

What the numbers mean (one definition for both providers, so that pricing
never double-charges):

  - ``input_tokens`` is the TOTAL prompt size, including cached reads and
    cache writes. OpenAI reports it that way (``prompt_tokens`` includes
    ``cached_tokens``); for Anthropic it is ``input_tokens +
    cache_creation_input_tokens + cache_read_input_tokens``, as the Anthropic
    ``Usage`` docstring defines the total.
  - ``cached_input_tokens`` and ``cache_creation_tokens`` are sub-buckets of
    ``input_tokens``. Uncached input is ``input - cached - creation``.
  - ``cache_creation_1h_tokens`` is the part of ``cache_creation_tokens``
    written to Anthropic's 1-hour cache (``usage.cache_creation
    .ephemeral_1h_input_tokens``), billed at a dearer rate than the
    5-minute rest; never more than ``cache_creation_tokens``.
  - ``output_tokens`` includes reasoning tokens; ``reasoning_tokens`` is a
    sub-bucket, never to be added on top.

Counting rules (fixtures/README.md): OpenAI chat/completions usage comes
only from a chunk whose ``usage`` is non-null (never summed), wherever the
provider puts that chunk: a usage-only chunk, the finish-reason chunk
(DeepSeek, OpenRouter, Mistral, TGI), Groq's ``x_groq.usage``, or an
OpenRouter error chunk that also carries the usage it bills; Anthropic
starts from ``message_start`` and REPLACES each field present in each
``message_delta`` (the values are cumulative), except that a ``usage.iterations``
list (server-side compaction and other multi-iteration replies) is what is
billed: the sum over its entries, since the top-level fields then cover the
last iteration only; Responses usage comes from ``response.completed``,
``response.incomplete`` or ``response.failed`` (the Response object each
carries has the same ``usage``, the tokens the response used; on
``response.failed`` it is taken as reported, like OpenRouter's error chunk,
when it has an output count), the event type read from the JSON ``type`` when a stream (OpenRouter) sends no
``event:`` lines; embeddings and non-streaming replies from the body.

Cost on the hot path: the accumulators do not JSON-parse every event. They
parse only events that can carry usage, ids or errors (found by event name,
or for OpenAI chat by a byte search for a non-null ``"usage"``). A block of
whole events the relay framed is not even split into events when byte
searches show it holds none of those (``on_block``): it is held as it is.
Generated text (kept so the gateway can estimate with tiktoken when a
stream dies without usage) is extracted only when it is needed -- an
estimate, the once-a-second progress of an open stream -- or when
``HOLD_BYTES`` of events are held: then the held blocks are parsed, their
content events picked, and their text pulled out by one compiled regex and
JSON-decoded per batch, so that estimates and
``text_bytes`` count the text the model generated, not its escapes (escaped
bytes overstated JSON and tool output by about a fifth). Every kind of
generated text counts: content, refusals, reasoning (``reasoning``,
``reasoning_content``, Mistral's ``thinking`` parts, Anthropic thinking and
compaction summaries), and tool-call arguments / ``input_json_delta``.
Only chunks whose content is a list of parts (Mistral) are parsed for
their text. Measured on the fixtures (CPython 3.11, shared machine, parser
excluded, averaged over whole streams): 1.4-2.5 us/event on long streams
(Groq reasoning, 1105 events; Anthropic compaction, 749), 2-7 us on the
short ones where the parsed first and last events weigh more, 12 us on
Mistral's part lists; a json.loads of one 318-byte chat chunk alone is
about 6.5 us, which is what parsing every event would have cost.

Pure bookkeeping: no reactor, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from llmgate.dialects.sse import EventStreamParser

__all__ = [
    "Usage",
    "UsageAccumulator",
    "OpenAIChatAccumulator",
    "OpenAICompletionsAccumulator",
    "OpenAIResponsesAccumulator",
    "OpenAIEmbeddingsAccumulator",
    "AnthropicMessagesAccumulator",
    "AnthropicCountTokensAccumulator",
    "make_accumulator",
    "is_usage_only_chunk",
    "has_nonnull_usage",
    "usage_from_openai",
    "usage_from_anthropic",
    "APIS",
    "DEFAULT_SAMPLE_CAP",
    "HOLD_BYTES",
]

DEFAULT_SAMPLE_CAP = 256 * 1024  # characters of generated text kept for estimates
# Bytes of relayed events held per stream before their text is extracted.
# A stream that ends with its usage within this many bytes never extracts
# any; a longer one extracts once per this many bytes. It is also the most
# an open stream holds on top of its extracted sample: at 4 KiB a chat
# counter holds on average what it did when it kept event payloads in 4 KiB
# batches (tracemalloc over a 50-token stream: 3.7 against 3.8 KB; 8 KiB
# would make it 5.9 KB, docs/benchmarks.md run 12).
HOLD_BYTES = 4 * 1024

@dataclass
class Usage:
    """
    Token counts for one request. See the module docstring: input_tokens is
    the total prompt; cached_input_tokens and cache_creation_tokens are parts
    of it; reasoning_tokens is part of output_tokens.
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    source: str = "reported"  # "reported" | "estimated"
    cache_creation_1h_tokens: int = 0  # part of cache_creation_tokens

    @property
    def uncached_input_tokens(self) -> int | None:
        """Input billed at the full input rate (never negative)."""
        if self.input_tokens is None:
            return None
        return max(0, self.input_tokens - self.cached_input_tokens - self.cache_creation_tokens)

    @property
    def total_tokens(self) -> int | None:
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)


def _int(value) -> int | None:
    # Providers send ints; null or junk means "not reported".
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _details(u: dict, key: str) -> dict:
    d = u.get(key)
    return d if isinstance(d, dict) else {}


def usage_from_openai(u: dict, *, embeddings: bool = False) -> Usage:
    """
    Build a L{Usage} from an OpenAI ``usage`` object of any API: Chat and
    Completions (``prompt_tokens``/``completion_tokens``), Responses
    (``input_tokens``/``output_tokens``) or embeddings (no output).
    """
    if "input_tokens" in u or "output_tokens" in u:
        inp = _int(u.get("input_tokens"))
        out = _int(u.get("output_tokens"))
        idet = _details(u, "input_tokens_details")
        odet = _details(u, "output_tokens_details")
    else:
        inp = _int(u.get("prompt_tokens"))
        out = _int(u.get("completion_tokens"))
        idet = _details(u, "prompt_tokens_details")
        odet = _details(u, "completion_tokens_details")
    if embeddings and out is None:
        out = 0
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        cached_input_tokens=_int(idet.get("cached_tokens")) or 0,
        cache_creation_tokens=_int(idet.get("cache_write_tokens")) or 0,
        reasoning_tokens=_int(odet.get("reasoning_tokens")) or 0,
    )


_ANT_FIELDS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)
# The 1-hour part of cache_creation_input_tokens, from the nested
# ``cache_creation: {ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}``.
_ANT_1H = "ephemeral_1h_input_tokens"


def _anthropic_raw(u: dict, into: dict) -> None:
    """Replace (never add) each Anthropic usage field present in C{u}."""
    for key in _ANT_FIELDS:
        if key in u:
            v = _int(u[key])
            if v is not None or u[key] is None:
                into[key] = v
    cc = u.get("cache_creation")
    if isinstance(cc, dict):
        into[_ANT_1H] = _int(cc.get(_ANT_1H)) or 0


def _anthropic_iterations(u: dict) -> dict | None:
    """
    The billed totals of a ``usage.iterations`` list, or None without one.
    Each entry is one sampling iteration (e.g. a compaction, then the
    message) with its own counts; the top-level fields then describe only
    the last iteration, and what is billed is the sum over all of them.
    """
    iters = u.get("iterations")
    if not isinstance(iters, list) or not iters:
        return None
    total = dict.fromkeys(_ANT_FIELDS + (_ANT_1H,), 0)
    for it in iters:
        if isinstance(it, dict):
            for key in _ANT_FIELDS:
                total[key] += _int(it.get(key)) or 0
            cc = it.get("cache_creation")
            if isinstance(cc, dict):
                total[_ANT_1H] += _int(cc.get(_ANT_1H)) or 0
    return total


def _usage_from_anthropic_raw(raw: dict) -> Usage:
    uncached = raw.get("input_tokens")
    creation = raw.get("cache_creation_input_tokens") or 0
    read = raw.get("cache_read_input_tokens") or 0
    total = None if uncached is None else uncached + creation + read
    return Usage(
        input_tokens=total,
        output_tokens=raw.get("output_tokens"),
        cached_input_tokens=read,
        cache_creation_tokens=creation,
        # A part of the writes: never more than all of them.
        cache_creation_1h_tokens=max(0, min(raw.get(_ANT_1H) or 0, creation)),
    )


def usage_from_anthropic(u: dict) -> Usage:
    """Build a L{Usage} from one Anthropic ``usage`` object."""
    raw = _anthropic_iterations(u)
    if raw is None:
        raw = {}
        _anthropic_raw(u, raw)
    return _usage_from_anthropic_raw(raw)


def has_nonnull_usage(data: bytes) -> bool:
    """
    Cheap test: does this JSON text contain a ``"usage"`` key whose value is
    not ``null``? Tolerates whitespace around the colon. A false positive
    (the word as a string value) only costs the caller a JSON parse.
    """
    i = data.find(b'"usage"')
    if i < 0:
        return False
    if data.startswith(b":null", i + 7) and data.find(b'"usage"', i + 7) < 0:
        return False  # the common compact form, decided with two finds
    n = len(data)
    while i >= 0:
        j = i + 7
        while j < n and data[j] in b" \t\r\n":
            j += 1
        if j < n and data[j] == 0x3A:  # ":"
            j += 1
            while j < n and data[j] in b" \t\r\n":
                j += 1
            if data[j : j + 4] != b"null":
                return True
        i = data.find(b'"usage"', i + 7)
    return False


def is_usage_only_chunk(data: bytes) -> bool:
    """
    True for the OpenAI chat/completions chunk that ``include_usage`` adds:
    ``"choices": []`` with a non-null ``usage``. The gateway strips it when it
    injected ``include_usage`` itself. Parses JSON only if the byte test
    says usage is non-null, so it costs one substring search per chunk.
    """
    if not has_nonnull_usage(data):
        return False
    obj = _loads(data)
    return (
        isinstance(obj, dict)
        and obj.get("choices") == []
        and isinstance(obj.get("usage"), dict)
    )


def loads_json(data: bytes):
    """
    C{json.loads(data)}: an event payload or body that opens with C{"{"}
    and no NUL after it is UTF-8 (json.detect_encoding's own rule: no BOM
    starts with C{"{"}), decoded as json.loads would without its encoding
    checks, about 1 us of Python per call.  Raises as json.loads does.
    """
    if data[:1] == b"{" and data[1:2] != b"\x00":
        return json.loads(data.decode("utf-8", "surrogatepass"))
    return json.loads(data)


def _loads(data: bytes):
    try:
        return loads_json(data)
    except ValueError:  # includes UnicodeDecodeError
        return None


def _string_values(*keys: str) -> "re.Pattern[bytes]":
    """
    A regex for the raw (still JSON-escaped) string values of C{keys}.

    Outside a JSON string every quote is structural and inside one every
    quote is escaped, so an unescaped ``"key":"`` can only be that key with
    a string value: the match is exact without parsing.
    """
    names = b"|".join(re.escape(k.encode()) for k in keys)
    return re.compile(b'"(?:' + names + rb')"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"', re.S)


def _decode_raw(raw: bytes) -> str:
    if b"\\" in raw:
        try:
            return json.loads(b'"' + raw + b'"')
        except ValueError:
            pass
    return raw.decode("utf-8", "replace")


class UsageAccumulator:
    """
    Base class for per-API accumulators; see L{make_accumulator}.

    @ivar usage: provider-reported numbers so far, or None if none seen.
    @ivar complete: the API's terminal event (or a whole body) was seen.
    @ivar error: an in-band error event (or an error body) was seen.
    @ivar error_detail: the parsed error object, if any.
    @ivar text_bytes: UTF-8 bytes of the generated text seen (content,
        reasoning, arguments, thinking), decoded from JSON, also past the
        sample cap.
    @ivar upstream_id: the provider's id (chatcmpl-..., msg_..., resp_...).
    @ivar error_usage: the usage came on the error event itself (OpenRouter's
        mid-stream error chunk, a Responses ``response.failed`` with usage):
        it is the provider's final count.
    """

    # One of these lives per open stream: no per-instance dict.
    __slots__ = (
        "_held",
        "_held_len",
        "_sample",
        "_sample_cap",
        "_sample_len",
        "_text_bytes",
        "complete",
        "error_usage",
        "error",
        "error_detail",
        "model",
        "upstream_id",
        "usage",
    )

    api = ""
    _TEXT = _string_values("text")

    def __init__(self, sample_cap: int = DEFAULT_SAMPLE_CAP) -> None:
        self.usage: Usage | None = None
        self.complete = False
        self.error = False
        self.error_usage = False
        self.error_detail: object = None
        self._text_bytes = 0
        # Text not extracted yet, in stream order: whole-event SSE blocks
        # (bytes, L{on_block}) and lists of single events' payloads (the
        # events L{on_event} chose).
        self._held: list[bytes | list[bytes]] = []
        self._held_len = 0
        self.upstream_id: str | None = None
        self.model: str | None = None
        self._sample: list[str] = []
        self._sample_len = 0
        self._sample_cap = sample_cap

    def on_event(self, name: bytes | None, data: bytes) -> None:
        """Account for one SSE event (call it for every event of a stream)."""

    def on_block(self, block: bytes) -> bool:
        """
        Account for C{block}, whole LF-terminated SSE events, without
        parsing it, if byte searches show that none of its events can carry
        usage, an id, an error or the end of the stream: it is only held
        for its text (L{_text_event} picks the events later, if ever).
        False (nothing done) when its events must go to L{on_event}.
        """
        return False

    def _text_event(self, name: bytes | None, data: bytes) -> bool:
        """Whether a held block's event is one whose text L{on_event} keeps."""
        return False

    def _payloads(self, held: list) -> list[bytes]:
        """The payloads of the held events whose text is kept, in order."""
        payloads: list[bytes] = []
        parser = EventStreamParser()
        for item in held:
            if type(item) is list:
                payloads.extend(item)
            else:
                self._block_text(item, parser, payloads)
        return payloads

    def _block_text(self, block: bytes, parser: EventStreamParser, out: list[bytes]) -> None:
        """Add to C{out} the payloads of C{block}'s text events."""
        pick = self._text_event
        for name, data in parser.feed(block):
            if pick(name, data):
                out.append(data)

    def on_body(self, body: bytes) -> None:
        """Account for a whole non-streaming JSON response body."""
        self.on_object(_loads(body))

    def on_object(self, obj: object) -> None:
        """
        Account for a parsed non-streaming body, or for the top-level
        members of one too large to keep (L{llmgate.accounting.bigbody}).
        """
        self.complete = True
        if not isinstance(obj, dict):
            return
        if self._is_error_body(obj):
            self.error = True
            self.error_detail = obj.get("error")
            return
        self._body(obj)

    @property
    def held_bytes(self) -> int:
        """Bytes of relayed events held until their text is needed (< L{HOLD_BYTES})."""
        return self._held_len

    @property
    def text_bytes(self) -> int:
        self._extract()
        return self._text_bytes

    def sample_text(self) -> str:
        """Generated text kept for tiktoken estimates (capped), decoded."""
        self._extract()
        return "".join(self._sample)

    # -- helpers for subclasses -------------------------------------------

    def _keep_raw(self, data: bytes) -> None:
        """
        Keep an event whose generated-text values C{_TEXT} will extract
        when the text is needed (L{text_bytes}, L{sample_text}) or L{HOLD_BYTES}
        are held: most streams end with reported usage and never need it.
        """
        held = self._held
        if held and type(held[-1]) is list:
            held[-1].append(data)  # type: ignore[union-attr]
        else:
            held.append([data])
        self._held_len += len(data)
        if self._held_len >= HOLD_BYTES:
            self._extract()

    def _hold(self, block: bytes) -> bool:
        """Hold a whole-events block for L{on_block}; always True."""
        self._held.append(block)
        self._held_len += len(block)
        if self._held_len >= HOLD_BYTES:
            self._extract()
        return True

    def _extract(self) -> None:
        """
        Extract and decode the text of the held events: the held blocks are
        parsed (each is whole events, so a fresh parser per batch sees them
        as the stream's parser would), their text events picked, and the
        string values of all of them, joined, are one valid JSON string
        body, decoded in one call.
        """
        held = self._held
        if not held:
            return
        self._held = []
        self._held_len = 0
        found = self._TEXT.findall(b"\n".join(self._payloads(held)))
        if found:
            self._add(_decode_raw(b"".join(found)))

    def _keep(self, text) -> None:
        if not isinstance(text, str) or not text:
            return
        self._extract()  # keep the order of the text
        self._add(text)

    def _add(self, text: str) -> None:
        if not text:
            return
        self._text_bytes += len(text.encode("utf-8", "surrogatepass"))
        room = self._sample_cap - self._sample_len
        if room > 0:
            piece = text[:room]
            self._sample.append(piece)
            self._sample_len += len(piece)

    @staticmethod
    def _is_error_body(obj: dict) -> bool:
        return "error" in obj and (obj.get("type") == "error" or isinstance(obj.get("error"), dict))

    def _body(self, obj: dict) -> None:
        pass

    def _set_id(self, obj) -> None:
        if self.upstream_id is None and isinstance(obj, dict):
            ident = obj.get("id")
            if isinstance(ident, str):
                self.upstream_id = ident
            model = obj.get("model")
            if isinstance(model, str):
                self.model = model


def _chunk_usage(obj: dict) -> dict | None:
    """
    The usage object of an OpenAI-style chunk or body: top-level ``usage``,
    else Groq's ``x_groq.usage`` (older Groq streams put it only there).
    """
    u = obj.get("usage")
    if isinstance(u, dict):
        return u
    xg = obj.get("x_groq")
    if isinstance(xg, dict) and isinstance(xg.get("usage"), dict):
        return xg["usage"]
    return None


def _parts(parts: list, keep) -> None:
    """
    The text of content parts: ``{"type":"text","text"}`` and Mistral's
    ``{"type":"thinking","thinking":[{"type":"text","text"}]}``.
    """
    for p in parts:
        if not isinstance(p, dict):
            continue
        keep(p.get("text"))
        thinking = p.get("thinking")
        if isinstance(thinking, list):
            _parts(thinking, keep)
        else:
            keep(thinking)


class OpenAIChatAccumulator(UsageAccumulator):
    """
    ``/v1/chat/completions``. Parses the first chunk (id), chunks with a
    non-null ``usage``, error payloads, and content chunks while sampling.
    ``complete`` on ``[DONE]`` or on the ``choices: []`` usage chunk.
    """
    __slots__ = ()


    api = "openai.chat"
    # "reasoning": Groq, gpt-oss, vLLM, OpenRouter (whose reasoning_details
    # repeat it as "text", deliberately not a key here).
    _TEXT = _string_values("content", "arguments", "refusal", "reasoning_content", "reasoning")

    def on_block(self, block):
        # bytes.find, not "in": the same search, without the operator's
        # buffer protocol round trip (a third of the cost on short blocks).
        find = block.find
        if (
            self.upstream_id is None
            or find(b"[DONE]") >= 0
            or find(b'"error"') >= 0
            or find(b'"content":[') >= 0
            or find(b'"content": [') >= 0
            or has_nonnull_usage(block)
        ):
            return False
        self._held.append(block)
        self._held_len += len(block)
        if self._held_len >= HOLD_BYTES:
            self._extract()
        return True

    def _text_event(self, name, data):
        # on_block held only blocks whose every event on_event keeps raw.
        return True

    def _payloads(self, held):
        # Every event of a held block is kept, so when the hold is all
        # blocks and each event one "data: " line, the joined blocks are
        # what the regex needs: it finds the same string values in them as
        # in the payloads (no JSON string holds a line end). Three byte
        # counts per batch instead of a parse.
        if not any(type(item) is list for item in held):
            joined = b"".join(held)
            n = joined.count(b"\n\n")
            if joined[:6] == b"data: " and joined.count(b"\n") == 2 * n and joined.count(b"\n\ndata: ") == n - 1:
                return [joined]
        return super()._payloads(held)

    def on_event(self, name, data):
        if data[:6] == b"[DONE]":
            self.complete = True
            return
        if self.upstream_id is None or has_nonnull_usage(data) or b'"error"' in data:
            obj = _loads(data)
            if not isinstance(obj, dict):
                return
            self._set_id(obj)
            u = _chunk_usage(obj)
            if "error" in obj and isinstance(obj["error"], dict):
                self.error = True
                self.error_detail = obj["error"]
                if u is None:
                    return
                # OpenRouter's mid-stream error chunk carries the usage it bills.
                self.error_usage = True
            if u is not None:
                self.usage = usage_from_openai(u)
                if obj.get("choices") == []:
                    self.complete = True
        if b'"content":[' in data or b'"content": [' in data:
            # Content as a list of parts (Mistral's thinking and text parts):
            # the regex sees only string values, so read this one parsed.
            # (Chunks with logprobs, {"content":[...]}, land here too: slower,
            # and counted the same.)
            obj = _loads(data)
            if isinstance(obj, dict):
                self._choices(obj.get("choices"))
            return
        self._keep_raw(data)

    def _choices(self, choices) -> None:
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            part = choice.get("delta")
            if not isinstance(part, dict):
                part = choice.get("message")
            if isinstance(part, dict):
                self._message(part)
            else:
                self._keep(choice.get("text"))  # legacy completions

    def _message(self, msg: dict) -> None:
        self._keep(msg.get("reasoning_content"))
        self._keep(msg.get("reasoning"))
        content = msg.get("content")
        if isinstance(content, list):  # content parts (Mistral)
            _parts(content, self._keep)
        else:
            self._keep(content)
        self._keep(msg.get("refusal"))
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    self._keep(fn.get("name"))
                    self._keep(fn.get("arguments"))
        fn = msg.get("function_call")
        if isinstance(fn, dict):
            self._keep(fn.get("name"))
            self._keep(fn.get("arguments"))

    def _body(self, obj):
        self._set_id(obj)
        u = _chunk_usage(obj)
        if u is not None:
            self.usage = usage_from_openai(u)
        self._choices(obj.get("choices"))


class OpenAICompletionsAccumulator(OpenAIChatAccumulator):
    """``/v1/completions`` (legacy): same chunk shape, ``choices[].text``."""
    __slots__ = ()


    api = "openai.completions"
    _TEXT = _string_values("text")


_LEADING_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([^"\\]+)"')


def _json_type(data: bytes) -> bytes | None:
    """
    The ``type`` of a data-only event: found by a regex when it is the
    first member (as every provider sends it), else by parsing.
    """
    m = _LEADING_TYPE.match(data)
    if m is not None:
        return m.group(1)
    if b'"type"' not in data:
        return None
    obj = _loads(data)
    t = obj.get("type") if isinstance(obj, dict) else None
    return t.encode() if isinstance(t, str) else None


class OpenAIResponsesAccumulator(UsageAccumulator):
    """
    ``/v1/responses``. Events are told apart by name, so only
    ``response.created`` (id), the terminal events and ``error`` are parsed,
    plus ``*.delta`` text events while sampling.
    """
    __slots__ = ()


    api = "openai.responses"
    _TEXT = _string_values("delta")
    _TEXT_DELTAS = frozenset(
        [
            b"response.output_text.delta",
            b"response.function_call_arguments.delta",
            b"response.refusal.delta",
            b"response.reasoning_text.delta",
            b"response.reasoning_summary_text.delta",
            b"response.custom_tool_call_input.delta",
            b"response.code_interpreter_call_code.delta",
        ]
    )
    _TERMINAL = frozenset([b"response.completed", b"response.incomplete", b"response.failed"])
    # Anything on_event parses: the id, terminal and error events (named,
    # or typed in the JSON of OpenRouter's data-only events).
    _PARSED = re.compile(rb"response\.(?:created|completed|incomplete|failed)|error")

    def on_block(self, block):
        if self._PARSED.search(block) is not None:
            return False
        return self._hold(block)

    def _text_event(self, name, data):
        if name is None:
            name = _json_type(data)
        return name in self._TEXT_DELTAS

    def on_event(self, name, data):
        if name is None:
            # OpenRouter sends data-only events: the type is in the JSON.
            # Proxies may also append "data: [DONE]".
            name = _json_type(data)
            if name is None:
                return
        if name in self._TEXT_DELTAS:
            self._keep_raw(data)
            return
        if name in self._TERMINAL or name == b"response.created":
            obj = _loads(data)
            resp = obj.get("response") if isinstance(obj, dict) else None
            if not isinstance(resp, dict):
                return
            self._set_id(resp)
            if name == b"response.created":
                return
            u = resp.get("usage")
            if isinstance(u, dict):
                self.usage = usage_from_openai(u)
            if name == b"response.failed":
                self.error = True
                self.error_detail = resp.get("error")
                # The failed Response's usage is the provider's own count
                # of the tokens it used (the same field response.completed
                # carries): reported, not an estimate floored by it.
                self.error_usage = self.usage is not None and self.usage.output_tokens is not None
            else:
                self.complete = True
            return
        if name == b"error":
            self.error = True
            self.error_detail = _loads(data)

    def _body(self, obj):
        self._set_id(obj)
        u = obj.get("usage")
        if isinstance(u, dict):
            self.usage = usage_from_openai(u)
        output = obj.get("output")
        if not isinstance(output, list):
            return
        for item in output:
            if not isinstance(item, dict):
                continue
            self._keep(item.get("arguments"))
            content = item.get("content")
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict):
                        self._keep(part.get("text") or part.get("refusal"))
            summary = item.get("summary")
            if isinstance(summary, list):
                for part in summary:
                    if isinstance(part, dict):
                        self._keep(part.get("text"))


class OpenAIEmbeddingsAccumulator(UsageAccumulator):
    """``/v1/embeddings``: body only, no output tokens."""
    __slots__ = ()


    api = "openai.embeddings"

    def _body(self, obj):
        u = obj.get("usage")
        if isinstance(u, dict):
            self.usage = usage_from_openai(u, embeddings=True)
        model = obj.get("model")
        if isinstance(model, str):
            self.model = model


class AnthropicMessagesAccumulator(UsageAccumulator):
    """
    ``/v1/messages``. ``message_start`` sets usage; each ``message_delta``
    replaces the fields it carries (cumulative values, never summed);
    ``message_stop`` completes; ``error`` flags. Only those events, plus
    ``content_block_delta`` while sampling, are parsed.
    """
    __slots__ = ("_raw", "_iterations")


    api = "anthropic.messages"
    # "content": compaction_delta (the summary a compaction iteration wrote).
    _TEXT = _string_values("text", "partial_json", "thinking", "content")

    # The events on_event parses, as event lines (Anthropic names every
    # event; a data-only event is ignored).
    _PARSED = re.compile(rb"event: ?(?:message_|error)")

    def __init__(self, sample_cap: int = DEFAULT_SAMPLE_CAP) -> None:
        super().__init__(sample_cap)
        self._raw: dict = {}
        self._iterations: dict | None = None

    def on_block(self, block):
        if self._PARSED.search(block) is not None:
            return False
        return self._hold(block)

    def _text_event(self, name, data):
        return name == b"content_block_delta"

    def on_event(self, name, data):
        if name == b"content_block_delta":
            # text_delta, input_json_delta, thinking_delta; not
            # signature_delta (opaque, not output text).
            self._keep_raw(data)
        elif name == b"message_start":
            obj = _loads(data)
            msg = obj.get("message") if isinstance(obj, dict) else None
            if isinstance(msg, dict):
                self._set_id(msg)
                u = msg.get("usage")
                if isinstance(u, dict):
                    self._raw = {}
                    self._iterations = None
                    self._replace(u)
        elif name == b"message_delta":
            obj = _loads(data)
            u = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(u, dict):
                self._replace(u)
        elif name == b"message_stop":
            self.complete = True
        elif name == b"error":
            self.error = True
            obj = _loads(data)
            self.error_detail = obj.get("error") if isinstance(obj, dict) else obj

    def _replace(self, u: dict) -> None:
        _anthropic_raw(u, self._raw)
        iterations = _anthropic_iterations(u)
        if iterations is not None:
            self._iterations = iterations
        self.usage = _usage_from_anthropic_raw(self._iterations or self._raw)

    def _body(self, obj):
        self._set_id(obj)
        u = obj.get("usage")
        if isinstance(u, dict):
            self._raw = {}
            self._iterations = None
            self._replace(u)
        content = obj.get("content")
        if isinstance(content, list):
            for block in content:
                if not isinstance(block, dict):
                    continue
                self._keep(block.get("text") or block.get("thinking"))
                if block.get("type") == "compaction":
                    self._keep(block.get("content"))
                if block.get("type") in ("tool_use", "server_tool_use") and "input" in block:
                    self._keep(json.dumps(block["input"], ensure_ascii=False))


class AnthropicCountTokensAccumulator(UsageAccumulator):
    """
    ``/v1/messages/count_tokens``: free to call, so usage is zero; the
    count it answers is kept in C{counted_tokens}.
    """
    __slots__ = ("counted_tokens",)


    api = "anthropic.count_tokens"

    def __init__(self, sample_cap: int = DEFAULT_SAMPLE_CAP) -> None:
        super().__init__(sample_cap)
        self.counted_tokens: int | None = None

    def _body(self, obj):
        self.counted_tokens = _int(obj.get("input_tokens"))
        self.usage = Usage(input_tokens=0, output_tokens=0)


_ACCUMULATORS = {
    cls.api: cls
    for cls in (
        OpenAIChatAccumulator,
        OpenAICompletionsAccumulator,
        OpenAIResponsesAccumulator,
        OpenAIEmbeddingsAccumulator,
        AnthropicMessagesAccumulator,
        AnthropicCountTokensAccumulator,
    )
}
APIS = frozenset(_ACCUMULATORS)


def make_accumulator(api: str, sample_cap: int = DEFAULT_SAMPLE_CAP) -> UsageAccumulator:
    """
    A fresh accumulator for one request to C{api} (one of L{APIS}).

    @raise ValueError: unknown api.
    """
    try:
        cls = _ACCUMULATORS[api]
    except KeyError:
        raise ValueError(f"unknown api {api!r}; expected one of {sorted(APIS)}") from None
    return cls(sample_cap)

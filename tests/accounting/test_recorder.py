"""
Accounting through the relay, in memory: every fixture replayed by a fake
upstream, whole and in small slices, must leave exactly the usage its README
declares in the one record of its request.
"""

from __future__ import annotations

import json
import os
from typing import Any

import tiktoken
from twisted.internet.defer import maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting import tokens
from llmgate.accounting.recorder import Accounting, strip_usage_chunks
from llmgate.mock.provider import mock_text
from tests.fakes import SSE_HEADERS, FakeResponse, Gateway, make_config, next_turn, parse_response

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(tokens.__file__)), "mock", "fixtures")


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


class ListLedger:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def record(self, rec: Any) -> None:
        self.records.append(rec)


class AccountingGateway(Gateway):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = ListLedger()
        # Estimates and big bodies are counted off the reactor thread, as
        # twistd llmgate does: their records arrive a turn later.
        acc = Accounting(self.clock, ledger=self.ledger, in_thread=next_turn(self.clock))
        self.resource.accounting = acc


# fixture, route, request body, expected (input, output, cached, creation, reasoning)
STREAMS = [
    ("openai_chat_stream.sse", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}, (24, 17, 0, 0, 0)),
    ("openai_chat_stream_crlf.sse", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}, (24, 17, 0, 0, 0)),
    ("openai_chat_stream_tools.sse", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}, (1290, 58, 1024, 0, 0)),
    ("openai_responses_stream.sse", "/v1/responses", {"model": "gpt-4o", "stream": True}, (38, 21, 0, 0, 0)),
    ("anthropic_messages_stream.sse", "/v1/messages", {"model": "claude-sonnet-4", "stream": True}, (1573, 48, 0, 1536, 0)),
    ("anthropic_messages_stream_tools.sse", "/v1/messages", {"model": "claude-sonnet-4", "stream": True}, (4751, 91, 4096, 0, 0)),
    ("anthropic_messages_stream_cache_1h.sse", "/v1/messages", {"model": "claude-sonnet-4", "stream": True}, (7221, 61, 1024, 6144, 0)),
    # Real provider shapes (fixtures/README.md, "Shapes from other providers").
    ("anthropic_messages_stream_compaction.sse", "/v1/messages", {"model": "claude-sonnet-4", "stream": True}, (60997, 3341, 0, 0, 0)),
    ("openrouter_responses_stream.sse", "/v1/responses", {"model": "gpt-4o", "stream": True}, (31, 17, 0, 0, 0)),
    ("groq_chat_stream_x_groq.sse", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}, (18, 439, 0, 0, 0)),
    ("groq_chat_stream_reasoning.sse", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}, (17, 1107, 0, 0, 963)),
    ("deepseek_chat_stream_tools.sse", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}, (339, 83, 320, 0, 39)),
    ("mistral_chat_stream_thinking.sse", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}, (10, 46, 0, 0, 0)),
    ("huggingface_chat_stream.sse", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}, (44, 8, 0, 0, 0)),
]
# Streams that end in an in-band error but carry the usage the provider bills.
ERROR_STREAMS = [
    ("openrouter_chat_stream_error.sse", "/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}, (42, 31, 0, 0, 19)),
]
# The 1-hour part of each fixture's cache writes (0 for those not listed).
CACHE_1H = {"anthropic_messages_stream_cache_1h.sse": 4096}
BODIES = [
    ("openai_chat.json", "/v1/chat/completions", {"model": "o3"}, (1432, 312, 1280, 0, 256)),
    ("openai_embeddings.json", "/v1/embeddings", {"model": "text-embedding-3-small"}, (11, 0, 0, 0, 0)),
    ("anthropic_messages.json", "/v1/messages", {"model": "claude-sonnet-4"}, (3286, 96, 3072, 0, 0)),
]


def reference_encoding(name: str) -> Any:
    """
    tiktoken's own encoding C{name}, loaded the offline way tiktoken
    documents (its cache directory holding the BPE file under the sha1 of
    its URL; tiktoken checks the file's hash), not through llmgate.
    """
    import hashlib
    import shutil
    import tempfile

    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    cache = os.path.join(tempfile.gettempdir(), "llmgate-test-tiktoken")
    os.makedirs(cache, exist_ok=True)
    shutil.copyfile(
        os.path.join(os.path.dirname(tokens.__file__), "encodings", name + ".tiktoken"),
        os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()),
    )
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    try:
        return tiktoken.get_encoding(name)
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def relayed_text(data: bytes) -> str:
    """
    The generated text in the complete events of C{data}, decoded with
    json (independently of llmgate's accumulators): content and content
    parts, reasoning of every spelling, refusals, tool-call arguments;
    Anthropic text, thinking, input_json_delta and compaction deltas;
    Responses text/arguments/reasoning deltas.
    """
    out: list[str] = []

    def parts(value: Any) -> None:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            for p in value:
                if isinstance(p, dict):
                    parts(p.get("text"))
                    parts(p.get("thinking"))

    for event in data.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]:
        for line in event.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            obj = json.loads(line[6:])
            kind = obj.get("type", "")
            if kind == "content_block_delta":
                delta = obj["delta"]
                for key in ("text", "thinking", "partial_json", "content"):
                    parts(delta.get(key))
            elif kind.startswith("response.") and kind.endswith(".delta"):
                parts(obj.get("delta"))
            for choice in obj.get("choices") or []:
                delta = choice.get("delta") or {}
                for key in ("content", "reasoning", "reasoning_content", "refusal"):
                    parts(delta.get(key))
                for call in delta.get("tool_calls") or []:
                    parts((call.get("function") or {}).get("arguments"))
    return "".join(out)


def buckets(rec: Any) -> tuple[int, ...]:
    return (rec.input_tokens, rec.output_tokens, rec.cached_input_tokens, rec.cache_creation_tokens, rec.reasoning_tokens)


class FixtureAccountingTests(SynchronousTestCase):
    def replay(self, name: str, route: str, body: dict[str, Any], slice_size: int, headers: dict[bytes, list[bytes]]) -> tuple[AccountingGateway, Any]:
        gw = AccountingGateway()
        _, transport = gw.post(route, body)
        r = FakeResponse(200, headers)
        gw.http.calls[0]["deferred"].callback(r)
        data = fixture(name)
        for i in range(0, len(data), slice_size):
            r.send(data[i:i + slice_size])
        r.end()
        return gw, transport

    def test_streams_whole_and_sliced(self) -> None:
        """
        Each stream fixture, fed whole and in 1..7-byte slices, is relayed
        byte for byte and leaves its declared usage, reported, once.
        """
        for name, route, body, want in STREAMS:
            for size in (1 << 20, 1, 2, 3, 5, 7):
                gw, transport = self.replay(name, route, body, size, SSE_HEADERS)
                _, _, got, complete = parse_response(transport.value())
                self.assertEqual(got, fixture(name), (name, size))
                self.assertTrue(complete)
                [rec] = gw.ledger.records
                self.assertEqual(buckets(rec), want, (name, size))
                self.assertEqual(rec.cache_creation_1h_tokens, CACHE_1H.get(name, 0), (name, size))
                self.assertEqual((rec.source, rec.outcome), ("reported", "completed"), (name, size))
                self.assertIsNotNone(rec.upstream_id)

    def test_error_streams_keep_the_billed_usage(self) -> None:
        """
        A stream whose final chunk carries both an error and the usage the
        provider bills (OpenRouter), fed whole and in 1..7-byte slices, is
        relayed byte for byte and recorded as an upstream error with that
        usage, reported, not an estimate.
        """
        for name, route, body, want in ERROR_STREAMS:
            for size in (1 << 20, 1, 2, 3, 5, 7):
                gw, transport = self.replay(name, route, body, size, SSE_HEADERS)
                gw.clock.advance(0)
                self.assertEqual(parse_response(transport.value())[2], fixture(name), (name, size))
                [rec] = gw.ledger.records
                self.assertEqual(buckets(rec), want, (name, size))
                self.assertEqual((rec.source, rec.outcome), ("reported", "upstream_error"), (name, size))

    def test_responses_failed_with_usage_is_reported(self) -> None:
        """
        A Responses stream that ends in ``response.failed`` whose Response
        carries usage (the provider's count of the tokens it used), fed
        whole and in 1..7-byte slices, is recorded as an upstream error
        with that usage as reported, not as an estimate floored by it.
        """
        data = (
            b'event: response.created\n'
            b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_f1","object":"response",'
            b'"status":"in_progress","model":"gpt-4o-2024-08-06","usage":null}}\n\n'
            b'event: response.output_text.delta\n'
            b'data: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_f1","output_index":0,'
            b'"content_index":0,"delta":"Tides rise twice"}\n\n'
            b'event: response.failed\n'
            b'data: {"type":"response.failed","sequence_number":2,"response":{"id":"resp_f1","object":"response",'
            b'"status":"failed","model":"gpt-4o-2024-08-06","error":{"code":"server_error","message":"The model failed."},'
            b'"usage":{"input_tokens":120,"input_tokens_details":{"cached_tokens":64},"output_tokens":3,'
            b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}}\n\n'
        )
        for size in (1 << 20, 1, 2, 3, 5, 7):
            gw = AccountingGateway()
            _, transport = gw.post("/v1/responses", {"model": "gpt-4o", "stream": True, "input": "tides"})
            r = FakeResponse(200, SSE_HEADERS)
            gw.http.calls[0]["deferred"].callback(r)
            for i in range(0, len(data), size):
                r.send(data[i:i + size])
            r.end()
            gw.clock.advance(0)
            self.assertEqual(parse_response(transport.value())[2], data, size)
            [rec] = gw.ledger.records
            self.assertEqual(buckets(rec), (120, 3, 64, 0, 0), size)
            self.assertEqual((rec.source, rec.outcome), ("reported", "upstream_error"), size)

    def test_cache_1h_writes_cost_the_1h_price(self) -> None:
        """
        The 1-hour cache writes of a stream are charged at the model's
        1-hour write price, the rest of the writes at the 5-minute price.
        """
        gw, _ = self.replay(
            "anthropic_messages_stream_cache_1h.sse", "/v1/messages", {"model": "claude-sonnet-4", "stream": True}, 1 << 20, SSE_HEADERS
        )
        [rec] = gw.ledger.records
        # claude-sonnet-4-5-20250929 (the served model) in prices.json, USD
        # per 1M: input 3, cached_input 0.3, cache_write 3.75,
        # cache_write_1h 6, output 15. Uncached 53*3 = 159; read
        # 1024*0.3 = 307.2; 5-minute writes 2048*3.75 = 7680; 1-hour
        # writes 4096*6 = 24576; output 61*15 = 915. Sum 33637.2.
        self.assertAlmostEqual(rec.cost_usd, 33637.2 / 1e6, places=12)

    def test_cancelled_stream_keeps_reported_1h_writes(self) -> None:
        """
        An Anthropic stream whose client leaves halfway is estimated, but
        keeps the cache writes message_start reported, the 1-hour part
        included, and is charged for them.
        """
        data = fixture("anthropic_messages_stream_cache_1h.sse")
        cut = data.index(b"\n\n", len(data) // 2) + 2
        gw = AccountingGateway()
        channel, _ = gw.post("/v1/messages", {"model": "claude-sonnet-4", "stream": True, "messages": []})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        r.send(data[:cut])
        gw.clock.advance(0)
        channel.connectionLost(Failure(ConnectionDone()))
        gw.clock.advance(0)
        gw.clock.advance(0)
        [rec] = gw.ledger.records
        self.assertEqual((rec.outcome, rec.source), ("client_cancelled", "estimated"))
        self.assertEqual(
            (rec.input_tokens, rec.cached_input_tokens, rec.cache_creation_tokens, rec.cache_creation_1h_tokens), (7221, 1024, 6144, 4096)
        )
        # Input as in test_cache_1h_writes_cost_the_1h_price: 32722.2 per
        # 1M before output, at 15 per 1M output token.
        self.assertAlmostEqual(rec.cost_usd, (32722.2 + rec.output_tokens * 15) / 1e6, places=12)

    def test_cancelled_halfway_estimates_every_kind_of_text(self) -> None:
        """
        Each fixture, its client gone after half the stream: the estimate
        is within 5% of tiktoken on the decoded text relayed -- content,
        reasoning (reasoning, reasoning_content, Mistral thinking parts,
        Anthropic thinking), tool-call arguments and input_json_delta,
        compaction summaries -- not on its JSON-escaped bytes.
        """
        cases = [
            ("groq_chat_stream_reasoning.sse", "/v1/chat/completions", "gpt-4o", "o200k_base"),
            ("groq_chat_stream_x_groq.sse", "/v1/chat/completions", "gpt-4o", "o200k_base"),
            ("deepseek_chat_stream_tools.sse", "/v1/chat/completions", "gpt-4o", "o200k_base"),
            ("mistral_chat_stream_thinking.sse", "/v1/chat/completions", "gpt-4o", "o200k_base"),
            ("openrouter_chat_stream_error.sse", "/v1/chat/completions", "gpt-4o", "o200k_base"),
            ("openai_chat_stream_tools.sse", "/v1/chat/completions", "gpt-4o", "o200k_base"),
            ("openrouter_responses_stream.sse", "/v1/responses", "gpt-4o", "o200k_base"),
            ("anthropic_messages_stream_tools.sse", "/v1/messages", "claude-sonnet-4", "cl100k_base"),
            ("anthropic_messages_stream_compaction.sse", "/v1/messages", "claude-sonnet-4", "cl100k_base"),
        ]
        for name, route, model, encoding in cases:
            data = fixture(name)
            cut = data.index(b"\n\n", len(data) // 2) + 2
            text = relayed_text(data[:cut])
            self.assertTrue(text, name)
            want = len(reference_encoding(encoding).encode_ordinary(text))
            gw = AccountingGateway()
            channel, transport = gw.post(route, {"model": model, "stream": True, "messages": [], "stream_options": {"include_usage": True}})
            r = FakeResponse(200, SSE_HEADERS)
            gw.http.calls[0]["deferred"].callback(r)
            for i in range(0, cut, 7):
                r.send(data[i:min(i + 7, cut)])
            gw.clock.advance(0)
            channel.connectionLost(Failure(ConnectionDone()))
            gw.clock.advance(0)
            gw.clock.advance(0)
            [rec] = gw.ledger.records
            self.assertEqual((rec.outcome, rec.source), ("client_cancelled", "estimated"), name)
            self.assertLessEqual(abs(rec.output_tokens - want), 0.05 * want, (name, rec.output_tokens, want))

    def test_bodies(self) -> None:
        """Non-streaming fixtures leave their declared usage."""
        for name, route, body, want in BODIES:
            gw, transport = self.replay(name, route, body, 100, {b"content-type": [b"application/json"]})
            self.assertEqual(parse_response(transport.value())[2], fixture(name))
            [rec] = gw.ledger.records
            self.assertEqual(buckets(rec), want, name)
            self.assertEqual(rec.source, "reported")
            self.assertFalse(rec.streamed)
            self.assertEqual(rec.bytes_in, len(json.dumps(body)))

    def test_truncated_stream_is_estimated(self) -> None:
        """
        A stream cut by the upstream has no provider usage: the record is
        an upstream error with an estimate of the text relayed so far.
        """
        gw = AccountingGateway()
        body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Tell me about lighthouses"}]}
        _, transport = gw.post("/v1/chat/completions", body)
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        r.send(fixture("openai_chat_stream_truncated.sse"))
        r.fail()
        gw.clock.advance(0)  # the estimate runs off the reactor thread
        [rec] = gw.ledger.records
        self.assertEqual((rec.outcome, rec.phase, rec.source), ("upstream_error", "body", "estimated"))
        # The relayed text, "Lighthouse keepers once burned whale oil", is 8
        # o200k_base tokens: L|ighthouse| keep|ers| once| burned| whale| oil.
        self.assertEqual(rec.output_tokens, 8)
        self.assertGreater(rec.input_tokens, 0)
        self.assertNotIn(b"[DONE]", transport.value())

    def test_anthropic_error_event(self) -> None:
        """
        An Anthropic stream that ends in an error event keeps the input the
        provider reported and estimates the output; it is not a success.
        """
        gw, transport = self.replay(
            "anthropic_messages_stream_error.sse", "/v1/messages", {"model": "claude-sonnet-4", "stream": True}, 7, SSE_HEADERS
        )
        self.assertIn(b"event: error", transport.value())
        gw.clock.advance(0)  # the estimate runs off the reactor thread
        [rec] = gw.ledger.records
        self.assertEqual((rec.outcome, rec.source, rec.input_tokens), ("upstream_error", "estimated", 58))
        # "Sourdough starters need feeding roughly every" is 8 cl100k_base
        # tokens: S|ourd|ough| starters| need| feeding| roughly| every.
        self.assertEqual(rec.output_tokens, 8)

    def test_client_cancel_estimates_relayed_tokens(self) -> None:
        """
        A client that leaves after N chunks yields one estimated record
        whose output tokens are the tokens actually relayed.
        """
        gw = AccountingGateway()
        channel, _ = gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": []})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        for i in range(6):
            word = mock_text(6).split(" ")[1:][i]
            r.send(b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":" ' + word.encode() + b'"}}],"usage":null}\n\n')
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(r.transport.stopped)
        gw.clock.advance(0)  # the upstream's connectionLost, a turn later
        [rec] = gw.ledger.records
        self.assertEqual((rec.outcome, rec.phase, rec.source), ("client_cancelled", "body", "estimated"))
        self.assertEqual(rec.output_tokens, 6)

    def test_upstream_error_status_has_no_tokens(self) -> None:
        """A relayed upstream 429 is recorded with no tokens and no cost."""
        gw = AccountingGateway()
        gw.post("/v1/chat/completions", {"model": "gpt-4o"})
        r = FakeResponse(429, {b"content-type": [b"application/json"]})
        gw.http.calls[0]["deferred"].callback(r)
        r.send(fixture("openai_error_429.json"))
        r.end()
        [rec] = gw.ledger.records
        self.assertEqual((rec.status, rec.input_tokens, rec.output_tokens, rec.cost_usd), (429, None, None, None))

    def test_cost_and_unknown_price(self) -> None:
        """A priced model gets a cost; an unpriced one gets null, never 0."""
        gw, _ = self.replay("openai_chat.json", "/v1/chat/completions", {"model": "gpt-4o"}, 1000, {b"content-type": [b"application/json"]})
        self.assertGreater(gw.ledger.records[0].cost_usd, 0)
        # The fixture's body names the (priced) model that served it; this
        # one names an unpriced one.
        gw = AccountingGateway()
        gw.post("/v1/chat/completions", {"model": "my-own-model"})
        r = FakeResponse(200, {b"content-type": [b"application/json"]})
        gw.http.calls[0]["deferred"].callback(r)
        r.send(fixture("openai_chat.json").replace(b"o4-mini-2025-04-16", b"my-own-model"))
        r.end()
        self.assertIsNone(gw.ledger.records[0].cost_usd)


class _CountingRegex:
    """Wraps an accumulator's text regex, counting its extractions."""

    def __init__(self, pattern: Any) -> None:
        self.pattern = pattern
        self.calls = 0

    def findall(self, data: bytes) -> list[bytes]:
        self.calls += 1
        return self.pattern.findall(data)


def _blocks(data: bytes) -> list[bytes]:
    """One whole event per block, as the relay's framer hands them over."""
    return [e + b"\n\n" for e in data.split(b"\n\n") if e]


def _data_objects(data: bytes) -> list[Any]:
    """The JSON of every data line, parsed here independently of llmgate."""
    out = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


class OnePassTests(SynchronousTestCase):
    """
    The relay's framer finds the events once; the counter looks into a block
    of plain content events only with byte searches, holds it, and extracts
    its text only when an estimate needs it or the hold is full.
    """

    def _text_regex(self, cls: Any) -> _CountingRegex:
        counting = _CountingRegex(cls._TEXT)
        self.patch(cls, "_TEXT", counting)
        return counting

    def test_completed_streams_extract_no_text(self) -> None:
        """
        A chat, Messages or Responses stream that ends with its usage runs
        the text extraction only when HOLD_BYTES of events are held (never
        for the shorter Messages and Responses fixtures), and relays every
        content block as the same bytes object; asked afterwards, the held
        text is the text the stream generated.
        """
        from llmgate.accounting import usage as usage_mod
        from llmgate.accounting.recorder import RequestCounter
        from llmgate.accounting.usage import HOLD_BYTES

        self.assertLess(len(fixture("anthropic_messages_stream.sse")), HOLD_BYTES)

        def chat_text(objs: list[Any]) -> str:
            return "".join(
                (c.get("delta") or {}).get("content") or "" for o in objs for c in o.get("choices", [])
            )

        def anthropic_text(objs: list[Any]) -> str:
            return "".join(
                o["delta"].get("text", "") for o in objs if o.get("type") == "content_block_delta"
            )

        def responses_text(objs: list[Any]) -> str:
            return "".join(o["delta"] for o in objs if o.get("type") == "response.output_text.delta")

        cases = [
            ("openai_chat_stream.sse", "openai.chat", usage_mod.OpenAIChatAccumulator, chat_text, 17),
            ("anthropic_messages_stream.sse", "anthropic.messages", usage_mod.AnthropicMessagesAccumulator, anthropic_text, 48),
            ("openai_responses_stream.sse", "openai.responses", usage_mod.OpenAIResponsesAccumulator, responses_text, 21),
        ]
        for name, api, cls, text_of, output_tokens in cases:
            counting = self._text_regex(cls)
            counter = RequestCounter(api, strip_usage=False)
            out = []
            same = 0
            for block in _blocks(fixture(name)):
                relayed = counter.relay(block)
                same += relayed is block
                out.append(relayed)
            self.assertEqual(b"".join(out), fixture(name), name)
            self.assertTrue(counter.acc.complete, name)
            self.assertEqual(counter.acc.usage.output_tokens, output_tokens, name)
            # Extracted only each time the hold filled: never for a stream
            # shorter than the hold.
            self.assertLessEqual(counting.calls, len(fixture(name)) // HOLD_BYTES, name)
            self.assertEqual(same, len(out), name)
            expected = text_of(_data_objects(fixture(name)))
            self.assertTrue(expected, name)
            self.assertEqual(counter.acc.sample_text(), expected, name)
            self.assertEqual(counter.acc.text_bytes, len(expected.encode("utf-8")), name)
            self.assertEqual(counter.acc.held_bytes, 0, name)

    def test_held_bytes_are_bounded(self) -> None:
        """
        A long stream holds less than HOLD_BYTES of relayed events at any
        time, extracting a batch each time the hold fills, and its text
        comes out whole and in order.
        """
        from llmgate.accounting.recorder import RequestCounter
        from llmgate.accounting.usage import HOLD_BYTES, OpenAIChatAccumulator

        counting = self._text_regex(OpenAIChatAccumulator)
        counter = RequestCounter("openai.chat", strip_usage=False)
        head = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o","choices":'
        words = [f"w{i} \u2014 \\\"q\\\" " for i in range(400)]
        total = 0
        counter.relay(head + b'[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')
        for w in words:
            block = head + b'[{"index":0,"delta":{"content":"' + w.encode() + b'"}}]}\n\n'
            total += len(block)
            self.assertIs(counter.relay(block), block)
            self.assertLess(counter.acc.held_bytes, HOLD_BYTES)
        self.assertGreater(total, 4 * HOLD_BYTES)
        self.assertGreaterEqual(counting.calls, total // HOLD_BYTES)
        expected = "".join(json.loads('"' + w + '"') for w in words)
        self.assertEqual(counter.acc.sample_text(), expected)

    def test_strip_after_held_blocks(self) -> None:
        """
        With usage to strip, content blocks are relayed as they came and the
        usage-only chunk is still taken out; the usage is the provider's.
        """
        from llmgate.accounting.recorder import RequestCounter

        counter = RequestCounter("openai.chat", strip_usage=True)
        data = fixture("openai_chat_stream.sse")
        out = b"".join(counter.relay(b) for b in _blocks(data))
        self.assertNotIn(b'"choices":[]', out)
        self.assertEqual(out, b"".join(b for b in _blocks(data) if b'"choices":[]' not in b))
        self.assertEqual(counter.acc.usage.output_tokens, 17)


class StripTests(SynchronousTestCase):
    def test_injected_usage_chunk_is_removed(self) -> None:
        """
        When the gateway asked for usage, the client receives the stream
        without the usage-only chunk and otherwise byte for byte; the
        record still has the provider's usage.
        """
        gw = AccountingGateway()
        _, transport = gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True})
        self.assertEqual(json.loads(gw.http.calls[0]["data"])["stream_options"], {"include_usage": True})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        data = fixture("openai_chat_stream.sse")
        for i in range(0, len(data), 5):
            r.send(data[i:i + 5])
        r.end()
        got = parse_response(transport.value())[2]
        events = data.split(b"\n\n")
        usage_event = [e for e in events if b'"choices":[]' in e]
        self.assertEqual(len(usage_event), 1)
        self.assertEqual(got, data.replace(usage_event[0] + b"\n\n", b""))
        self.assertEqual(buckets(gw.ledger.records[0]), (24, 17, 0, 0, 0))

    def test_usage_on_finish_chunk_is_removed(self) -> None:
        """
        A provider that puts the usage the gateway asked for on the finish
        chunk (no usage-only chunk): the client gets that chunk without
        its C{usage} member, every other event byte for byte, and the
        record has the usage.
        """
        gw = AccountingGateway()
        _, transport = gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        first = chat_chunk("gpt-4o", "Hello")
        finish = chat_chunk("gpt-4o", finish="stop", usage=USAGE_24_17)
        data = first + finish + b"data: [DONE]\n\n"
        for i in range(0, len(data), 5):
            r.send(data[i:i + 5])
        r.end()
        got = parse_response(transport.value())[2]
        events = got.split(b"\n\n")
        self.assertEqual(events[0] + b"\n\n", first)
        self.assertEqual(events[2:], [b"data: [DONE]", b""])
        sent = json.loads(events[1][len(b"data: "):])
        self.assertNotIn("usage", sent)
        self.assertEqual(sent["choices"][0]["finish_reason"], "stop")
        self.assertEqual(sent["id"], "chatcmpl-s1")
        self.assertEqual(buckets(gw.ledger.records[0]), (24, 17, 0, 0, 0))

    def test_client_asked_usage_is_kept(self) -> None:
        """
        Usage the client asked for itself is relayed untouched, on the
        finish chunk as elsewhere.
        """
        gw = AccountingGateway()
        _, transport = gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        data = chat_chunk("gpt-4o", "Hello") + chat_chunk("gpt-4o", finish="stop", usage=USAGE_24_17) + b"data: [DONE]\n\n"
        r.send(data)
        r.end()
        self.assertEqual(parse_response(transport.value())[2], data)

    def test_strip_keeps_crlf_framing(self) -> None:
        """Stripping works on CRLF streams and leaves other bytes alone."""
        data = fixture("openai_chat_stream_crlf.sse")
        out = strip_usage_chunks(data)
        # The fixture's 18 data lines (its README) less the usage chunk.
        self.assertEqual(out.count(b"data:"), 17)
        self.assertTrue(out.endswith(b"data: [DONE]\r\n\r\n"))


def chat_chunk(model: str, content: str | None = None, finish: str | None = None, usage: Any = None) -> bytes:
    """One chat stream event (as the fixtures write them)."""
    choices: list[Any] = []
    if content is not None or finish is not None:
        delta = {} if content is None else {"content": content}
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    obj = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1, "model": model,
           "system_fingerprint": None, "choices": choices, "usage": usage}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# Azure's first chunk: prompt filter results, an empty id and model.
AZURE_FILTER = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
    b'[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}\n\n'
)
USAGE_24_17 = {"prompt_tokens": 24, "completion_tokens": 17, "total_tokens": 41}


class ServedModelTests(SynchronousTestCase):
    """
    The model a response names (a router's or fallback's choice) is
    recorded next to the one asked for, and the request priced by it.
    """

    def stream(self, route: str, body: dict[str, Any], data: bytes, headers: Any = SSE_HEADERS) -> Any:
        gw = AccountingGateway()
        gw.post(route, body)
        r = FakeResponse(200, headers)
        gw.http.calls[0]["deferred"].callback(r)
        for i in range(0, len(data), 7):
            r.send(data[i:i + 7])
        r.end()
        gw.clock.advance(0)
        [rec] = gw.ledger.records
        return rec

    def test_router_stream_priced_by_served_model(self) -> None:
        """
        A chat stream from a router deployment (Azure's empty-model filter
        chunk first) records the requested model and the served one, and
        is priced at the served model's rates (gpt-4o-mini: $0.15 in,
        $0.60 out per 1M), not at the requested gpt-4o's.
        """
        data = (
            AZURE_FILTER
            + chat_chunk("gpt-4o-mini-2024-07-18", "Hi")
            + chat_chunk("gpt-4o-mini-2024-07-18", finish="stop")
            + chat_chunk("gpt-4o-mini-2024-07-18", usage=USAGE_24_17)
            + b"data: [DONE]\n\n"
        )
        rec = self.stream("/v1/chat/completions", {"model": "gpt-4o", "stream": True}, data)
        self.assertEqual((rec.model, rec.upstream_model, rec.served_model), ("gpt-4o", "gpt-4o", "gpt-4o-mini-2024-07-18"))
        self.assertEqual((rec.input_tokens, rec.output_tokens, rec.outcome), (24, 17, "completed"))
        self.assertAlmostEqual(rec.cost_usd, (24 * 0.15 + 17 * 0.60) / 1e6)

    def test_fixtures_name_their_served_model(self) -> None:
        """
        Each fixture's served model is found: the chunks' C{model},
        Anthropic's C{message_start.message.model}, the Responses
        C{response.model}, a body's C{model}.
        """
        cases = [
            ("openai_chat_stream.sse", "/v1/chat/completions", {"model": "x", "stream": True}, SSE_HEADERS, "gpt-4o-mini-2024-07-18"),
            ("openai_chat_stream_tools.sse", "/v1/chat/completions", {"model": "x", "stream": True}, SSE_HEADERS, "gpt-4.1-2025-04-14"),
            ("openai_responses_stream.sse", "/v1/responses", {"model": "x", "stream": True}, SSE_HEADERS, "gpt-4.1-mini-2025-04-14"),
            ("anthropic_messages_stream.sse", "/v1/messages", {"model": "x", "stream": True}, SSE_HEADERS, "claude-sonnet-4-5-20250929"),
            ("openai_chat.json", "/v1/chat/completions", {"model": "x"}, {b"content-type": [b"application/json"]}, "o4-mini-2025-04-16"),
            ("anthropic_messages.json", "/v1/messages", {"model": "x"}, {b"content-type": [b"application/json"]}, "claude-sonnet-4-5-20250929"),
            ("openai_embeddings.json", "/v1/embeddings", {"model": "x"}, {b"content-type": [b"application/json"]}, "text-embedding-3-small"),
        ]
        for name, route, body, headers, want in cases:
            rec = self.stream(route, body, fixture(name), headers)
            self.assertEqual((rec.model, rec.served_model), ("x", want), name)
            # "x" has no price; the served model has one.
            self.assertIsNotNone(rec.cost_usd, name)

    def test_unpriced_served_model_has_no_cost(self) -> None:
        """
        A served model without a price leaves the cost unknown, even
        though the requested model has one: its tokens are not charged at
        another model's rate.
        """
        data = chat_chunk("acme-llm-9", "Hi") + chat_chunk("acme-llm-9", usage=USAGE_24_17) + b"data: [DONE]\n\n"
        rec = self.stream("/v1/chat/completions", {"model": "gpt-4o", "stream": True}, data)
        self.assertEqual((rec.served_model, rec.input_tokens, rec.cost_usd), ("acme-llm-9", 24, None))

    def test_vendor_prefixed_served_model(self) -> None:
        """
        An OpenRouter-style C{vendor/model} name is priced by its model
        (gpt-4o-mini), when the table has no entry for the whole name.
        """
        data = chat_chunk("openai/gpt-4o-mini", "Hi") + chat_chunk("openai/gpt-4o-mini", usage=USAGE_24_17) + b"data: [DONE]\n\n"
        rec = self.stream("/v1/chat/completions", {"model": "anthropic/claude-sonnet-4.5", "stream": True}, data)
        self.assertEqual(rec.served_model, "openai/gpt-4o-mini")
        self.assertAlmostEqual(rec.cost_usd, (24 * 0.15 + 17 * 0.60) / 1e6)

    def test_no_served_model_priced_by_upstream(self) -> None:
        """
        A response that names no model records none and is priced by the
        model sent upstream (gpt-4o: $2.50 in, $10 out per 1M).
        """
        chunk = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n'
        usage = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":24,"completion_tokens":17}}\n\n'
        rec = self.stream("/v1/chat/completions", {"model": "gpt-4o", "stream": True}, chunk + usage + b"data: [DONE]\n\n")
        self.assertIsNone(rec.served_model)
        self.assertAlmostEqual(rec.cost_usd, (24 * 2.5 + 17 * 10.0) / 1e6)

    def test_access_log_names_served_model(self) -> None:
        """The access-log line shows the requested and the served model."""
        from twisted.logger import capturedLogs

        with capturedLogs() as events:
            self.stream("/v1/chat/completions", {"model": "gpt-4o", "stream": True}, fixture("openai_chat_stream.sse"))
        lines = [e["line"] for e in events if e.get("log_namespace") == "llmgate.access"]
        self.assertEqual(len(lines), 1)
        self.assertIn("model=gpt-4o ", lines[0])
        self.assertIn("served=gpt-4o-mini-2024-07-18 ", lines[0])
        self.assertIn("outcome=completed ", lines[0])

    def test_access_event_skips_logger_emit(self) -> None:
        """
        The access event reaches the log observers with the keys
        Logger.info gives an event, but without Logger.emit's per-call
        work (it re-validates the level against every LogLevel).
        """
        from twisted.logger import Logger, LogLevel, capturedLogs

        from llmgate.accounting import recorder

        emitted: list[object] = []
        real_emit = Logger.emit
        self.patch(Logger, "emit", lambda self, *a, **kw: (emitted.append(self.namespace), real_emit(self, *a, **kw)))
        with capturedLogs() as events:
            self.stream("/v1/chat/completions", {"model": "gpt-4o", "stream": True}, fixture("openai_chat_stream.sse"))
        access = [e for e in events if e.get("log_namespace") == "llmgate.access"]
        self.assertEqual(len(access), 1)
        event = access[0]
        self.assertNotIn("llmgate.access", emitted)
        self.assertEqual(
            (event["log_level"], event["log_format"], event["log_logger"], event["log_source"]),
            (LogLevel.info, "{line}", recorder.log, None),
        )
        self.assertIsInstance(event["log_time"], float)
        self.assertTrue(event["line"].startswith("POST /v1/chat/completions client="))
        self.assertEqual(event["access"]["model"], "gpt-4o")
        self.assertEqual(event["access"]["served_model"], "gpt-4o-mini-2024-07-18")

    def test_open_row_progress_names_served_model(self) -> None:
        """
        The progress of an open stream carries its served model once the
        first chunk named it.
        """
        gw = Gateway()
        acc = gw.resource.accounting = Accounting(gw.clock, ledger=OpenListLedger())
        gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        r.send(AZURE_FILTER)
        gw.clock.advance(0)
        [p] = acc.progress()
        self.assertIsNone(p.served_model)
        r.send(chat_chunk("gpt-4o-mini-2024-07-18", "Hi"))
        gw.clock.advance(0)
        [p] = acc.progress()
        self.assertEqual(p.served_model, "gpt-4o-mini-2024-07-18")


class TerminalEventTests(SynchronousTestCase):
    """
    A client that closes once it read the terminal event (the openai SDK
    closes on [DONE]) before the upstream's end of body reached the
    gateway got the whole stream: recorded completed, with its usage.
    """

    def start(self, route: str, body: dict[str, Any]) -> tuple[AccountingGateway, Any, FakeResponse]:
        gw = AccountingGateway()
        channel, _ = gw.post(route, body)
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        return gw, channel, r

    def test_close_after_terminal_event_is_completed(self) -> None:
        """
        Each stream fixture, written whole to the client, then the client
        closes before the upstream ends its body: completed, reported usage.
        """
        for name, route, body, want in STREAMS:
            gw, channel, r = self.start(route, body)
            r.send(fixture(name))
            gw.clock.advance(0)  # the coalesced write reaches the client
            channel.connectionLost(Failure(ConnectionDone()))
            self.assertTrue(r.transport.stopped)
            gw.clock.advance(0)  # the upstream's connectionLost, a turn later
            [rec] = gw.ledger.records
            self.assertEqual((rec.outcome, rec.phase, rec.source), ("completed", None, "reported"), name)
            self.assertEqual(buckets(rec), want, name)

    def test_close_before_terminal_written_is_cancelled(self) -> None:
        """
        A client that closes while the terminal event is still held for the
        end of the reactor turn (not written to it) cancelled the stream.
        """
        gw, channel, r = self.start("/v1/chat/completions", STREAMS[0][2])
        r.send(fixture("openai_chat_stream.sse"))
        channel.connectionLost(Failure(ConnectionDone()))
        gw.clock.advance(0)
        [rec] = gw.ledger.records
        self.assertEqual((rec.outcome, rec.phase), ("client_cancelled", "body"))

    def test_close_after_usage_before_done_is_cancelled(self) -> None:
        """
        The usage chunk is not the terminal event: a client that closes
        after it and before [DONE] is still recorded as cancelling.
        """
        gw, channel, r = self.start("/v1/chat/completions", STREAMS[0][2])
        data = fixture("openai_chat_stream.sse")
        r.send(data[: data.index(b"data: [DONE]")])
        gw.clock.advance(0)
        channel.connectionLost(Failure(ConnectionDone()))
        gw.clock.advance(0)
        [rec] = gw.ledger.records
        self.assertEqual((rec.outcome, rec.phase), ("client_cancelled", "body"))


class RejectedTests(SynchronousTestCase):
    def test_rejected_requests_get_one_record_each(self) -> None:
        """
        Requests the gateway refuses itself (bad JSON, unknown model, body
        too large) each leave one record with no tokens and no upstream.
        """
        gw = AccountingGateway()
        gw.post("/v1/chat/completions", None, raw=b"{bad")
        gw.post("/v1/messages", {"model": "claude-x", "max_tokens": 1}, headers={})
        gw2 = Gateway(make_config(providers={"oai": {"kind": "openai", "base_url": "http://up.test/v1"}}), max_body=20)
        gw2.resource.accounting = Accounting(gw2.clock, ledger=gw.ledger)
        gw2.post("/v1/chat/completions", {"model": "nope"})
        channel, _ = gw2.connect()
        channel.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 21\r\n\r\n")
        statuses = sorted((r.route, r.status, r.outcome) for r in gw.ledger.records if r.outcome == "rejected")
        self.assertEqual(
            statuses,
            [("/v1/chat/completions", 400, "rejected"), ("/v1/chat/completions", 404, "rejected"), ("/v1/messages", 413, "rejected")],
        )
        for r in gw.ledger.records:
            if r.outcome == "rejected":
                self.assertIsNone(r.input_tokens)


class IdleTests(SynchronousTestCase):
    def test_idle_waits_for_threaded_estimates(self) -> None:
        """
        A record whose estimate is still running keeps idle() waiting; it
        fires once the record has reached the ledger.
        """
        from twisted.internet.defer import Deferred

        gw = AccountingGateway()
        pending: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

        def in_thread(f: Any, *a: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append((d, f, a))
            return d

        acc = gw.resource.accounting
        acc._in_thread = in_thread
        channel, _ = gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": []})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b'data: {"choices":[{"delta":{"content":" hi"}}]}\n\n')
        channel.connectionLost(Failure(ConnectionDone()))
        gw.clock.advance(0)  # the upstream's connectionLost: the exchange ends
        idle = acc.idle()
        self.assertNoResult(idle)
        self.assertEqual(gw.ledger.records, [])
        d, f, a = pending.pop()
        d.callback(f(*a))
        self.successResultOf(idle)
        self.assertEqual(len(gw.ledger.records), 1)
        self.successResultOf(acc.idle())


class OpenListLedger(ListLedger):
    """A ledger that also takes open rows and a progress source."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[Any] = []
        self.progress_source: Any = None

    def open(self, rec: Any) -> None:
        self.opened.append(rec)


class OpenRowTests(SynchronousTestCase):
    def gateway(self) -> tuple[Gateway, OpenListLedger, Accounting]:
        gw = Gateway()
        ledger = OpenListLedger()
        acc = Accounting(gw.clock, ledger=ledger)
        gw.resource.accounting = acc
        return gw, ledger, acc

    def test_admission_opens_a_row(self) -> None:
        """
        A request admitted to the relay queues an open row at once (before
        any upstream answer) with what is known: route, key, model,
        provider, streamed, bytes in; its final record has the same id.
        """
        gw, ledger, _ = self.gateway()
        body = {"model": "public-model", "stream": True, "messages": []}
        gw.post("/v1/chat/completions", body)
        [row] = ledger.opened
        self.assertEqual(
            (row.outcome, row.route, row.model, row.upstream_model, row.provider, row.streamed, row.status),
            ("open", "/v1/chat/completions", "public-model", "real-model", "oai", True, 0),
        )
        self.assertEqual(row.bytes_in, len(json.dumps(body)))
        self.assertEqual((row.input_tokens, row.output_tokens, row.bytes_out), (None, None, 0))
        self.assertEqual(ledger.records, [])
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        r.send(fixture("openai_chat_stream.sse"))
        r.end()
        [final] = ledger.records
        self.assertEqual((final.request_id, final.outcome), (row.request_id, "completed"))

    def test_open_row_built_only_for_requests_still_open(self) -> None:
        """
        With the durable ledger an open row is built at its next batch, and
        only for a request whose final record is not in that batch: a
        short request that ended first costs no open record; one still
        relaying, or ended with its record still being counted in a thread,
        gets its open row (clipped, outcome open) in that batch.
        """
        import os

        from llmgate.accounting import recorder
        from llmgate.accounting.ledger import Ledger, read_records
        from tests.accounting.test_ledger import syncRunner

        gw = Gateway()
        path = os.path.join(self.mktemp() + "-usage.db")
        ledger = Ledger(path, gw.clock, run_in_thread=syncRunner)
        ledger.startService()
        self.addCleanup(lambda: ledger.running and self.successResultOf(ledger.stopService()))
        acc = gw.resource.accounting = Accounting(gw.clock, ledger=ledger, in_thread=next_turn(gw.clock))
        made: list[str] = []
        real = acc._make_record
        self.patch(acc, "_make_record", lambda ex, usage, outcome, *a: (made.append(outcome), real(ex, usage, outcome, *a))[1])
        gw.resource.config.models.clear()
        # Short: ends (reported usage) before the batch.
        gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": []})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        r.send(fixture("openai_chat_stream.sse"))
        r.end()
        # Long: still relaying at the batch; its model name is clipped.
        gw.post("/v1/chat/completions", {"model": "m" * 5000, "stream": True, "messages": []})
        long_r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[1]["deferred"].callback(long_r)
        long_r.send(b'data: {"id":"c2","model":"x","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n')
        # Counted: ended without usage, its estimate runs in a thread (a turn later).
        gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": []})
        est_r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[2]["deferred"].callback(est_r)
        est_r.send(b'data: {"id":"c3","model":"x","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n')
        est_r.end()
        self.assertEqual(made, ["completed"])
        ledger._tick()
        self.assertEqual(sorted(made), ["completed", "open", "open"])
        rows = read_records(path)
        self.assertEqual(sorted(r["outcome"] for r in rows), ["completed", "open", "open"])
        self.assertIn("m" * 256 + "...[4744 more chars]", [r["model"] for r in rows])
        gw.clock.advance(0)  # the estimate's record
        long_r.send(b'data: {"id":"c2","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]\n\n')
        long_r.end()
        ledger._tick()
        self.assertEqual(sorted(r["outcome"] for r in read_records(path)), ["completed"] * 3)

    def test_open_row_clips_client_strings(self) -> None:
        """
        The open row written at admission caps a client's long model name
        as the final record does: a 32 MB name never reaches the ledger.
        """
        gw, ledger, _ = self.gateway()
        gw.resource.config.models.clear()  # the default provider passes any name upstream
        gw.post("/v1/chat/completions", {"model": "m" * 5000, "stream": True, "messages": []})
        [row] = ledger.opened
        self.assertEqual(row.model, "m" * 256 + "...[4744 more chars]")

    def test_rejected_requests_open_no_row(self) -> None:
        """A request refused before the relay has only its rejected record."""
        gw, ledger, _ = self.gateway()
        gw.post("/v1/chat/completions", {"model": 1})
        self.assertEqual(ledger.opened, [])
        self.assertEqual([r.outcome for r in ledger.records], ["rejected"])

    def test_progress_of_open_streams(self) -> None:
        """
        The accounting gives the ledger the progress of open requests that
        relayed bytes since it last asked: status, bytes out, the reported
        prompt and an estimate of the output (text bytes / 4); none once
        they ended.
        """
        gw, ledger, acc = self.gateway()
        self.assertEqual(ledger.progress_source, acc.progress)
        gw.post("/v1/messages", {"model": "claude-sonnet-4", "stream": True, "max_tokens": 5, "messages": []})
        gw.post("/v1/messages", {"model": "claude-sonnet-4", "stream": True, "max_tokens": 5, "messages": []})
        self.assertEqual(acc.progress(), [])
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        data = fixture("anthropic_messages_stream.sse")
        cut = data.index(b"event: content_block_stop")
        r.send(data[:cut])
        gw.clock.advance(2.5)
        [p] = acc.progress()
        self.assertEqual(p.request_id, ledger.opened[0].request_id)
        relayed_text = b"".join(
            json.loads(line[6:])["delta"]["text"].encode()
            for line in data[:cut].split(b"\n")
            if line.startswith(b"data: ") and b'"text_delta"' in line
        )
        self.assertEqual(
            (p.status, p.bytes_out, p.input_tokens, p.cache_creation_tokens, p.source, p.duration_ms),
            (200, cut, 1573, 1536, "estimated", 2500.0),
        )
        self.assertEqual(p.output_tokens, -(-len(relayed_text) // 4))
        self.assertEqual(acc.progress(), [], "nothing new relayed")
        r.send(data[cut:])
        r.end()
        self.assertEqual(acc.progress(), [])


    def test_progress_is_spread_over_the_ticks(self) -> None:
        """
        Asked with C{parts}, the accounting reports a C{parts}-th of the
        open requests per call, each once per round of C{parts} calls (so
        no tick does all of them); one that ended is skipped and one opened
        during a round waits for the next.
        """
        gw, ledger, acc = self.gateway()
        responses = []
        for i in range(12):
            gw.post("/v1/chat/completions", {"model": "public-model", "stream": True, "messages": []})
            r = FakeResponse(200, SSE_HEADERS)
            gw.http.calls[i]["deferred"].callback(r)
            r.send(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
            responses.append(r)
        ids = [row.request_id for row in ledger.opened]
        calls = [[p.request_id for p in acc.progress(5)] for _ in range(2)]
        self.assertEqual([len(c) for c in calls], [3, 3])
        responses[ids.index(calls[0][0])].end()  # reported already
        pending = [i for i in ids if i not in calls[0] + calls[1]]
        responses[ids.index(pending[0])].end()  # not reported yet: skipped
        gw.post("/v1/chat/completions", {"model": "public-model", "stream": True, "messages": []})
        late = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[12]["deferred"].callback(late)
        late.send(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
        calls += [[p.request_id for p in acc.progress(5)] for _ in range(3)]
        reported = [i for c in calls for i in c]
        self.assertEqual(sorted(reported), sorted(i for i in ids if i != pending[0]))
        self.assertTrue(all(len(c) <= 3 for c in calls))
        # The next round has the late one and the rest (all relayed more).
        for r in responses + [late]:
            if not r.ended:
                r.send(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
        again = [p.request_id for _ in range(5) for p in acc.progress(5)]
        self.assertEqual(len(again), 11)
        self.assertIn(ledger.opened[12].request_id, again)


    def test_progress_calls_are_capped(self) -> None:
        """
        However many requests are open, one call reports at most
        MAX_PROGRESS_PER_CALL of them (a bounded stop of the reactor); the
        round then takes more calls, and still reaches every request.
        """
        from llmgate.accounting import recorder

        self.patch(recorder, "MAX_PROGRESS_PER_CALL", 2)
        gw, ledger, acc = self.gateway()
        for i in range(7):
            gw.post("/v1/chat/completions", {"model": "public-model", "stream": True, "messages": []})
            r = FakeResponse(200, SSE_HEADERS)
            gw.http.calls[i]["deferred"].callback(r)
            r.send(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
        calls = [len(acc.progress(2)) for _ in range(4)]
        self.assertEqual(calls, [2, 2, 2, 1])
        self.assertEqual(len(acc.progress()), 0, "every request reported once, nothing new relayed")


class LargeBodyTests(SynchronousTestCase):
    """
    Non-streaming bodies far over the event cap and the old 16 MiB keep.
    """

    def relay_body(self, route: str, request: dict[str, Any], body: bytes) -> tuple[AccountingGateway, list[Any], int]:
        """
        Relay C{body} in 64 KiB reads; return the gateway, the functions
        run off the reactor thread, and the most body bytes held at once.
        """
        gw = AccountingGateway()
        threaded: list[Any] = []

        def in_thread(f: Any, *a: Any) -> Any:
            threaded.append(f)
            return maybeDeferred(f, *a)

        gw.resource.accounting._in_thread = in_thread
        gw.post(route, request)
        r = FakeResponse(200, {b"content-type": [b"application/json"]})
        gw.http.calls[0]["deferred"].callback(r)
        [relay] = gw.resource.active
        counter = relay.exchange.counter
        peak = 0
        for i in range(0, len(body), 65536):
            r.send(body[i:i + 65536])
            peak = max(peak, counter.kept)
        r.end()
        return gw, threaded, peak

    def test_huge_embeddings_body_keeps_reported_usage(self) -> None:
        """
        A 20 MB embeddings answer (over any cap) still yields the usage the
        provider reported, parsed off the reactor thread, while the
        accounting never holds more than 1 MiB of it.
        """
        vector = [0.0123456] * 1536
        obj = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(1400)],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 123456, "total_tokens": 123456},
        }
        body = json.dumps(obj).encode()
        self.assertGreater(len(body), 17 * 1024 * 1024)
        gw, threaded, peak = self.relay_body("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["x"] * 1400}, body)
        [rec] = gw.ledger.records
        self.assertEqual((rec.input_tokens, rec.output_tokens, rec.source, rec.outcome), (123456, 0, "reported", "completed"))
        self.assertEqual(rec.bytes_out, len(body))
        self.assertLessEqual(peak, 1024 * 1024 + 65536)
        self.assertTrue(threaded)

    def test_long_completion_body(self) -> None:
        """
        A 3 MB non-streaming Anthropic message: reported usage from its
        end, the provider's id from its start, and at most 1 MiB held.
        """
        text = "word " * 600_000
        obj = {
            "id": "msg_big", "type": "message", "role": "assistant", "model": "claude-sonnet-4",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 40, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 8, "output_tokens": 600_000},
        }
        body = json.dumps(obj).encode()
        gw, _, peak = self.relay_body("/v1/messages", {"model": "claude-sonnet-4", "max_tokens": 600_000, "messages": []}, body)
        [rec] = gw.ledger.records
        self.assertEqual(buckets(rec), (48, 600_000, 8, 0, 0))
        self.assertEqual((rec.source, rec.upstream_id), ("reported", "msg_big"))
        self.assertLessEqual(peak, 1024 * 1024 + 65536)

# -*- test-case-name: tests.accounting.test_usage -*-
"""
Tests for L{llmgate.accounting.usage}: every fixture, fed through the SSE parser whole
and in 1..7-byte slices, yields the numbers declared in fixtures/README.md.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from llmgate.dialects.sse import EventStreamParser
from llmgate.accounting.usage import (
    APIS,
    Usage,
    has_nonnull_usage,
    is_usage_only_chunk,
    make_accumulator,
    usage_from_anthropic,
    usage_from_openai,
)

from tests.dialects.test_sse import fixture

# file -> (api, expected Usage or None, complete, error, upstream id prefix, sample text start)
STREAMS = {
    "openai_chat_stream.sse": (
        "openai.chat",
        Usage(input_tokens=24, output_tokens=17),
        True,
        False,
        "chatcmpl-",
        "Lighthouse keepers once burned whale oil \u2014 later kerosene",
    ),
    "openai_chat_stream_crlf.sse": (
        "openai.chat",
        Usage(input_tokens=24, output_tokens=17),
        True,
        False,
        "chatcmpl-",
        "Lighthouse keepers once burned whale oil \u2014 later kerosene",
    ),
    "openai_chat_stream_truncated.sse": (
        "openai.chat",
        None,
        False,
        False,
        "chatcmpl-",
        "Lighthouse keepers once burned whale oil",
    ),
    "openai_chat_stream_tools.sse": (
        "openai.chat",
        Usage(input_tokens=1290, output_tokens=58, cached_input_tokens=1024),
        True,
        False,
        "chatcmpl-",
        '{"station":"Monterey","date":"2025-12-01"}{"station":"Half Moon Bay","date":"2025-12-01"}',
    ),
    "openai_responses_stream.sse": (
        "openai.responses",
        Usage(input_tokens=38, output_tokens=21),
        True,
        False,
        "resp_",
        "Mount Everest grows about 4 mm a year as the Indian plate pushes north.",
    ),
    "anthropic_messages_stream.sse": (
        "anthropic.messages",
        Usage(input_tokens=1573, output_tokens=48, cache_creation_tokens=1536),
        True,
        False,
        "msg_",
        "Hot springs in Iceland often reach 80\u2013100 \u00b0C",
    ),
    "anthropic_messages_stream_tools.sse": (
        "anthropic.messages",
        Usage(input_tokens=655 + 4096, output_tokens=91, cached_input_tokens=4096),
        True,
        False,
        "msg_",
        "The user wants the ferry schedule; I should call the timetable tool for Saturday."
        "Let me look up Saturday's sailings."
        '{"route": "Seattle-Bainbridge", "day": "saturday"}',
    ),
    "anthropic_messages_stream_cache_1h.sse": (
        "anthropic.messages",
        Usage(
            input_tokens=53 + 6144 + 1024,
            output_tokens=61,
            cached_input_tokens=1024,
            cache_creation_tokens=6144,
            cache_creation_1h_tokens=4096,
        ),
        True,
        False,
        "msg_",
        "The Rhine\u2013Main\u2013Danube canal climbs 406 m",
    ),
    "anthropic_messages_stream_error.sse": (
        "anthropic.messages",
        Usage(input_tokens=58, output_tokens=1),
        False,
        True,
        "msg_",
        "Sourdough starters need feeding roughly every",
    ),
    # Provider shapes (fixtures/README.md, "Shapes from other providers").
    "anthropic_messages_stream_compaction.sse": (
        "anthropic.messages",
        Usage(input_tokens=60997, output_tokens=3341),
        True,
        False,
        "msg_",
        "## Summary of Conversation\n\n### Task Context\nThe user shared",
    ),
    "openrouter_responses_stream.sse": (
        "openai.responses",
        Usage(input_tokens=31, output_tokens=17),
        True,
        False,
        "gen-",
        'Use `json.loads` to parse the "payload" field, then\ncheck',
    ),
    "groq_chat_stream_x_groq.sse": (
        "openai.chat",
        Usage(input_tokens=18, output_tokens=439),
        True,
        False,
        "chatcmpl-",
        '{"value":"Sparkle Day"}',
    ),
    "groq_chat_stream_reasoning.sse": (
        "openai.chat",
        Usage(input_tokens=17, output_tokens=1107, reasoning_tokens=963),
        True,
        False,
        "chatcmpl-",
        "Okay, let me try to figure out how many times the letter 'r' appears",
    ),
    "deepseek_chat_stream_tools.sse": (
        "openai.chat",
        Usage(input_tokens=339, output_tokens=83, cached_input_tokens=320, reasoning_tokens=39),
        True,
        False,
        "cca85624-",
        "The",
    ),
    "mistral_chat_stream_thinking.sse": (
        "openai.chat",
        Usage(input_tokens=10, output_tokens=46),
        True,
        False,
        "a4e29c5b",
        "The user is asking for 2+2. This is basic arithmetic. 2+2=4.2 + 2 = 4",
    ),
    "huggingface_chat_stream.sse": (
        "openai.chat",
        Usage(input_tokens=44, output_tokens=8),
        True,
        False,
        "chatcmpl-",
        "Paris is the capital of France.",
    ),
    "openrouter_chat_stream_error.sse": (
        "openai.chat",
        Usage(input_tokens=42, output_tokens=31, reasoning_tokens=19),
        True,
        True,
        "gen-",
        # Each reasoning delta once, though reasoning_details repeats it.
        'The user asks about "Kessler syndrome"; define it, then give\nthe mechanism.The "Kessler syndrome"',
    ),
}

BODIES = {
    "openai_chat.json": (
        "openai.chat",
        Usage(input_tokens=1432, output_tokens=312, cached_input_tokens=1280, reasoning_tokens=256),
        False,
        "chatcmpl-",
    ),
    "openai_embeddings.json": ("openai.embeddings", Usage(input_tokens=11, output_tokens=0), False, None),
    "anthropic_messages.json": (
        "anthropic.messages",
        Usage(input_tokens=3286, output_tokens=96, cached_input_tokens=3072),
        False,
        "msg_",
    ),
    "openai_error_429.json": ("openai.chat", None, True, None),
    "anthropic_error_529.json": ("anthropic.messages", None, True, None),
}


def run_stream(api: str, data: bytes, size: int | None):
    parser = EventStreamParser()
    acc = make_accumulator(api)
    chunks = [data] if size is None else [data[i : i + size] for i in range(0, len(data), size)]
    for chunk in chunks:
        for name, payload in parser.feed(chunk):
            acc.on_event(name, payload)
    parser.close()
    return acc


class FixtureStreamTests(SynchronousTestCase):
    def test_everyStreamFixture(self):
        """
        Each stream fixture, whole and in every slice size 1..7, gives the
        declared usage, complete/error flags, id and generated text.
        """
        for name, (api, usage, complete, error, id_prefix, text) in STREAMS.items():
            for size in (None, 1, 2, 3, 4, 5, 6, 7):
                acc = run_stream(api, fixture(name), size)
                where = (name, size)
                self.assertEqual(acc.usage, usage, where)
                self.assertEqual(acc.complete, complete, where)
                self.assertEqual(acc.error, error, where)
                self.assertTrue(acc.upstream_id.startswith(id_prefix), where)
                self.assertTrue(acc.sample_text().startswith(text), (where, acc.sample_text()))
                # The decoded text's length, escapes counted as what they stand for.
                self.assertEqual(acc.text_bytes, len(acc.sample_text().encode()), where)

    def test_anthropicErrorKeepsMessageStart(self):
        """
        The Anthropic error stream keeps message_start's input (58) and the
        placeholder output, is not complete, and records the error type.
        """
        acc = run_stream("anthropic.messages", fixture("anthropic_messages_stream_error.sse"), 3)
        self.assertEqual(acc.usage.input_tokens, 58)
        self.assertFalse(acc.complete)
        self.assertTrue(acc.error)
        self.assertEqual(acc.error_detail["type"], "overloaded_error")

    def test_truncatedHasNoUsage(self):
        """
        The truncated chat stream yields no usage and is not complete; its
        relayed text is kept for an estimate.
        """
        acc = run_stream("openai.chat", fixture("openai_chat_stream_truncated.sse"), 5)
        self.assertIsNone(acc.usage)
        self.assertFalse(acc.complete)
        self.assertEqual(acc.sample_text(), "Lighthouse keepers once burned whale oil")

    def test_anthropicOutputReplacedNotAdded(self):
        """
        Output is message_delta's 48, not message_start's 2 plus 48.
        """
        acc = run_stream("anthropic.messages", fixture("anthropic_messages_stream.sse"), None)
        self.assertEqual(acc.usage.output_tokens, 48)
        self.assertEqual(acc.usage.uncached_input_tokens, 37)


class FixtureBodyTests(SynchronousTestCase):
    def test_everyBodyFixture(self):
        """
        Each JSON fixture via on_body gives the declared usage and flags;
        error bodies are complete, flagged, and have no usage.
        """
        for name, (api, usage, error, id_prefix) in BODIES.items():
            acc = make_accumulator(api)
            acc.on_body(fixture(name))
            self.assertEqual(acc.usage, usage, name)
            self.assertTrue(acc.complete, name)
            self.assertEqual(acc.error, error, name)
            if id_prefix:
                self.assertTrue(acc.upstream_id.startswith(id_prefix), name)

    def test_bodyText(self):
        """
        Non-streaming bodies keep their reply text for estimates.
        """
        acc = make_accumulator("anthropic.messages")
        acc.on_body(fixture("anthropic_messages.json"))
        self.assertTrue(acc.sample_text().startswith("A standard bass guitar"))

    def test_garbageBody(self):
        """
        A body that is not JSON is complete with no usage, not an exception.
        """
        acc = make_accumulator("openai.chat")
        acc.on_body(b"<html>bad gateway</html>")
        self.assertIsNone(acc.usage)
        self.assertTrue(acc.complete)

    def test_responsesBody(self):
        """
        A non-streaming Responses body takes top-level usage and output text;
        its "error": null is not an error.
        """
        acc = make_accumulator("openai.responses")
        acc.on_body(
            b'{"id":"resp_1","error":null,"output":[{"type":"message","content":'
            b'[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":5,'
            b'"input_tokens_details":{"cached_tokens":2,"cache_write_tokens":1},'
            b'"output_tokens":9,"output_tokens_details":{"reasoning_tokens":4}}}'
        )
        self.assertFalse(acc.error)
        self.assertEqual(
            acc.usage,
            Usage(input_tokens=5, output_tokens=9, cached_input_tokens=2, cache_creation_tokens=1, reasoning_tokens=4),
        )
        self.assertEqual(acc.sample_text(), "hi")

    def test_countTokens(self):
        """
        count_tokens is free: zero usage, the answered count kept aside.
        """
        acc = make_accumulator("anthropic.count_tokens")
        acc.on_body(b'{"input_tokens": 2095}')
        self.assertEqual(acc.usage, Usage(input_tokens=0, output_tokens=0))
        self.assertEqual(acc.counted_tokens, 2095)


class RuleTests(SynchronousTestCase):
    def test_makeAccumulatorApis(self):
        """
        Every documented api has an accumulator; others are rejected.
        """
        self.assertEqual(
            APIS,
            {
                "openai.chat",
                "openai.completions",
                "openai.responses",
                "openai.embeddings",
                "anthropic.messages",
                "anthropic.count_tokens",
            },
        )
        for api in APIS:
            self.assertEqual(make_accumulator(api).api, api)
        self.assertRaises(ValueError, make_accumulator, "openai.images")

    def test_anthropicDeltaReplacesPresentFields(self):
        """
        A message_delta carrying input and cache fields replaces them; one
        with only output_tokens keeps message_start's input fields.
        """
        acc = make_accumulator("anthropic.messages")
        acc.on_event(
            b"message_start",
            b'{"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":10,'
            b'"cache_creation_input_tokens":5,"cache_read_input_tokens":0,"output_tokens":1}}}',
        )
        acc.on_event(b"message_delta", b'{"type":"message_delta","usage":{"output_tokens":7}}')
        self.assertEqual(acc.usage, Usage(input_tokens=15, output_tokens=7, cache_creation_tokens=5))
        acc.on_event(
            b"message_delta",
            b'{"type":"message_delta","usage":{"output_tokens":9,"input_tokens":12,"cache_read_input_tokens":3}}',
        )
        self.assertEqual(
            acc.usage,
            Usage(input_tokens=20, output_tokens=9, cached_input_tokens=3, cache_creation_tokens=5),
        )
        self.assertFalse(acc.complete)
        acc.on_event(b"message_stop", b'{"type":"message_stop"}')
        self.assertTrue(acc.complete)

    def test_chatUsageReplacedNotSummed(self):
        """
        Chat chunks that all carry usage (some OpenAI-compatible servers do)
        leave the last one's numbers, not a sum; complete needs [DONE] or
        the choices-empty chunk.
        """
        acc = make_accumulator("openai.chat")
        for n in (1, 2, 3):
            acc.on_event(
                None,
                b'{"id":"c","choices":[{"delta":{"content":"x"}}],"usage": {"prompt_tokens":4,"completion_tokens":%d}}' % n,
            )
        self.assertEqual(acc.usage, Usage(input_tokens=4, output_tokens=3))
        self.assertFalse(acc.complete)
        acc.on_event(None, b"[DONE]")
        self.assertTrue(acc.complete)

    def test_chatInBandError(self):
        """
        An OpenAI data payload with an error object sets error.
        """
        acc = make_accumulator("openai.chat")
        acc.on_event(None, b'{"id":"c","choices":[{"delta":{"content":"a"}}]}')
        acc.on_event(None, b'{"error": {"message": "boom", "type": "server_error"}}')
        self.assertTrue(acc.error)
        self.assertEqual(acc.error_detail["type"], "server_error")
        self.assertFalse(acc.complete)

    def test_chatErrorChunkWithUsage(self):
        """
        A chunk with both an error and a usage (OpenRouter's mid-stream
        error) keeps the usage as the provider's final count; an error
        without one does not claim any.
        """
        acc = make_accumulator("openai.chat")
        acc.on_event(None, b'{"id":"gen-1","choices":[{"delta":{"content":"a"}}]}')
        acc.on_event(None, b'{"id":"gen-1","error":{"code":502,"message":"x"},"choices":[{"delta":{"content":""},"finish_reason":"error"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}')
        self.assertEqual((acc.error, acc.error_usage, acc.usage), (True, True, Usage(input_tokens=5, output_tokens=2)))
        acc = make_accumulator("openai.chat")
        acc.on_event(None, b'{"id":"gen-1","error":{"code":502,"message":"x"},"choices":[]}')
        self.assertEqual((acc.error, acc.error_usage, acc.usage), (True, False, None))

    def test_groqUsageOnlyInXGroq(self):
        """
        Usage found only in x_groq.usage is read, in a stream and in a body;
        an x_groq without usage (the first chunk's id and seed) is not usage.
        """
        acc = make_accumulator("openai.chat")
        acc.on_event(None, b'{"id":"c","choices":[{"delta":{"content":"a"}}],"x_groq":{"id":"req_1","seed":7}}')
        self.assertIsNone(acc.usage)
        acc.on_event(None, b'{"id":"c","choices":[{"delta":{},"finish_reason":"stop"}],"x_groq":{"id":"req_1","usage":{"prompt_tokens":3,"completion_tokens":4}}}')
        self.assertEqual(acc.usage, Usage(input_tokens=3, output_tokens=4))
        acc = make_accumulator("openai.chat")
        acc.on_body(b'{"id":"c","choices":[],"x_groq":{"id":"r","usage":{"prompt_tokens":1,"completion_tokens":2}}}')
        self.assertEqual(acc.usage, Usage(input_tokens=1, output_tokens=2))

    def test_chatContentPartsAndLogprobs(self):
        """
        Content sent as a list of parts (Mistral's thinking and text parts)
        is counted; a chunk whose logprobs hold a "content" list still
        counts its delta text once, and its tokens not at all.
        """
        acc = make_accumulator("openai.chat")
        acc.on_event(None, b'{"id":"m","choices":[{"delta":{"role":"assistant","content":[{"type":"thinking","thinking":[{"type":"text","text":"Think \\"a\\"."}]}]}}]}')
        acc.on_event(None, b'{"id":"m","choices":[{"delta":{"content":[{"type":"text","text":" Answer"}]}}]}')
        acc.on_event(None, b'{"id":"m","choices":[{"delta":{"content":" tail"},"logprobs":{"content":[{"token":" tail","logprob":-0.1}]}}]}')
        self.assertEqual(acc.sample_text(), 'Think "a". Answer tail')
        self.assertEqual(acc.text_bytes, len('Think "a". Answer tail'))

    def test_anthropicIterationsSummed(self):
        """
        With usage.iterations, every field is the sum over the iterations
        (the top-level fields are the last iteration's): in a body, in
        usage_from_anthropic, and in a stream even if a later
        message_delta has no iterations.
        """
        u = {
            "input_tokens": 10, "cache_creation_input_tokens": 1, "cache_read_input_tokens": 2, "output_tokens": 20,
            "iterations": [
                {"type": "compaction", "input_tokens": 1000, "output_tokens": 200, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 4},
                {"type": "message", "input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 1},
            ],
        }
        want = Usage(input_tokens=1010 + 5 + 5, output_tokens=220, cached_input_tokens=5, cache_creation_tokens=5)
        self.assertEqual(usage_from_anthropic(u), want)
        acc = make_accumulator("anthropic.messages")
        acc.on_body(json.dumps({"id": "msg_1", "content": [{"type": "compaction", "content": "sum"}, {"type": "text", "text": "ok"}], "usage": u}).encode())
        self.assertEqual((acc.usage, acc.sample_text()), (want, "sumok"))
        acc = make_accumulator("anthropic.messages")
        acc.on_event(b"message_start", b'{"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":1000,"output_tokens":1}}}')
        acc.on_event(b"message_delta", json.dumps({"type": "message_delta", "usage": u}).encode())
        acc.on_event(b"message_delta", b'{"type":"message_delta","usage":{"output_tokens":20}}')
        self.assertEqual(acc.usage, want)

    def test_anthropicCache1h(self):
        """
        The 1-hour part of the cache writes comes from
        usage.cache_creation.ephemeral_1h_input_tokens: in a body, in a
        stream (kept when message_delta has no breakdown, replaced when it
        has one), summed over usage.iterations, and never more than all
        the writes.
        """
        u = {
            "input_tokens": 5, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 0, "output_tokens": 7,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        }
        want = Usage(input_tokens=305, output_tokens=7, cache_creation_tokens=300, cache_creation_1h_tokens=200)
        self.assertEqual(usage_from_anthropic(u), want)
        acc = make_accumulator("anthropic.messages")
        acc.on_body(json.dumps({"id": "msg_1", "content": [], "usage": u}).encode())
        self.assertEqual(acc.usage, want)
        acc = make_accumulator("anthropic.messages")
        acc.on_event(b"message_start", json.dumps({"type": "message_start", "message": {"id": "msg_1", "usage": dict(u, output_tokens=1)}}).encode())
        acc.on_event(b"message_delta", b'{"type":"message_delta","usage":{"cache_creation_input_tokens":300,"output_tokens":7}}')
        self.assertEqual(acc.usage, want)
        acc.on_event(
            b"message_delta",
            b'{"type":"message_delta","usage":{"output_tokens":9,'
            b'"cache_creation":{"ephemeral_5m_input_tokens":250,"ephemeral_1h_input_tokens":50}}}',
        )
        self.assertEqual(acc.usage, Usage(input_tokens=305, output_tokens=9, cache_creation_tokens=300, cache_creation_1h_tokens=50))
        iters = {
            "input_tokens": 1, "cache_creation_input_tokens": 40, "output_tokens": 2,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 40},
            "iterations": [
                {"input_tokens": 10, "cache_creation_input_tokens": 300, "output_tokens": 20,
                 "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200}},
                {"input_tokens": 1, "cache_creation_input_tokens": 40, "output_tokens": 2,
                 "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 40}},
            ],
        }
        self.assertEqual(
            usage_from_anthropic(iters),
            Usage(input_tokens=351, output_tokens=22, cache_creation_tokens=340, cache_creation_1h_tokens=240),
        )
        bad = {"input_tokens": 1, "cache_creation_input_tokens": 10, "output_tokens": 1,
               "cache_creation": {"ephemeral_1h_input_tokens": 99}}
        self.assertEqual(usage_from_anthropic(bad).cache_creation_1h_tokens, 10)

    def test_responsesWithoutEventLines(self):
        """
        Data-only Responses events are told apart by their JSON type, also
        when "type" is not the first member; [DONE] is ignored.
        """
        acc = make_accumulator("openai.responses")
        acc.on_event(None, b'{"type":"response.created","response":{"id":"gen-1","usage":null}}')
        acc.on_event(None, b'{"delta":"Hi \\"x\\"","type":"response.output_text.delta"}')
        acc.on_event(None, b'{"sequence_number":3,"type":"response.completed","response":{"id":"gen-1","usage":{"input_tokens":4,"output_tokens":2}}}')
        acc.on_event(None, b"[DONE]")
        self.assertEqual((acc.upstream_id, acc.usage, acc.complete), ("gen-1", Usage(input_tokens=4, output_tokens=2), True))
        self.assertEqual(acc.sample_text(), 'Hi "x"')

    def test_responsesTerminalEvents(self):
        """
        response.incomplete completes with its partial usage;
        response.failed and error flag an error.
        """
        acc = make_accumulator("openai.responses")
        acc.on_event(
            b"response.incomplete",
            b'{"type":"response.incomplete","response":{"id":"resp_2","usage":{"input_tokens":3,"output_tokens":100}}}',
        )
        self.assertTrue(acc.complete)
        self.assertEqual(acc.usage, Usage(input_tokens=3, output_tokens=100))
        acc = make_accumulator("openai.responses")
        acc.on_event(b"response.failed", b'{"type":"response.failed","response":{"id":"r","error":{"code":"server_error"}}}')
        self.assertTrue(acc.error)
        self.assertFalse(acc.complete)
        self.assertFalse(acc.error_usage)
        # A failed Response with usage: the provider's count, kept as such.
        acc = make_accumulator("openai.responses")
        acc.on_event(
            b"response.failed",
            b'{"type":"response.failed","response":{"id":"r","error":{"code":"server_error"},'
            b'"usage":{"input_tokens":9,"output_tokens":4}}}',
        )
        self.assertEqual((acc.error, acc.error_usage, acc.usage), (True, True, Usage(input_tokens=9, output_tokens=4)))
        acc = make_accumulator("openai.responses")
        acc.on_event(b"error", b'{"type":"error","code":"x","message":"y"}')
        self.assertTrue(acc.error)

    def test_completions(self):
        """
        Legacy completions chunks keep choices[].text and the usage chunk.
        """
        acc = make_accumulator("openai.completions")
        acc.on_event(None, b'{"id":"cmpl-1","choices":[{"text":"Hel","index":0}],"usage":null}')
        acc.on_event(None, b'{"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}')
        acc.on_event(None, b"[DONE]")
        self.assertEqual(acc.sample_text(), "Hel")
        self.assertEqual(acc.usage, Usage(input_tokens=2, output_tokens=1))
        self.assertEqual(acc.upstream_id, "cmpl-1")

    def test_sampleCap(self):
        """
        Past the sample cap, text is no longer kept but its bytes are still
        counted, as decoded text (the escape "\\"" is the one byte it stands for).
        """
        acc = make_accumulator("openai.chat", sample_cap=4)
        acc.on_event(None, b'{"id":"c","choices":[{"delta":{"content":"abcdef"}}],"usage":null}')
        acc.on_event(None, b'{"id":"c","choices":[{"delta":{"content":"gh\\"i"}}],"usage":null}')
        acc.on_event(None, b'{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}')
        self.assertEqual(acc.sample_text(), "abcd")
        self.assertEqual(acc.text_bytes, 6 + 4)
        self.assertEqual(acc.usage.output_tokens, 2)
        acc = make_accumulator("anthropic.messages", sample_cap=1)
        acc.on_event(b"content_block_delta", b'{"delta":{"type":"text_delta","text":"xy"}}')
        acc.on_event(b"content_block_delta", b'{"delta":{"type":"text_delta","text":"\\\\"}}')
        self.assertEqual((acc.sample_text(), acc.text_bytes), ("x", 2 + 1))

    def test_usageDetails(self):
        """
        usage_from_openai reads cached, cache-write and reasoning details
        and treats nulls as zero; usage_from_anthropic totals the input.
        """
        self.assertEqual(
            usage_from_openai(
                {
                    "prompt_tokens": 100,
                    "completion_tokens": 50,
                    "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 30},
                    "completion_tokens_details": {"reasoning_tokens": None},
                }
            ),
            Usage(input_tokens=100, output_tokens=50, cached_input_tokens=60, cache_creation_tokens=30),
        )
        self.assertEqual(
            usage_from_anthropic(
                {"input_tokens": 1, "cache_creation_input_tokens": None, "cache_read_input_tokens": 2, "output_tokens": 3}
            ),
            Usage(input_tokens=3, output_tokens=3, cached_input_tokens=2),
        )


class ByteTestTests(SynchronousTestCase):
    def test_hasNonnullUsage(self):
        """
        The byte test sees usage through whitespace variants and ignores
        null usage and "usage" as a string value.
        """
        self.assertTrue(has_nonnull_usage(b'{"usage":{"a":1}}'))
        self.assertTrue(has_nonnull_usage(b'{"usage" :\n {"a":1}}'))
        self.assertFalse(has_nonnull_usage(b'{"usage":null}'))
        self.assertFalse(has_nonnull_usage(b'{"usage" : null}'))
        self.assertFalse(has_nonnull_usage(b'{"content":"usage","usage":null}'))
        self.assertTrue(has_nonnull_usage(b'{"content":"usage","usage":{}}'))
        self.assertFalse(has_nonnull_usage(b'{"choices":[]}'))

    def test_isUsageOnlyChunk(self):
        """
        Only the choices-empty chunk with non-null usage is usage-only, in
        both chat fixtures that have one.
        """
        # 18 and 15 data lines: the usage chunk is the last but one ([DONE]).
        for name, n in (("openai_chat_stream.sse", 18), ("openai_chat_stream_tools.sse", 15)):
            events = EventStreamParser().feed(fixture(name))
            flags = [is_usage_only_chunk(data) for _, data in events]
            self.assertEqual(flags, [False] * (n - 2) + [True, False], name)
        self.assertFalse(is_usage_only_chunk(b'{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}'))
        self.assertFalse(is_usage_only_chunk(b"[DONE]"))

    def test_escapedTextDecoded(self):
        """
        Text kept raw on the hot path is JSON-decoded by sample_text():
        escapes, \\u sequences and whitespace around the colon.
        """
        acc = make_accumulator("openai.chat")
        acc.on_event(None, b'{"id":"c","choices":[{"delta":{"content" : "a\\nb \\u2014 \\"q\\""}}]}')
        acc.on_event(None, b'{"id":"c","choices":[{"delta":{"content":"\xe2\x80\x93"}}]}')
        self.assertEqual(acc.sample_text(), 'a\nb \u2014 "q"\u2013')


class LoadsJsonTests(SynchronousTestCase):
    def test_same_as_json_loads(self):
        """
        loads_json reads what json.loads reads, in every JSON encoding, and
        refuses what it refuses (bad UTF-8, lone surrogates kept as
        json.loads keeps them).
        """
        import json

        from llmgate.accounting.usage import loads_json

        doc = {"id": "c1", "choices": [{"delta": {"content": "h\u00e9 \U0001f600"}}], "usage": None}
        text = json.dumps(doc, ensure_ascii=False)
        for encoding in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"):
            raw = text.encode(encoding)
            self.assertEqual(loads_json(raw), json.loads(raw), encoding)
        for raw in (b'{"a":"\\ud800"}', b"[1]", b"2", b'"s"', '{"a":"\ud800"}'.encode("utf-8", "surrogatepass")):
            self.assertEqual(loads_json(raw), json.loads(raw), raw)
        for raw in (b'{"a":"\xff"}', b"{", b"", b"{}x"):
            with self.assertRaises(ValueError):
                json.loads(raw)
            with self.assertRaises(ValueError):
                loads_json(raw)

"""
Tests for L{llmgate.mock.provider} and L{llmgate.mock.tap}.

Everything runs in memory: a L{MemoryReactorClock} is the injected reactor,
requests go into an L{HTTPChannel} over a L{StringTransport}, and the raw
HTTP response is decoded here (chunked framing, then SSE).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from llmgate.mock import tap as mock_tap
from llmgate.mock.provider import MOCK_WORDS, MockProvider, mock_text

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "llmgate", "mock", "fixtures")
ENCODINGS = os.path.join(os.path.dirname(__file__), "..", "..", "llmgate", "accounting", "encodings")


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


# The mock's 32 words, written out here so that expected texts do not come
# from the module under test.
_WORDS = ("the and of to in is it that for on with as was he be at by this had"
          " not are but from or have an they which one you were all").split()


def words(n: int) -> str:
    """The text the mock must generate for n tokens: its words in order, cycling."""
    return "".join(" " + _WORDS[i % len(_WORDS)] for i in range(n))


class Response:
    """A decoded HTTP/1.1 response; C{complete} is whether its framing ended."""

    def __init__(self, raw: bytes):
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0] else 0
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunks: list[bytes] = []
        self.complete = False
        if self.headers.get("transfer-encoding") == "chunked":
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    self.complete = True
                    break
                self.chunks.append(rest[:size])
                rest = rest[size + 2:]
            self.body = b"".join(self.chunks)
        else:
            length = int(self.headers.get("content-length", len(rest)))
            self.body = rest[:length]
            self.complete = len(rest) >= length

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[tuple[str | None, str]]:
        """The body's SSE events as C{(event name, data)}."""
        out = []
        for block in self.body.decode("utf-8").split("\n\n"):
            if not block:
                continue
            name, data = None, []
            for line in block.split("\n"):
                field, _, value = line.partition(": ")
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)
            out.append((name, "\n".join(data)))
        return out

    def data(self) -> list[Any]:
        """The JSON payloads of the SSE events (C{[DONE]} kept as a string)."""
        return [d if d == "[DONE]" else json.loads(d) for _, d in self.events()]


class MockTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.mock = MockProvider(self.clock, seed=1)
        # timeout=None: the channel's idle timer would otherwise show in getDelayedCalls.
        self.site = Site(self.mock.resource, reactor=self.clock, timeout=None)

    def send(self, path: str, body: Any = b"", method: str = "POST",
             **headers: str) -> tuple[Any, StringTransport]:
        """Open a connection, send one request; x_mock_tokens="3" is x-mock-tokens: 3."""
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: mock", f"Content-Length: {len(body)}"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        channel.dataReceived("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        return channel, transport

    def get(self, path: str, body: Any = b"", method: str = "POST", **headers: str) -> Response:
        """Send a request, run the clock for a minute, and decode the response."""
        channel, transport = self.send(path, body, method, **headers)
        self.clock.advance(0)
        self.clock.advance(60)
        return Response(transport.value())

    def gone(self, channel: Any) -> None:
        channel.connectionLost(Failure(ConnectionDone()))


class WordsTests(SynchronousTestCase):
    def test_words_are_single_tokens(self) -> None:
        """
        Every mock word (with its leading space) is one token in cl100k_base
        and o200k_base, so mock_text(n) costs n tokens in either (read from
        the shipped .tiktoken files; no download).
        """
        self.assertEqual(len(set(MOCK_WORDS)), 32)
        for name in ("cl100k_base", "o200k_base"):
            with open(os.path.join(ENCODINGS, name + ".tiktoken"), "rb") as f:
                tokens = {base64.b64decode(line.split()[0]) for line in f if line.strip()}
            for word in MOCK_WORDS:
                self.assertIn(word.encode(), tokens, (name, word))
        self.assertEqual(mock_text(34), words(34))


class ChatTests(MockTestCase):
    def test_chat_stream_without_usage(self) -> None:
        """
        A chat stream is a role chunk, N content chunks that join to
        words(N), a finish chunk and [DONE], with no usage field at all
        when include_usage was not asked for; SSE headers, no content-length.
        """
        r = self.get("/v1/chat/completions", {"model": "m1", "stream": True}, x_mock_tokens="5")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["content-type"], "text/event-stream; charset=utf-8")
        self.assertEqual(r.headers["cache-control"], "no-cache")
        self.assertEqual(r.headers["x-request-id"], "req_mock_1")
        self.assertNotIn("content-length", r.headers)
        self.assertTrue(r.complete)
        chunks = r.data()
        self.assertEqual(chunks[-1], "[DONE]")
        chunks = chunks[:-1]
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        self.assertEqual(text, words(5))
        self.assertEqual(len(chunks), 1 + 5 + 1)
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        for c in chunks:
            self.assertNotIn("usage", c)
            self.assertEqual(c["model"], "m1")
            self.assertEqual(c["object"], "chat.completion.chunk")
        self.assertEqual(len(r.chunks), len(r.events()), "one write() per event")
        self.assertEqual(self.mock.stats["streams_completed"], 1)

    def test_chat_stream_with_usage(self) -> None:
        """
        With stream_options.include_usage, a usage-only chunk (choices=[])
        comes just before [DONE], reporting N completion tokens and
        len(body) // 4 prompt tokens; every other chunk has usage null.
        """
        body = json.dumps({"model": "m", "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        r = self.get("/v1/chat/completions", body, x_mock_tokens="7")
        chunks = r.data()
        self.assertEqual(chunks[-1], "[DONE]")
        usage_chunk = chunks[-2]
        self.assertEqual(usage_chunk["choices"], [])
        p = 18  # the mock's rule, len(body) // 4, for this 73-byte body
        self.assertEqual(usage_chunk["usage"], {"prompt_tokens": p, "completion_tokens": 7,
                                                "total_tokens": p + 7})
        for c in chunks[:-2]:
            self.assertIsNone(c["usage"])
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
        self.assertEqual(text, words(7))

    def test_chat_json(self) -> None:
        """
        A non-stream chat completion is one JSON body with content-length,
        the default 16 tokens of text, the echoed model and usage.
        """
        body = json.dumps({"model": "gpt-x", "messages": []}).encode()
        r = self.get("/v1/chat/completions", body)
        self.assertEqual(r.headers["content-type"], "application/json")
        self.assertEqual(int(r.headers["content-length"]), len(r.body))
        obj = r.json()
        self.assertEqual(obj["object"], "chat.completion")
        self.assertEqual(obj["model"], "gpt-x")
        self.assertEqual(obj["choices"][0]["message"]["content"], words(16))
        p = 8  # len(body) // 4 for this 34-byte body
        self.assertEqual(obj["usage"], {"prompt_tokens": p, "completion_tokens": 16,
                                        "total_tokens": p + 16})
        self.assertEqual(self.mock.stats["streams_started"], 0)

    def test_completions_stream(self) -> None:
        """The legacy completions stream sends text_completion chunks, then [DONE]."""
        r = self.get("/v1/completions", {"model": "m", "stream": True}, x_mock_tokens="4")
        chunks = r.data()
        self.assertEqual(chunks[-1], "[DONE]")
        self.assertEqual({c["object"] for c in chunks[:-1]}, {"text_completion"})
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks[:-1]), words(4))
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "stop")

    def test_invalid_json(self) -> None:
        """Invalid JSON is a 400 in the error shape of the route's API."""
        r = self.get("/v1/chat/completions", b"{nope")
        self.assertEqual(r.status, 400)
        self.assertEqual(r.json()["error"]["type"], "invalid_request_error")
        r = self.get("/v1/messages", b"{nope")
        self.assertEqual(r.status, 400)
        self.assertEqual(r.json()["type"], "error")
        self.assertEqual(r.json()["error"]["type"], "invalid_request_error")


class OtherApiTests(MockTestCase):
    def test_anthropic_stream(self) -> None:
        """
        An Anthropic stream has the documented event order, input tokens in
        message_start (output 1), N text deltas joining to words(N) and
        the cumulative output count N in message_delta; the JSON type equals
        the event name and request-id is set.
        """
        body = json.dumps({"model": "claude-x", "stream": True, "max_tokens": 10}).encode()
        r = self.get("/v1/messages", body, x_mock_tokens="6")
        self.assertEqual(r.headers["request-id"], "req_mock_1")
        self.assertNotIn("x-request-id", r.headers)
        events = r.events()
        names = [n for n, _ in events]
        self.assertEqual(names, ["message_start", "content_block_start", "ping"]
                         + ["content_block_delta"] * 6
                         + ["content_block_stop", "message_delta", "message_stop"])
        self.assertEqual(events[2][1], '{"type": "ping"}')
        data = [json.loads(d) for _, d in events]
        self.assertEqual([d["type"] for d in data], names)
        start = data[0]["message"]
        self.assertEqual(start["model"], "claude-x")
        self.assertEqual(start["usage"]["input_tokens"], 13)  # len(body) // 4, 55 bytes
        self.assertEqual(start["usage"]["output_tokens"], 1)
        self.assertEqual("".join(d["delta"]["text"] for d in data[3:9]), words(6))
        self.assertEqual(data[-2]["usage"]["output_tokens"], 6)
        self.assertEqual(data[-2]["delta"]["stop_reason"], "end_turn")

    def test_anthropic_json_and_count_tokens(self) -> None:
        """A non-stream Message carries the text and usage; count_tokens the input count."""
        body = json.dumps({"model": "c", "messages": []}).encode()
        obj = self.get("/v1/messages", body, x_mock_tokens="3").json()
        self.assertEqual(obj["content"], [{"type": "text", "text": words(3)}])
        self.assertEqual(obj["usage"]["output_tokens"], 3)
        self.assertEqual(obj["usage"]["input_tokens"], 7)  # len(body) // 4, 30 bytes
        obj = self.get("/v1/messages/count_tokens", body).json()
        self.assertEqual(obj, {"input_tokens": 7})

    def test_responses_stream(self) -> None:
        """
        A Responses stream follows the Responses streaming format with rising sequence
        numbers, usage in response.completed and no [DONE].
        """
        body = json.dumps({"model": "r", "stream": True, "input": "hi"}).encode()
        r = self.get("/v1/responses", body, x_mock_tokens="3")
        events = r.events()
        names = [n for n, _ in events]
        self.assertEqual(names, [
            "response.created", "response.in_progress", "response.output_item.added",
            "response.content_part.added"] + ["response.output_text.delta"] * 3 + [
            "response.output_text.done", "response.content_part.done",
            "response.output_item.done", "response.completed"])
        data = [json.loads(d) for _, d in events]
        self.assertEqual([d["type"] for d in data], names)
        self.assertEqual([d["sequence_number"] for d in data], list(range(len(data))))
        self.assertEqual("".join(d["delta"] for d in data[4:7]), words(3))
        usage = data[-1]["response"]["usage"]
        p = 11  # len(body) // 4 for this 45-byte body
        self.assertEqual((usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]),
                         (p, 3, p + 3))
        self.assertNotIn(b"[DONE]", r.body)

    def test_embeddings(self) -> None:
        """
        Embeddings return one deterministic vector per input and prompt-only
        usage; base64 encoding carries the same little-endian float32 values.
        """
        body = {"model": "e", "input": ["a", "b"], "dimensions": 4}
        r = self.get("/v1/embeddings", body)
        obj = r.json()
        self.assertEqual([d["index"] for d in obj["data"]], [0, 1])
        self.assertEqual(len(obj["data"][0]["embedding"]), 4)
        # len(body) // 4 for the 52 bytes json.dumps(body) makes
        self.assertEqual(obj["usage"], {"prompt_tokens": 13, "total_tokens": 13})
        b64 = self.get("/v1/embeddings", {**body, "encoding_format": "base64"}).json()
        decoded = struct.unpack("<4f", base64.b64decode(b64["data"][1]["embedding"]))
        for x, y in zip(decoded, obj["data"][1]["embedding"]):
            self.assertAlmostEqual(x, y, places=5)

    def test_models(self) -> None:
        """GET /v1/models lists models in the OpenAI list shape."""
        obj = self.get("/v1/models", method="GET").json()
        self.assertEqual(obj["object"], "list")
        self.assertTrue(all(m["object"] == "model" for m in obj["data"]))


class FixtureTests(MockTestCase):
    def test_sse_fixture_replay_is_byte_identical(self) -> None:
        """
        Every .sse fixture is replayed byte for byte, as SSE, in many small
        writes (so lines and UTF-8 characters get split).
        """
        for name in sorted(os.listdir(FIXTURES)):
            if not name.endswith(".sse"):
                continue
            r = self.get("/v1/chat/completions", b"not json", x_mock_fixture=name)
            self.assertEqual(r.status, 200)
            self.assertEqual(r.headers["content-type"], "text/event-stream; charset=utf-8")
            self.assertEqual(r.body, fixture(name), name)
            self.assertTrue(r.complete)
            self.assertGreater(len(r.chunks), len(r.body) // 64)
            self.assertTrue(all(1 <= len(c) <= 64 for c in r.chunks))

    def test_json_fixture(self) -> None:
        """A .json fixture is sent verbatim as application/json with status 200."""
        r = self.get("/v1/messages", b"{}", x_mock_fixture="anthropic_messages.json")
        self.assertEqual((r.status, r.headers["content-type"]), (200, "application/json"))
        self.assertEqual(r.body, fixture("anthropic_messages.json"))

    def test_unknown_fixture(self) -> None:
        """An unknown fixture name is a 400."""
        r = self.get("/v1/chat/completions", b"{}", x_mock_fixture="nope.sse")
        self.assertEqual(r.status, 400)
        self.assertIn("nope.sse", r.json()["error"]["message"])

    def test_status_429(self) -> None:
        """status-429 on an OpenAI route replays openai_error_429.json with its headers."""
        r = self.get("/v1/chat/completions", b"{}", x_mock_fault="status-429")
        self.assertEqual(r.status, 429)
        self.assertEqual(r.body, fixture("openai_error_429.json"))
        expected = {
            "content-type": "application/json", "retry-after": "1",
            "x-request-id": "req_fixture429", "x-ratelimit-limit-requests": "5000",
            "x-ratelimit-remaining-requests": "4987", "x-ratelimit-reset-requests": "156ms",
            "x-ratelimit-limit-tokens": "200000", "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "336ms"}
        for name, value in expected.items():
            self.assertEqual(r.headers[name], value, name)
        self.assertEqual(self.mock.stats["faults"], 1)

    def test_status_429_anthropic(self) -> None:
        """status-429 on /v1/messages is an Anthropic rate_limit_error with retry-after 7."""
        r = self.get("/v1/messages", b"{}", x_mock_fault="status-429")
        self.assertEqual(r.status, 429)
        self.assertEqual(r.json()["error"]["type"], "rate_limit_error")
        self.assertEqual(r.headers["retry-after"], "7")
        self.assertEqual(r.headers["anthropic-ratelimit-requests-remaining"], "0")
        self.assertEqual(r.headers["anthropic-ratelimit-requests-reset"], "2025-11-30T00:00:07Z")

    def test_status_529(self) -> None:
        """status-529 replays anthropic_error_529.json with its request-id and x-should-retry."""
        r = self.get("/v1/messages", b"{}", x_mock_fault="status-529")
        self.assertEqual(r.status, 529)
        self.assertEqual(r.body, fixture("anthropic_error_529.json"))
        self.assertEqual(r.headers["request-id"], "req_011CVdX8k2pQm4rTz7WbN3yH")
        self.assertEqual(r.headers["x-should-retry"], "true")

    def test_status_500(self) -> None:
        """status-500 is a 500 in the error shape of the route's API."""
        r = self.get("/v1/chat/completions", b"{}", x_mock_fault="status-500")
        self.assertEqual((r.status, r.json()["error"]["type"]), (500, "server_error"))
        r = self.get("/v1/messages", b"{}", x_mock_fault="status-500")
        self.assertEqual((r.status, r.json()["error"]["type"]), (500, "api_error"))

    def test_html_200(self) -> None:
        """html-200 answers even a stream request with a 200 text/html page."""
        r = self.get("/v1/chat/completions", {"stream": True}, x_mock_fault="html-200")
        self.assertEqual(r.status, 200)
        self.assertTrue(r.headers["content-type"].startswith("text/html"))
        self.assertIn(b"<html>", r.body)


class TimingTests(MockTestCase):
    def test_delays_spread_events(self) -> None:
        """
        x-mock-ttft-ms holds back the headers and first event; each token
        then waits x-mock-delay-ms of clock time; the stream leaves no
        DelayedCall behind when it completes.
        """
        _, transport = self.send("/v1/chat/completions", {"stream": True},
                                 x_mock_tokens="3", x_mock_ttft_ms="100", x_mock_delay_ms="10")
        self.clock.advance(0.099)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.001)
        self.assertEqual(len(Response(transport.value()).events()), 1)  # the role chunk
        # Each token is due 10 ms after the previous one; the last is followed
        # at once by the finish chunk and [DONE].
        for expected in (2, 3, 6):
            self.clock.advance(0.009)
            self.assertEqual(len(Response(transport.value()).events()), min(expected - 1, 3))
            self.clock.advance(0.001)
            self.assertEqual(len(Response(transport.value()).events()), expected)
        r = Response(transport.value())
        self.assertTrue(r.complete)
        self.assertEqual(r.data()[-1], "[DONE]")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fixture_slices_honour_delay(self) -> None:
        """A fixture replay waits x-mock-delay-ms between slices."""
        _, transport = self.send("/v1/messages", b"", x_mock_delay_ms="5",
                                 x_mock_fixture="anthropic_messages_stream.sse")
        first = len(Response(transport.value()).chunks)
        self.assertEqual(first, 1)
        self.clock.advance(0.005)
        self.assertEqual(len(Response(transport.value()).chunks), 2)
        self.clock.pump([0.005] * 1000)
        r = Response(transport.value())
        self.assertEqual(r.body, fixture("anthropic_messages_stream.sse"))

    def test_client_disconnect_mid_stream(self) -> None:
        """
        A client leaving mid-stream cancels the pending timers (no
        DelayedCall left), stops the writes and counts streams_cancelled.
        """
        channel, transport = self.send("/v1/messages", {"stream": True},
                                       x_mock_tokens="10", x_mock_delay_ms="10")
        self.clock.advance(0.035)
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        self.gone(channel)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        written = transport.value()
        self.clock.advance(10)
        self.assertEqual(transport.value(), written)
        self.assertEqual(self.mock.stats["streams_started"], 1)
        self.assertEqual(self.mock.stats["streams_cancelled"], 1)
        self.assertEqual(self.mock.stats["streams_completed"], 0)

    def test_disconnect_after_completion_is_not_cancel(self) -> None:
        """Closing the connection after a complete stream does not count as a cancel."""
        channel, _ = self.send("/v1/chat/completions", {"stream": True})
        self.gone(channel)
        self.assertEqual(self.mock.stats["streams_completed"], 1)
        self.assertEqual(self.mock.stats["streams_cancelled"], 0)


    def test_linger_delays_end_of_body(self) -> None:
        """
        x-mock-linger-ms holds the end of the body (the last chunk of the
        chunked encoding) after the last event, [DONE] already written;
        a client leaving meanwhile counts as a cancelled stream.
        """
        channel, transport = self.send("/v1/chat/completions", {"stream": True},
                                       x_mock_tokens="2", x_mock_linger_ms="250")
        self.clock.advance(0)
        r = Response(transport.value())
        self.assertEqual(r.data()[-1], "[DONE]")
        self.assertFalse(r.complete)
        self.clock.advance(0.249)
        self.assertFalse(Response(transport.value()).complete)
        self.clock.advance(0.001)
        self.assertTrue(Response(transport.value()).complete)
        self.assertEqual(self.mock.stats["streams_completed"], 1)
        channel, transport = self.send("/v1/chat/completions", {"stream": True},
                                       x_mock_tokens="2", x_mock_linger_ms="250")
        self.clock.advance(0.1)
        self.gone(channel)
        self.assertEqual(self.mock.stats["streams_cancelled"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_served_model(self) -> None:
        """
        x-mock-served-model names another model than the one asked for in
        every chunk and in a body, as a router would.
        """
        r = self.get("/v1/chat/completions", {"model": "router", "stream": True}, x_mock_served_model="gpt-4o-mini")
        self.assertEqual({c["model"] for c in r.data()[:-1]}, {"gpt-4o-mini"})
        r = self.get("/v1/messages", {"model": "router"}, x_mock_served_model="claude-haiku-4-5")
        self.assertEqual(r.json()["model"], "claude-haiku-4-5")


class FaultTests(MockTestCase):
    def test_reset_mid(self) -> None:
        """
        reset-mid sends the headers and x-mock-fault-after events, then
        aborts the TCP connection without ending the chunked body.
        """
        _, transport = self.send("/v1/chat/completions", {"stream": True},
                                 x_mock_fault="reset-mid", x_mock_fault_after="2")
        self.assertTrue(transport.disconnected)
        r = Response(transport.value())
        self.assertEqual(r.status, 200)
        self.assertEqual(len(r.events()), 2)
        self.assertFalse(r.complete)
        self.assertEqual(self.mock.stats["faults"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reset_mid_default_is_half(self) -> None:
        """Without x-mock-fault-after, reset-mid cuts the stream about half way."""
        _, transport = self.send("/v1/chat/completions", {"stream": True},
                                 x_mock_tokens="20", x_mock_fault="reset-mid")
        self.assertTrue(transport.disconnected)
        self.assertEqual(len(Response(transport.value()).events()), (1 + 20 + 1 + 1) // 2)

    def test_stall_headers(self) -> None:
        """stall-headers never sends a byte; the client leaving is not a stream cancel."""
        channel, transport = self.send("/v1/chat/completions", {"stream": True},
                                       x_mock_fault="stall-headers")
        self.clock.advance(3600)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.mock.stats["faults"], 1)
        self.gone(channel)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stall_mid(self) -> None:
        """
        stall-mid sends the headers and 3 events, then nothing, without
        closing; the client giving up counts as a cancelled stream.
        """
        channel, transport = self.send("/v1/chat/completions", {"stream": True},
                                       x_mock_fault="stall-mid")
        self.clock.advance(3600)
        r = Response(transport.value())
        self.assertEqual((r.status, len(r.events()), r.complete), (200, 3, False))
        self.assertFalse(transport.disconnecting)
        self.gone(channel)
        self.assertEqual(self.mock.stats["streams_cancelled"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_error_first_anthropic(self) -> None:
        """
        error-first answers an Anthropic stream 200 with message_start and
        then an overloaded_error event, before any content, and ends it.
        """
        _, transport = self.send("/v1/messages", {"stream": True, "max_tokens": 5, "model": "claude-x"},
                                 x_mock_fault="error-first")
        self.clock.advance(0)
        r = Response(transport.value())
        self.assertEqual((r.status, r.complete), (200, True))
        self.assertEqual([name for name, _ in r.events()], ["message_start", "error"])
        self.assertEqual(json.loads(r.events()[1][1])["error"]["type"], "overloaded_error")
        self.assertEqual(self.mock.stats["faults"], 1)

    def test_stall_first(self) -> None:
        """
        stall-first sends the headers and the first event (the role chunk:
        no content), then nothing; the client giving up is a cancelled
        stream whose time is listed at GET /mock/cancels.
        """
        channel, transport = self.send("/v1/chat/completions", {"stream": True},
                                       x_mock_fault="stall-first")
        self.clock.advance(3600)
        r = Response(transport.value())
        self.assertEqual((r.status, len(r.events()), r.complete), (200, 1, False))
        self.assertEqual(json.loads(r.events()[0][1])["choices"][0]["delta"]["content"], "")
        self.clock.advance(5)
        self.gone(channel)
        self.assertEqual(self.mock.stats["streams_cancelled"], 1)
        self.assertEqual(self.mock.cancels, [3605.0])


class BytesTests(MockTestCase):
    def test_bytes_honours_backpressure(self) -> None:
        """
        x-mock-bytes streams about N bytes of valid chat chunks, at most
        64 KiB per reactor turn; while the channel is paused nothing more is
        written, and after resume the stream runs to [DONE].
        """
        size = 1_000_000
        _, transport = self.send("/v1/chat/completions", {"stream": True},
                                 x_mock_bytes=str(size))
        first = len(transport.value())
        self.assertLess(first, 64 * 1024 + 2048)
        self.assertIsNotNone(transport.producer)
        transport.producer.pauseProducing()
        for _ in range(20):
            self.clock.advance(0)
        self.assertEqual(len(transport.value()), first)
        transport.producer.resumeProducing()
        self.clock.advance(0)
        self.assertGreater(len(transport.value()), first)
        for _ in range(100):
            self.clock.advance(0)
        r = Response(transport.value())
        self.assertTrue(r.complete)
        self.assertGreater(len(r.body), size * 0.9)
        self.assertLess(len(r.body), size * 1.1)
        chunks = r.data()
        self.assertEqual(chunks[-1], "[DONE]")
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        self.assertTrue(text.startswith(words(64)))
        self.assertEqual(self.mock.stats["streams_completed"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ControlTests(MockTestCase):
    def test_stats_and_requests(self) -> None:
        """
        /mock/stats reports the counters; the requests deque records method,
        path, lowercased headers and the body; /mock/reset zeroes both.
        """
        self.get("/v1/chat/completions", b'{"model":"a"}', X_Custom="Yes")
        self.get("/v1/messages", {"stream": True})
        stats = self.get("/mock/stats", method="GET").json()
        self.assertEqual(stats, {"requests": 2, "streams_started": 1, "streams_completed": 1,
                                 "streams_cancelled": 0, "faults": 0})
        self.assertEqual(len(self.mock.requests), 2)
        first = self.mock.requests[0]
        self.assertEqual((first["method"], first["path"], first["body"]),
                         ("POST", "/v1/chat/completions", b'{"model":"a"}'))
        self.assertEqual(first["headers"]["x-custom"], "Yes")
        self.get("/mock/reset")
        self.assertEqual(set(self.mock.stats.values()), {0})
        self.assertEqual(len(self.mock.requests), 0)

    def test_requests_keeps_last_100(self) -> None:
        """Only the last 100 requests are kept."""
        for _ in range(105):
            self.get("/v1/messages/count_tokens", b"{}")
        self.assertEqual(len(self.mock.requests), 100)
        self.assertEqual(self.mock.stats["requests"], 105)

    def test_bad_control_header(self) -> None:
        """A malformed x-mock-* header is a 400, not a crash."""
        self.assertEqual(self.get("/v1/chat/completions", b"{}", x_mock_tokens="x").status, 400)
        self.assertEqual(self.get("/v1/chat/completions", b"{}", x_mock_fault="?").status, 400)


class TapTests(SynchronousTestCase):
    def test_port_number(self) -> None:
        """A bare port number means that port on 127.0.0.1; the default is 9000."""
        options = mock_tap.Options()
        options.parseOptions(["--port", "9123"])
        self.assertEqual(options["port"], "tcp:9123:interface=127.0.0.1")
        options = mock_tap.Options()
        options.parseOptions([])
        self.assertEqual(options["port"], "tcp:9000:interface=127.0.0.1")

    def test_make_service(self) -> None:
        """makeService builds one endpoint service on the given reactor (not started)."""
        options = mock_tap.Options()
        options.parseOptions(["-p", "unix:/tmp/x.sock"])
        service = mock_tap.makeService(options, reactor=MemoryReactorClock())
        (child,) = list(service)
        self.assertIsInstance(child, StreamServerEndpointService)

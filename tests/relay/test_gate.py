"""What the first-content gate counts as content (L{llmgate.relay.gate})."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llmgate.relay.gate import CONTENT, ERROR, WAIT, Gate, error_message

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]}\n\n'
WORD = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
TOOL = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1"}]}}]}\n\n'
STOP = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
START = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":5}}}\n\n'
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
BLOCK = b'event: content_block_start\ndata: {"type":"content_block_start","index":0}\n\n'
ERR = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'


class OpenAIGateTests(SynchronousTestCase):
    def test_role_chunk_is_not_content(self) -> None:
        """The role-only first chunk (empty content, null refusal) and a usage-only chunk are preamble."""
        g = Gate(anthropic=False)
        self.assertEqual(g.scan(ROLE), WAIT)
        self.assertEqual(g.scan(USAGE), WAIT)

    def test_content_tool_call_finish_done(self) -> None:
        """A word, a tool call, a finish reason and [DONE] are each content."""
        for data in (WORD, TOOL, STOP, b"data: [DONE]\n\n"):
            self.assertEqual(Gate(anthropic=False).scan(ROLE + data), CONTENT, data)

    def test_responses_preamble(self) -> None:
        """Responses API: response.created waits, an output delta is content."""
        g = Gate(anthropic=False)
        self.assertEqual(g.scan(b'event: response.created\ndata: {"type":"response.created"}\n\n'), WAIT)
        self.assertEqual(g.scan(b'data: {"type":"response.output_text.delta","delta":"a"}\n\n'), CONTENT)

    def test_event_split_across_scans(self) -> None:
        """An event split over two scans is judged when whole."""
        g = Gate(anthropic=False)
        self.assertEqual(g.scan(WORD[:20]), WAIT)
        self.assertEqual(g.scan(WORD[20:]), CONTENT)


class AnthropicGateTests(SynchronousTestCase):
    def test_preamble_then_content(self) -> None:
        """message_start and ping wait; content_block_start is content."""
        g = Gate(anthropic=True)
        self.assertEqual(g.scan(START + PING), WAIT)
        self.assertEqual(g.scan(BLOCK), CONTENT)

    def test_error_before_content(self) -> None:
        """An error event before any content is an error, with its type in the message."""
        self.assertEqual(Gate(anthropic=True).scan(START + ERR), ERROR)
        self.assertIn("overloaded_error", error_message(START + ERR))

    def test_content_then_error_is_content(self) -> None:
        """Once content came in the same read, the error is the stream's (relayed), not a retry."""
        self.assertEqual(Gate(anthropic=True).scan(START + BLOCK + ERR), CONTENT)

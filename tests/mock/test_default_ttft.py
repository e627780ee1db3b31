"""The mock's default TTFT (C{--ttft-ms}): every request that names no x-mock-ttft-ms starts that late."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from llmgate.mock import tap as mock_tap
from llmgate.mock.provider import MockProvider
from tests.mock.test_provider import MockTestCase, Response

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


class DefaultTtftTests(MockTestCase):
    def test_default_ttft_applies(self) -> None:
        """A mock made with ttft_ms=200 holds a plain request's response 200 ms; a request's own header wins."""
        self.mock = MockProvider(self.clock, seed=1, ttft_ms=200)
        self.site = Site(self.mock.resource, reactor=self.clock, timeout=None)
        _, transport = self.send("/v1/chat/completions", CHAT)
        self.clock.advance(0.199)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.001)
        self.assertGreaterEqual(len(Response(transport.value()).events()), 1)
        _, transport = self.send("/v1/chat/completions", CHAT, x_mock_ttft_ms="0")
        self.clock.advance(0)
        self.assertGreaterEqual(len(Response(transport.value()).events()), 1)

    def test_option(self) -> None:
        """--ttft-ms takes a number of milliseconds."""
        o = mock_tap.Options()
        o.parseOptions(["--ttft-ms", "150"])
        self.assertEqual(o["ttft-ms"], 150.0)
        plain = mock_tap.Options()
        plain.parseOptions([])
        self.assertIsNone(plain["ttft-ms"])
        self.assertRaises(usage.UsageError, mock_tap.Options().parseOptions, ["--ttft-ms", "soon"])


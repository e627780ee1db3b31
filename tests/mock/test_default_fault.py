"""The mock's default fault (C{--fault}): every request that names none fails."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from llmgate.mock import tap as mock_tap
from llmgate.mock.provider import MockProvider
from tests.mock.test_provider import MockTestCase

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class DefaultFaultTests(MockTestCase):
    def test_default_fault_applies(self) -> None:
        """A mock made with fault=status-500 answers 500 to a plain request; a request's own fault header wins."""
        self.mock = MockProvider(self.clock, seed=1, fault="status-500")
        from twisted.web.server import Site

        self.site = Site(self.mock.resource, reactor=self.clock, timeout=None)
        self.assertEqual(self.get("/v1/chat/completions", CHAT).status, 500)
        self.assertEqual(self.get("/v1/chat/completions", CHAT, x_mock_fault="status-429").status, 429)

    def test_no_default(self) -> None:
        """Without it, a plain request succeeds."""
        self.assertEqual(self.get("/v1/chat/completions", CHAT).status, 200)


class OptionTests(SynchronousTestCase):
    def test_option(self) -> None:
        """--fault takes a known fault and refuses others."""
        o = mock_tap.Options()
        o.parseOptions(["--fault", "stall-headers"])
        self.assertEqual(o["fault"], "stall-headers")
        self.assertRaises(usage.UsageError, mock_tap.Options().parseOptions, ["--fault", "explode"])

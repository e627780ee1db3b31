"""
The mock's seeded slow and failing fractions (C{--slow-fraction F
--slow-ttft S}, C{--fail-fraction F --fail-status N}): a deployment that is
slow or fails on some of its requests only.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from llmgate.mock import tap as mock_tap
from llmgate.mock.provider import Fractions, MockProvider
from tests.mock.test_provider import MockTestCase, Response

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "claude", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


class FractionTestCase(MockTestCase):
    def use(self, fractions: Fractions) -> None:
        self.mock = MockProvider(self.clock, seed=1, fractions=fractions)
        self.site = Site(self.mock.resource, reactor=self.clock, timeout=None)

    def statuses(self, n: int, path: str = "/v1/chat/completions", body: object = CHAT) -> list[int]:
        return [self.get(path, body, x_mock_tokens="2").status for _ in range(n)]


class FailFractionTests(FractionTestCase):
    def test_fraction_fails_with_status(self) -> None:
        """fail_fraction=0.3 answers about 30 of 100 requests with fail_status
        (an OpenAI error body) and the rest normally; the mock counts them."""
        self.use(Fractions(seed=5, fail_fraction=0.3, fail_status=503))
        got = self.statuses(100)
        self.assertEqual(set(got), {200, 503})
        self.assertTrue(15 <= got.count(503) <= 45, got.count(503))
        self.assertEqual(self.mock.fractions.failed, got.count(503))
        self.assertEqual(self.mock.stats["faults"], got.count(503))

    def test_error_body_in_dialect(self) -> None:
        """A failed request's body is the route's error shape: OpenAI's
        error object, Anthropic's type=error envelope; content-type JSON."""
        self.use(Fractions(seed=5, fail_fraction=1.0, fail_status=500))
        r = self.get("/v1/chat/completions", CHAT)
        self.assertEqual((r.status, r.headers["content-type"]), (500, "application/json"))
        self.assertEqual(r.json()["error"]["type"], "server_error")
        r = self.get("/v1/messages", MESSAGES)
        self.assertEqual(r.status, 500)
        self.assertEqual(r.json()["type"], "error")
        self.assertEqual(r.json()["error"]["type"], "api_error")

    def test_seeded(self) -> None:
        """The same seed fails the same requests; another seed other ones."""
        runs = []
        for seed in (11, 11, 12):
            self.use(Fractions(seed=seed, fail_fraction=0.3, fail_status=503))
            runs.append(self.statuses(40))
        self.assertEqual(runs[0], runs[1])
        self.assertNotEqual(runs[0], runs[2])

    def test_own_fault_wins(self) -> None:
        """A request's own x-mock-fault is answered as asked even when the
        draw would have failed it."""
        self.use(Fractions(seed=5, fail_fraction=1.0, fail_status=503))
        r = self.get("/v1/chat/completions", CHAT, x_mock_fault="status-500")
        self.assertEqual(r.status, 500)

    def test_default_is_off(self) -> None:
        """Without fractions every request succeeds at once."""
        self.assertEqual(set(self.statuses(30)), {200})
        self.assertEqual((self.mock.fractions.failed, self.mock.fractions.slowed), (0, 0))


class SlowFractionTests(FractionTestCase):
    def test_slow_requests_wait_before_first_event(self) -> None:
        """slow_fraction=0.5, slow_ttft=2: about half of 20 streams have
        written nothing after 1.9 s, the others are complete; after 2.1 s
        all are complete."""
        self.use(Fractions(seed=3, slow_fraction=0.5, slow_ttft=2.0))
        transports = [self.send("/v1/chat/completions", CHAT, x_mock_tokens="2")[1] for _ in range(20)]
        self.clock.advance(0)
        self.clock.advance(1.9)
        silent = [t for t in transports if t.value() == b""]
        self.assertTrue(4 <= len(silent) <= 16, len(silent))
        self.assertEqual(self.mock.fractions.slowed, len(silent))
        for t in transports:
            if t not in silent:
                self.assertTrue(Response(t.value()).complete)
        self.clock.advance(0.2)
        for t in transports:
            r = Response(t.value())
            self.assertEqual(r.status, 200)
            self.assertTrue(r.complete)


class OptionTests(SynchronousTestCase):
    def test_options_reach_the_provider(self) -> None:
        """--slow-fraction/--slow-ttft/--fail-fraction/--fail-status build
        the provider's Fractions."""
        o = mock_tap.Options()
        o.parseOptions(["--slow-fraction", "0.1", "--slow-ttft", "1.5",
                        "--fail-fraction", "0.3", "--fail-status", "500"])
        (child,) = list(mock_tap.makeService(o, reactor=MemoryReactorClock()))
        f = child.factory.resource._provider.fractions
        self.assertEqual((f.slow_fraction, f.slow_ttft, f.fail_fraction, f.fail_status), (0.1, 1.5, 0.3, 500))

    def test_bad_values_refused(self) -> None:
        """Fractions summing over 1, a negative one, or a status outside
        400..599 are usage errors."""
        for argv in (["--fail-fraction", "0.7", "--slow-fraction", "0.4"], ["--slow-fraction", "-0.1"],
                     ["--fail-fraction", "0.1", "--fail-status", "200"]):
            self.assertRaises(usage.UsageError, mock_tap.Options().parseOptions, argv)

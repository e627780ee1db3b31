"""
End to end: gateway keys from a key file, their model allow-lists, rate
limits and budgets, seen by the official openai and anthropic SDKs through
a real twistd gateway in front of the mock provider; and a SIGHUP after
C{llmgate keys revoke}.
"""

from __future__ import annotations

import io
import os
import signal
import time
from contextlib import redirect_stderr, redirect_stdout

import anthropic
import openai
from twisted.trial.unittest import SynchronousTestCase

from llmgate import cli
from tests.e2e.procs import MockStack, get_json, shared

UPSTREAM_KEY = "sk-e2e-upstream-secret"
# $1 a token: budgets in whole tokens.
PRICES = '[prices."gpt-4o-mini"]\ninput = 1000000.0\noutput = 1000000.0\n'


def keys(*argv: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert cli.main(["keys", *argv]) == 0
    return out.getvalue().strip()


class _Stack(MockStack):
    """The mock and a gateway whose keys come from a key file (CLI-made)."""

    def __init__(self) -> None:
        super().__init__("llmgate-e2e-keys-", UPSTREAM_KEY)

    def prepare(self) -> str:
        self.file = os.path.join(self.dir, "llmgate-keys.json")
        self.secrets = {
            "alice": keys("--file", self.file, "create", "alice", "--models", "gpt-4o-mini", "claude-*", "public-*"),
            "limited": keys("--file", self.file, "create", "limited", "--rpm", "2", "--tpm", "100000"),
            "limited-ant": keys("--file", self.file, "create", "limited-ant", "--rpm", "1"),
            "broke": keys("--file", self.file, "create", "broke", "--budget", "200", "--period", "total"),
            "streamer": keys("--file", self.file, "create", "streamer"),
            "old": keys("--file", self.file, "create", "old", "--expires", "2020-01-01"),
        }
        return PRICES


def stack() -> _Stack:
    return shared("keys", _Stack)


class KeysE2ETests(SynchronousTestCase):
    def setUp(self) -> None:
        self.s = stack()

    def oai(self, name: str, **kw: object) -> openai.OpenAI:
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.s.gw.url("/v1"), api_key=self.s.secrets.get(name, name), timeout=20, **kw)  # type: ignore[arg-type]

    def ant(self, name: str, **kw: object) -> anthropic.Anthropic:
        kw.setdefault("max_retries", 0)
        return anthropic.Anthropic(base_url=self.s.gw.url(), api_key=self.s.secrets.get(name, name), timeout=20, **kw)  # type: ignore[arg-type]

    def chat(self, client: openai.OpenAI, model: str = "gpt-4o-mini", **kw: object) -> object:
        kw.setdefault("max_tokens", 10)
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **kw)  # type: ignore[call-overload]

    def test_valid_key_both_sdks(self) -> None:
        """A key from the key file works with both SDKs (Bearer and x-api-key)."""
        r = self.chat(self.oai("alice"), extra_headers={"x-mock-tokens": "3"})
        self.assertEqual(r.usage.completion_tokens, 3)
        m = self.ant("alice").messages.create(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                                              extra_headers={"x-mock-tokens": "2"})
        self.assertEqual(m.usage.output_tokens, 2)

    def test_wrong_and_expired_key_401(self) -> None:
        """A wrong key is AuthenticationError in both SDKs; an expired one says it expired."""
        with self.assertRaises(openai.AuthenticationError):
            self.chat(self.oai("lg-not-a-key"))
        with self.assertRaises(anthropic.AuthenticationError):
            self.ant("lg-not-a-key").messages.create(model="claude-x", max_tokens=5, messages=[])
        with self.assertRaises(openai.AuthenticationError) as e:
            self.chat(self.oai("old"))
        self.assertIn("expired", str(e.exception))

    def test_forbidden_model_403(self) -> None:
        """A model outside the key's patterns is PermissionDeniedError, never sent upstream."""
        before = get_json(self.s.mock.url("/mock/stats"))["requests"]
        with self.assertRaises(openai.PermissionDeniedError) as e:
            self.chat(self.oai("alice"), model="gpt-4.1")
        self.assertEqual(e.exception.body["type"], "permission_error")
        with self.assertRaises(anthropic.PermissionDeniedError):
            self.ant("alice").messages.create(model="other-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        self.assertEqual(get_json(self.s.mock.url("/mock/stats"))["requests"], before)

    def test_rpm_429_with_headers(self) -> None:
        """Past its rpm a key gets RateLimitError with retry-after and the x-ratelimit-* headers; successes show the remainder."""
        client = self.oai("limited")
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
        self.assertEqual(raw.headers["x-ratelimit-limit-requests"], "2")
        self.assertEqual(raw.headers["x-ratelimit-remaining-requests"], "1")
        self.assertEqual(raw.headers["x-ratelimit-limit-tokens"], "100000")
        self.chat(client)
        with self.assertRaises(openai.RateLimitError) as e:
            self.chat(client)
        h = e.exception.response.headers
        self.assertEqual(e.exception.code, "rate_limit_exceeded")
        self.assertGreaterEqual(int(h["retry-after"]), 1)
        self.assertEqual(h["x-ratelimit-remaining-requests"], "0")
        self.assertRegex(h["x-ratelimit-reset-requests"], r"^(\d+m)?\d+s$")
        self.assertNotIn("x-should-retry", h)

    def test_rpm_429_anthropic(self) -> None:
        """The Anthropic SDK gets RateLimitError with anthropic-ratelimit-* headers."""
        client = self.ant("limited-ant")
        client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        with self.assertRaises(anthropic.RateLimitError) as e:
            client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        h = e.exception.response.headers
        self.assertEqual(h["anthropic-ratelimit-requests-limit"], "1")
        self.assertEqual(h["anthropic-ratelimit-requests-remaining"], "0")
        self.assertRegex(h["anthropic-ratelimit-requests-reset"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    def test_budget_exhausted_not_retried(self) -> None:
        """
        A spent budget is RateLimitError with x-should-retry: false, and the
        SDK (with its default retries) does not retry it; it survives a
        restart, rebuilt from the ledger.
        """
        client = self.oai("broke", max_retries=2)
        before = get_json(self.s.mock.url("/mock/stats"))["requests"]
        # Reserves ~20 + 150 tokens of the 200; uses ~150 of them.
        self.chat(client, max_tokens=150, extra_headers={"x-mock-tokens": "150"})
        with self.assertRaises(openai.RateLimitError) as e:
            self.chat(client, max_tokens=150)
        self.assertEqual(e.exception.response.headers["x-should-retry"], "false")
        self.assertEqual(e.exception.code, "insufficient_quota")
        self.assertEqual(get_json(self.s.mock.url("/mock/stats"))["requests"], before + 1)
        # One access line for the refused request (the client did not retry).
        # The access line is written once the refusal is recorded, which may
        # be a moment after the client has its answer on a loaded machine.
        deadline = time.monotonic() + 10
        while True:
            refused = [l for l in self.s.gw.output().splitlines() if " key=broke " in l and " status=429 " in l]
            if refused or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # a retry, had the SDK made one, would have logged by now
        refused = [l for l in self.s.gw.output().splitlines() if " key=broke " in l and " status=429 " in l]
        self.assertEqual(len(refused), 1, refused)

    def test_spend_survives_restart(self) -> None:
        """After a restart the budget still counts what the ledger says was spent."""
        client = self.oai("broke")
        try:
            self.chat(client, max_tokens=150, extra_headers={"x-mock-tokens": "150"})
        except openai.RateLimitError:
            pass  # spent already by the test above
        with self.assertRaises(openai.RateLimitError):
            self.chat(client, max_tokens=150)
        self.s.gw.stop()
        self.s.gw = self.s.start_gateway()
        with self.assertRaises(openai.RateLimitError) as e:
            self.chat(self.oai("broke"), max_tokens=150)
        self.assertEqual(e.exception.code, "insufficient_quota")
        # A key without a budget is unaffected.
        self.chat(self.oai("alice"))

    def test_sighup_revoke_keeps_stream(self) -> None:
        """After `llmgate keys revoke` and SIGHUP the key is 401; its stream in flight finishes whole."""
        client = self.oai("streamer")
        stream = self.chat(client, stream=True, extra_headers={"x-mock-tokens": "30", "x-mock-delay-ms": "50"})
        it = iter(stream)
        first = next(it)
        keys("--file", self.s.file, "revoke", "streamer")
        reloads = self.s.gw.output().count("config reloaded from")
        os.kill(self.s.gw.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.s.gw.output().count("config reloaded from") == reloads:
            self.assertLess(time.monotonic(), deadline, self.s.gw.output())
            time.sleep(0.05)
        with self.assertRaises(openai.AuthenticationError):
            self.chat(self.oai("streamer"))
        rest = list(it)
        text = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
        self.assertEqual(len(text.split()), 30)
        self.assertEqual(rest[-1].choices[0].finish_reason, "stop")

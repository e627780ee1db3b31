"""
End to end, with several mock providers on 127.0.0.1: an Anthropic stream
that begins with an error event is failed over before the official SDK sees
a byte; a hedge races a deployment stuck before its first token, wins,
and the loser's upstream connection is closed within 100 ms; a 429 with a
short retry-after on the only deployment is retried there after the wait.
"""

from __future__ import annotations

import os
import tempfile
import time

import anthropic
import openai
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from llmgate.mock.provider import mock_text
from tests.e2e.procs import Daemon, get_json

KEY = "sk-e2e-upstream-secret"


def provider(name: str, port: int, kind: str = "openai") -> str:
    base = f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else "")
    return f'[providers.{name}]\nkind = "{kind}"\nbase_url = "{base}"\napi_key_env = "E2E_UPSTREAM_KEY"\n'


class _Stack:
    """Mock providers (name -> extra mock args) and a gateway over them, with a ledger."""

    def __init__(self, case: SynchronousTestCase, mocks: dict[str, list[str]], config: str, kind: str = "openai") -> None:
        self.dir = tempfile.mkdtemp(prefix="llmgate-e2e-hedge-")
        self.mocks: dict[str, Daemon] = {}
        conf = ""
        for name, args in mocks.items():
            m = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1", *args], self.dir)
            case.addCleanup(m.stop)
            self.mocks[name] = m
            conf += provider(name, m.port, kind)
        self.ledger = os.path.join(self.dir, "usage.db")
        path = os.path.join(self.dir, "llmgate.toml")
        with open(path, "w") as f:
            f.write(conf + config + f'[ledger]\npath = "{self.ledger}"\nbatch_interval = 0.05\n')
        self.gw = Daemon(
            "llmgate", ["--config", path, "--port", "tcp:0:interface=127.0.0.1"], self.dir,
            env={"E2E_UPSTREAM_KEY": KEY},
        )
        case.addCleanup(self.gw.stop)

    def records(self, n: int) -> list[dict]:
        """The ledger's final rows, once there are C{n}."""
        deadline = time.monotonic() + 10
        while True:
            rows = [r for r in read_records(self.ledger) if r["outcome"] != "open"] if os.path.exists(self.ledger) else []
            if len(rows) >= n or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


class ErrorFirstE2ETests(SynchronousTestCase):
    def test_anthropic_sdk_sees_one_clean_stream(self) -> None:
        """The first deployment's stream begins with overloaded_error: the anthropic SDK streams the fallback's answer, no error."""
        s = _Stack(
            self,
            {"bad": ["--fault", "error-first"], "good": []},
            '[models.claude]\nprovider = "bad"\nupstream_model = "claude-bad"\nfallbacks = ["claude2"]\n'
            '[models.claude2]\nprovider = "good"\nupstream_model = "claude-good"\n',
            kind="anthropic",
        )
        client = anthropic.Anthropic(base_url=s.gw.url(), api_key="client-key", max_retries=0, timeout=20)
        with client.messages.stream(
            model="claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-tokens": "5"},
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual(text, mock_text(5))
        self.assertEqual(final.stop_reason, "end_turn")
        self.assertEqual(get_json(s.mocks["bad"].url("/mock/stats"))["faults"], 1)
        rows = s.records(2)
        [failed] = [r for r in rows if r["parent_request_id"]]
        [served] = [r for r in rows if not r["parent_request_id"]]
        self.assertEqual(
            (failed["attempt"], failed["provider"], failed["status"], failed["outcome"], failed["phase"]),
            (1, "bad", 200, "upstream_error", "body"),
        )
        self.assertEqual((served["attempt"], served["provider"], served["outcome"], served["output_tokens"]), (2, "good", "completed", 5))


class HedgeE2ETests(SynchronousTestCase):
    def test_hedge_wins_and_loser_closed_fast(self) -> None:
        """
        The first deployment sends its role chunk and then nothing; after
        hedge_after the fast one is asked too and serves the openai SDK; the
        slow mock sees its connection closed within 100 ms of the content.
        """
        mport = free_port()
        s = _Stack(
            self,
            {"slow": ["--fault", "stall-first"], "fast": []},
            '[models.m]\nprovider = "slow"\nupstream_model = "m-slow"\nfallbacks = ["m2"]\n'
            "hedge_after = 0.3\nhedge_max_fraction = 1.0\n"
            '[models.m2]\nprovider = "fast"\nupstream_model = "m-fast"\n'
            f'[metrics]\nport = "tcp:{mport}:interface=127.0.0.1"\n',
        )
        oai = openai.OpenAI(base_url=s.gw.url("/v1"), api_key="client-key", max_retries=0, timeout=20)
        t0 = time.time()
        stream = oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_headers={"x-mock-tokens": "5"},
        )
        first_content = None
        text = ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first_content is None:
                    first_content = time.time()
                text += chunk.choices[0].delta.content
        self.assertEqual(text, mock_text(5))
        assert first_content is not None
        self.assertGreater(first_content - t0, 0.25)
        deadline = time.monotonic() + 5
        while not get_json(s.mocks["slow"].url("/mock/cancels")) and time.monotonic() < deadline:
            time.sleep(0.02)
        [cancelled] = get_json(s.mocks["slow"].url("/mock/cancels"))
        log.msg(f"hedge e2e: first content after {first_content - t0:.3f} s, loser closed {cancelled - first_content:+.3f} s from it")
        # Closed when the hedge's first content reached the gateway: no
        # later than 100 ms after the client read it.
        self.assertLess(cancelled - first_content, 0.1)
        self.assertGreater(cancelled, t0 + 0.25)
        rows = s.records(2)
        [lost] = [r for r in rows if r["parent_request_id"]]
        [served] = [r for r in rows if not r["parent_request_id"]]
        self.assertEqual((served["provider"], served["attempt"], served["hedged"], served["output_tokens"]), ("fast", 2, 1, 5))
        self.assertEqual((lost["provider"], lost["attempt"], lost["outcome"], lost["parent_request_id"]), ("slow", 1, "hedge_lost", served["request_id"]))
        self.assertGreater(lost["input_tokens"], 0)
        metrics = urllib_get(f"http://127.0.0.1:{mport}/metrics")
        self.assertIn('llmgate_hedges_total{model="m",result="won"} 1.0', metrics)
        self.assertIn('llmgate_upstream_attempts_total{provider="fast",reason="hedge"} 1.0', metrics)


class RetrySameE2ETests(SynchronousTestCase):
    def test_429_retried_on_same_deployment(self) -> None:
        """The only deployment answers 429 retry-after 1 (mock fixture) to the first request: the gateway waits and retries it; the SDK sees a success."""
        s = _Stack(self, {"only": []}, '[models.m]\nprovider = "only"\nupstream_model = "m-only"\n')
        oai = openai.OpenAI(base_url=s.gw.url("/v1"), api_key="client-key", max_retries=0, timeout=20)
        # The fault header reaches the mock on every attempt: a 429 each
        # time, so the gateway retries up to max_attempts (3) and relays the last.
        t0 = time.monotonic()
        with self.assertRaises(openai.RateLimitError):
            oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-mock-fault": "status-429"},
            )
        elapsed = time.monotonic() - t0
        self.assertGreater(elapsed, 1.9)
        self.assertEqual(get_json(s.mocks["only"].url("/mock/stats"))["requests"], 3)
        rows = s.records(3)
        self.assertEqual(sorted((r["attempt"], r["status"], r["parent_request_id"] is None) for r in rows), [(1, 429, False), (2, 429, False), (3, 429, True)])


def free_port() -> int:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def urllib_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()

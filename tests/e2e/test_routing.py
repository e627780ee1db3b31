"""
End to end: failover between two mock providers on 127.0.0.1 (one started
with C{--fault status-500}, so only it fails whatever the gateway sends) and
a provider on a port nobody listens on; the official openai SDK sees one
clean stream, the ledger has every attempt, and a breaker opens.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import openai
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from llmgate.mock.provider import mock_text
from tests.e2e.procs import Daemon

KEY = "sk-e2e-upstream-secret"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def provider(name: str, port: int) -> str:
    return f'[providers.{name}]\nkind = "openai"\nbase_url = "http://127.0.0.1:{port}/v1"\napi_key_env = "E2E_UPSTREAM_KEY"\n'


class RoutingE2ETests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmgate-e2e-routing-")
        self.good = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], self.dir)
        self.addCleanup(self.good.stop)
        self.bad = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1", "--fault", "status-500"], self.dir)
        self.addCleanup(self.bad.stop)
        self.ledger = os.path.join(self.dir, "usage.db")
        conf = os.path.join(self.dir, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(
                provider("good", self.good.port)
                + provider("bad", self.bad.port)
                + provider("dead", closed_port())
                + '[models."gpt-4o"]\n'
                'deployments = [{provider = "bad", upstream_model = "gpt-4o-bad"}]\n'
                'fallbacks = ["gpt-4o-mini"]\n'
                '[models."gpt-4o-mini"]\nprovider = "good"\nupstream_model = "mini-good"\n'
                '[models."doomed"]\nprovider = "dead"\n'
                "[routing]\nbreaker_failures = 3\nbreaker_cooldown = 60\n"
                f'[ledger]\npath = "{self.ledger}"\nbatch_interval = 0.05\n'
            )
        self.gw = Daemon(
            "llmgate", ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"], self.dir,
            env={"E2E_UPSTREAM_KEY": KEY},
        )
        self.addCleanup(self.gw.stop)
        self.oai = openai.OpenAI(base_url=self.gw.url("/v1"), api_key="client-key", max_retries=0, timeout=20)

    def records(self, n: int) -> list[dict]:
        """The ledger's final rows, once there are C{n}."""
        deadline = time.monotonic() + 10
        while True:
            rows = [r for r in read_records(self.ledger) if r["outcome"] != "open"] if os.path.exists(self.ledger) else []
            if len(rows) >= n or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)

    def test_sdk_sees_one_clean_stream_after_failover(self) -> None:
        """The bad provider's 500 is hidden: the SDK streams the fallback's answer; the ledger links both attempts."""
        stream = self.oai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_headers={"x-mock-tokens": "5"},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        self.assertEqual(text, mock_text(5))
        rows = self.records(2)
        [failed] = [r for r in rows if r["parent_request_id"]]
        [served] = [r for r in rows if not r["parent_request_id"]]
        self.assertEqual(failed["parent_request_id"], served["request_id"])
        self.assertEqual(
            (failed["attempt"], failed["provider"], failed["upstream_model"], failed["status"], failed["outcome"]),
            (1, "bad", "gpt-4o-bad", 500, "upstream_error"),
        )
        self.assertEqual(
            (served["attempt"], served["provider"], served["upstream_model"], served["status"], served["outcome"], served["model"]),
            (2, "good", "mini-good", 200, "completed", "gpt-4o"),
        )
        self.assertEqual(served["output_tokens"], 5)

    def test_breaker_opens_and_answers_fast(self) -> None:
        """After 3 connect failures the dead deployment's breaker is open: 503 with retry-after, at once."""
        for _ in range(3):
            with self.assertRaises(openai.APIStatusError) as e:
                self.oai.chat.completions.create(model="doomed", messages=[{"role": "user", "content": "hi"}])
            self.assertEqual(e.exception.status_code, 502)
        t0 = time.monotonic()
        with self.assertRaises(openai.APIStatusError) as e:
            self.oai.chat.completions.create(model="doomed", messages=[{"role": "user", "content": "hi"}])
        elapsed = time.monotonic() - t0
        self.assertEqual(e.exception.status_code, 503)
        self.assertEqual(e.exception.response.headers["retry-after"], "60")
        self.assertIn("doomed", e.exception.message)
        self.assertLess(elapsed, 0.5)
        rows = self.records(4)
        self.assertEqual([(r["status"], r["outcome"]) for r in rows][-1], (503, "rejected"))


class StalledHeadersE2ETests(SynchronousTestCase):
    def test_stalled_provider_fails_over(self) -> None:
        """A provider that never sends headers is left after timeouts.headers; the SDK gets the other's answer."""
        d = tempfile.mkdtemp(prefix="llmgate-e2e-routing-")
        good = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], d)
        self.addCleanup(good.stop)
        stall = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1", "--fault", "stall-headers"], d)
        self.addCleanup(stall.stop)
        conf = os.path.join(d, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(
                provider("good", good.port) + provider("stall", stall.port)
                + '[models."m"]\nprovider = "stall"\nfallbacks = ["m2"]\n'
                + '[models."m2"]\nprovider = "good"\n'
                + "[timeouts]\nheaders = 1\n"
                + f'[ledger]\npath = "{os.path.join(d, "usage.db")}"\n'
            )
        gw = Daemon("llmgate", ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"], d, env={"E2E_UPSTREAM_KEY": KEY})
        self.addCleanup(gw.stop)
        oai = openai.OpenAI(base_url=gw.url("/v1"), api_key="client-key", max_retries=0, timeout=20)
        t0 = time.monotonic()
        r = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-mock-tokens": "3"})
        elapsed = time.monotonic() - t0
        self.assertEqual(r.choices[0].message.content, mock_text(3))
        # The headers timeout (1 s, enforced by a once-a-second sweep), then the fallback.
        self.assertGreater(elapsed, 0.9)
        self.assertLess(elapsed, 4)

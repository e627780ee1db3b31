"""
End to end: after real traffic through two workers, the token and cost
counters of the supervisor's /metrics equal the ledger's sums, per key.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict

import anthropic
import openai
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from tests.e2e.procs import Daemon, gateway_config

_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$', re.M)
_BUCKETS = ("input", "output", "cached_input", "cache_creation", "reasoning")


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for name, labels, value in _SAMPLE.findall(text):
        out[name].append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return out


class CountersMatchLedgerTests(SynchronousTestCase):
    def test_counters_equal_ledger_sums(self) -> None:
        """
        Streams and bodies in both dialects, by two keys, plus a refused
        request: per key, /metrics' tokens by bucket and cost equal the
        ledger's sums, and the request counter counts every record.
        """
        tmp = tempfile.mkdtemp()
        mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], tmp)
        self.addCleanup(mock.stop)
        ledger = os.path.join(tmp, "usage.db")
        conf = os.path.join(tmp, "llmgate.toml")
        mport = _free_port()
        with open(conf, "w") as f:
            f.write(gateway_config(
                mock.port,
                f'[ledger]\npath = "{ledger}"\n'
                '[keys.team-a]\napi_key_env = "KEY_A"\n[keys.team-b]\napi_key_env = "KEY_B"\n'
                f'[metrics]\nport = "tcp:{mport}:interface=127.0.0.1"\n',
            ))
        env = {"E2E_UPSTREAM_KEY": "k", "KEY_A": "secret-a", "KEY_B": "secret-b"}
        gw = Daemon("llmgate", ["--config", conf, "--workers", "2", "--port", "tcp:0:interface=127.0.0.1"], tmp, env=env)
        self.addCleanup(gw.stop)
        for i in (0, 1):
            gw.wait_for(rf"worker {i} \(pid \d+\) is serving")
        msgs = [{"role": "user", "content": "hello there"}]
        sent = 0
        for key in ("secret-a", "secret-b"):
            oai = openai.OpenAI(base_url=gw.url("/v1"), api_key=key, max_retries=0, timeout=20)
            ant = anthropic.Anthropic(base_url=gw.url(), api_key=key, max_retries=0, timeout=20)
            for _ in range(3):
                list(oai.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True))
                oai.chat.completions.create(model="gpt-4o", messages=msgs)
                with ant.messages.stream(model="claude-sonnet-4-5", max_tokens=50, messages=msgs) as s:
                    s.get_final_message()
                sent += 3
        bad = openai.OpenAI(base_url=gw.url("/v1"), api_key="wrong", max_retries=0)
        with self.assertRaises(openai.AuthenticationError):
            bad.chat.completions.create(model="gpt-4o", messages=msgs)
        sent += 1

        # Counted as each record is made (just after its response): wait
        # for them all.
        deadline = time.monotonic() + 20
        while True:
            got = _scrape(mport)
            if sum(v for _, v in got["llmgate_requests_total"]) == sent or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(sum(v for _, v in got["llmgate_requests_total"]), sent)
        gw.stop()
        records = read_records(ledger)
        self.assertEqual(len(records), sent)

        for key in ("team-a", "team-b"):
            mine = [r for r in records if r["key_name"] == key]
            for bucket in _BUCKETS:
                want = sum(r[f"{bucket}_tokens"] or 0 for r in mine if r["source"] is not None)
                have = sum(v for lab, v in got["llmgate_tokens_total"] if lab["key"] == key and lab["bucket"] == bucket)
                self.assertEqual(have, want, (key, bucket))
            want_cost = sum(r["cost_usd"] or 0 for r in mine)
            have_cost = sum(v for lab, v in got["llmgate_cost_usd_total"] if lab["key"] == key)
            self.assertGreater(want_cost, 0)
            self.assertAlmostEqual(have_cost, want_cost, places=9)
            self.assertGreater(sum(r["output_tokens"] or 0 for r in mine), 0)
        refused = [lab for lab, v in got["llmgate_requests_total"] if lab["outcome"] == "rejected"]
        self.assertEqual([(lab["key"], lab["status"]) for lab in refused], [("none", "401")])
        # The latency histograms saw the relayed requests.
        counts = {lab.get("provider"): v for lab, v in got["llmgate_upstream_headers_seconds_count"]}
        self.assertEqual(counts, {"mock": 12.0, "mockant": 6.0})
        self.assertEqual(sum(v for _, v in got["llmgate_gateway_added_first_byte_seconds_count"]), 18)

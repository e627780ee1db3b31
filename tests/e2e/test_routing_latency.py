"""
End to end: C{balance = "latency"} between two mock providers on
127.0.0.1, one started with C{--ttft-ms 300}: most streams go to the fast
one, the slow one is measured (not starved from the start), and
C{/metrics} shows each deployment's TTFT EWMA, breaker state, error ratio
and requests in flight.
"""

from __future__ import annotations

import os
import tempfile
import time

import openai
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from llmgate.mock.provider import mock_text
from tests.e2e.procs import Daemon
from tests.e2e.test_metrics_ledger import _free_port, _scrape
from tests.e2e.test_routing import KEY, provider


class LatencyBalanceE2ETests(SynchronousTestCase):
    def test_fast_deployment_gets_most_streams(self) -> None:
        """
        40 streams in a row through the official SDK: at least 35 go to the
        fast mock, at least one to the slow one; the metrics' EWMAs are
        ~0 s and ~0.3 s, both breakers closed, nothing in flight.
        """
        d = tempfile.mkdtemp(prefix="llmgate-e2e-latency-")
        fast = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], d)
        self.addCleanup(fast.stop)
        slow = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1", "--ttft-ms", "300"], d)
        self.addCleanup(slow.stop)
        ledger = os.path.join(d, "usage.db")
        mport = _free_port()
        conf = os.path.join(d, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(
                provider("fast", fast.port) + provider("slow", slow.port)
                + '[models."m"]\ndeployments = [{provider = "slow", upstream_model = "m-slow"}, {provider = "fast", upstream_model = "m-fast"}]\n'
                + '[routing]\nbalance = "latency"\n'
                + f'[metrics]\nport = "tcp:{mport}:interface=127.0.0.1"\n'
                + f'[ledger]\npath = "{ledger}"\nbatch_interval = 0.05\n'
            )
        gw = Daemon("llmgate", ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"], d, env={"E2E_UPSTREAM_KEY": KEY})
        self.addCleanup(gw.stop)
        oai = openai.OpenAI(base_url=gw.url("/v1"), api_key="client-key", max_retries=0, timeout=20)
        for _ in range(40):
            stream = oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True, extra_headers={"x-mock-tokens": "3"},
            )
            self.assertEqual("".join(c.choices[0].delta.content or "" for c in stream if c.choices), mock_text(3))
        deadline = time.monotonic() + 10
        while True:
            rows = [r for r in read_records(ledger) if r["outcome"] != "open"]
            if len(rows) >= 40 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        by = {"fast": 0, "slow": 0}
        for r in rows:
            by[r["provider"]] += 1
        self.assertEqual(sum(by.values()), 40)
        self.assertGreaterEqual(by["fast"], 35, by)
        self.assertGreaterEqual(by["slow"], 1, by)
        m = _scrape(mport)

        def value(name: str, prov: str) -> float:
            [v] = [v for labels, v in m[name] if labels == {"provider": prov, "upstream_model": f"m-{prov}"}]
            return v

        self.assertLess(value("llmgate_deployment_ttft_ewma_seconds", "fast"), 0.15)
        self.assertGreater(value("llmgate_deployment_ttft_ewma_seconds", "slow"), 0.29)
        for prov in ("fast", "slow"):
            self.assertEqual(value("llmgate_deployment_breaker_state", prov), 0)
            self.assertEqual(value("llmgate_deployment_error_ratio", prov), 0)
            self.assertEqual(value("llmgate_deployment_outstanding", prov), 0)
        # Only configured deployments are labels.
        self.assertEqual(
            {(l["provider"], l["upstream_model"]) for l, _ in m["llmgate_deployment_outstanding"]},
            {("fast", "m-fast"), ("slow", "m-slow")},
        )


class WorkersGaugesE2ETests(SynchronousTestCase):
    def test_supervisor_serves_workers_deployment_gauges(self) -> None:
        """
        Under --workers 2 the supervisor's /metrics has the deployment
        gauges the workers push: in flight summed, breaker state one series
        per worker pid, the TTFT EWMA of the deployment that served.
        """
        d = tempfile.mkdtemp(prefix="llmgate-e2e-latency-")
        mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], d)
        self.addCleanup(mock.stop)
        mport = _free_port()
        conf = os.path.join(d, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(
                provider("p", mock.port)
                + '[models."m"]\ndeployments = [{provider = "p", upstream_model = "m-p"}]\n'
                + '[routing]\nbalance = "latency"\n'
                + f'[metrics]\nport = "tcp:{mport}:interface=127.0.0.1"\n'
                + f'[ledger]\npath = "{os.path.join(d, "usage.db")}"\n'
            )
        gw = Daemon(
            "llmgate", ["--config", conf, "--workers", "2", "--port", "tcp:0:interface=127.0.0.1"], d,
            env={"E2E_UPSTREAM_KEY": KEY},
        )
        self.addCleanup(gw.stop)
        pids = {gw.wait_for(rf"worker {i} \(pid (\d+)\) is serving").group(1) for i in (0, 1)}
        oai = openai.OpenAI(base_url=gw.url("/v1"), api_key="client-key", max_retries=0, timeout=20)
        for _ in range(4):
            list(oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
        deadline = time.monotonic() + 10
        while True:
            m = _scrape(mport)
            # Workers push once a second: the last stream's end (in flight
            # back to 0) can reach the supervisor a push after its EWMA.
            if (
                len(m["llmgate_deployment_breaker_state"]) == 2
                and m["llmgate_deployment_ttft_ewma_seconds"]
                and [v for _, v in m["llmgate_deployment_outstanding"]] == [0.0]
            ):
                break
            self.assertLess(time.monotonic(), deadline, m)
            time.sleep(0.2)
        self.assertEqual({l["pid"] for l, _ in m["llmgate_deployment_breaker_state"]}, pids)
        self.assertEqual([v for _, v in m["llmgate_deployment_breaker_state"]], [0, 0])
        self.assertEqual(m["llmgate_deployment_outstanding"], [({"provider": "p", "upstream_model": "m-p"}, 0.0)])
        [(labels, ewma)] = m["llmgate_deployment_ttft_ewma_seconds"]
        self.assertEqual(labels, {"provider": "p", "upstream_model": "m-p"})
        self.assertGreater(ewma, 0)

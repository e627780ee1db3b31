# -*- test-case-name: bench.test_routing -*-
"""Tests of the routing scenarios' runner (bench/routing.py) and of the mock
upstream's fault flags it relies on (stdlib unittest).

    .venv/bin/python -m unittest discover -s bench -p 'test_routing.py'

The upstream tests are skipped when bench/bin/ has not been built
(`bench/run.py --smoke` or `bench/routing.py --smoke` builds it when `go`
is installed). The configuration and ledger tests use llmgate's own config
loader and ledger schema, so they need the Python that has llmgate installed.
"""

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import routing  # noqa: E402
import run  # noqa: E402


class ConfigTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def write(self, text):
        path = os.path.join(self.tmp, "llmgate.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_one_model_over_both_upstreams(self):
        """The generated configuration, loaded by llmgate itself, has one
        model served by providers a and b at the given ports, weight 1
        each, and the ledger at the given path."""
        from llmgate import config as configmod
        ledger = os.path.join(self.tmp, "usage.db")
        cfg = configmod.load(self.write(routing.routing_config({"a": 4001, "b": 4002}, ledger)), inherited=False)
        model = cfg.models["gpt-4o-mini"]
        self.assertEqual([(d.provider, d.upstream_model, d.weight) for d in model.deployments],
                         [("a", "gpt-4o-mini", 1), ("b", "gpt-4o-mini", 1)])
        self.assertEqual(cfg.providers["a"].base_url, "http://127.0.0.1:4001/v1")
        self.assertEqual(cfg.providers["b"].base_url, "http://127.0.0.1:4002/v1")
        self.assertEqual(cfg.ledger_path, ledger)

    def test_model_settings_written_in_toml(self):
        """Model settings land in the model's table as TOML values: a number
        bare, a string quoted."""
        text = routing.routing_config({"a": 1, "b": 2}, "/x.db", {"hedge_after": "p95", "hedge_max_fraction": 0.1})
        table = text.split('[models."gpt-4o-mini"]', 1)[1].split("[ledger]", 1)[0]
        self.assertIn('hedge_after = "p95"\n', table)
        self.assertIn("hedge_max_fraction = 0.1\n", table)

    def test_routing_settings_in_routing_table(self):
        """A "routing.NAME" setting is written as NAME in [routing], not in
        the model's table; llmgate loads it there."""
        from llmgate import config as configmod
        text = routing.routing_config({"a": 1, "b": 2}, os.path.join(self.tmp, "u.db"),
                                      {"routing.balance": "least_outstanding"})
        self.assertNotIn("balance", text.split('[models."gpt-4o-mini"]', 1)[1].split("[routing]", 1)[0])
        cfg = configmod.load(self.write(text), inherited=False)
        self.assertEqual(cfg.routing.balance, "least_outstanding")

    def test_only_keeps_one_deployment(self):
        """A peer with only="a" uses upstream a alone and passes no `only`
        setting to llmgate; other settings go through."""
        self.assertEqual(routing.peer_deployments({"a": 1, "b": 2}, {"only": "a", "hedge_after": 0.25}),
                         ({"a": 1}, {"hedge_after": 0.25}))
        self.assertEqual(routing.peer_deployments({"a": 1, "b": 2}, {}), ({"a": 1, "b": 2}, {}))

    def test_check_config_accepts_and_refuses(self):
        """check_config is None for a valid file and llmgate's message for a
        setting it does not know (the hedged peers' fate before hedging)."""
        ok = self.write(routing.routing_config({"a": 1, "b": 2}, os.path.join(self.tmp, "u.db")))
        self.assertIsNone(routing.check_config(ok))
        bad = self.write(routing.routing_config({"a": 1, "b": 2}, os.path.join(self.tmp, "u.db"),
                                                {"no_such_setting": 1}))
        self.assertIn("no_such_setting", routing.check_config(bad))


def make_ledger(path, hedged_column):
    """A ledger file with llmgate's schema (plus `hedged` if asked) and rows:
    a warm-up request before t=100, three client requests (one hedged), two
    failed attempts and one losing hedge after it."""
    from llmgate.accounting import ledger as ledgermod
    conn = sqlite3.connect(path)
    conn.executescript(ledgermod._SCHEMA)
    has = any(r[1] == "hedged" for r in conn.execute("PRAGMA table_info(usage)"))
    if hedged_column and not has:
        conn.execute("ALTER TABLE usage ADD COLUMN hedged INTEGER NOT NULL DEFAULT 0")
    elif has and not hedged_column:
        # A ledger written before hedging (the schema has the column now).
        conn.execute("ALTER TABLE usage DROP COLUMN hedged")
    rows = [
        # request_id, ts, outcome, parent, output_tokens, cost, hedged
        ("w1", 50.0, "completed", None, 3, 0.5, 0),
        ("w1-1", 50.0, "upstream_error", "w1", None, None, 0),
        ("r1", 100.0, "completed", None, 30, 0.003, 1),
        ("r2", 101.0, "completed", None, 30, 0.003, 0),
        ("r3", 102.0, "completed", None, 30, 0.003, 0),
        ("r2-1", 101.0, "upstream_error", "r2", None, None, 0),
        ("r3-1", 102.0, "upstream_error", "r3", None, None, 0),
        ("r1-1", 100.0, "hedge_lost", "r1", 4, 0.0006, 0),
    ]
    for rid, ts, outcome, parent, out_tok, cost, hedged in rows:
        cols = ("request_id, ts, key_name, route, model, provider, upstream_model, status, streamed, outcome, "
                "cached_input_tokens, cache_creation_tokens, reasoning_tokens, duration_ms, bytes_in, bytes_out, "
                "parent_request_id, output_tokens, input_tokens, cost_usd")
        vals = [rid, ts, "", "chat", "gpt-4o-mini", "a", "gpt-4o-mini", 200, 1, outcome, 0, 0, 0, 1.0, 0, 0,
                parent, out_tok, 8 if out_tok else None, cost]
        if hedged_column:
            cols += ", hedged"
            vals.append(hedged)
        conn.execute("INSERT INTO usage (%s) VALUES (%s)" % (cols, ", ".join("?" * len(vals))), vals)
    conn.commit()
    conn.close()


class LedgerTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.path = os.path.join(self.tmp, "usage.db")

    def test_summary_splits_clients_and_attempts(self):
        """Rows from `since` on: client records (no parent) by outcome, and
        attempt rows (with a parent) by outcome with tokens and cost; the
        warm-up's rows before `since` are not counted."""
        make_ledger(self.path, hedged_column=True)
        s = routing.ledger_summary(self.path, 100.0)
        self.assertEqual(s["client_requests"], 3)
        self.assertEqual(s["client_outcomes"], {"completed": 3})
        self.assertEqual(s["attempt_rows"], 3)
        self.assertEqual(s["attempt_outcomes"]["upstream_error"]["rows"], 2)
        self.assertEqual(s["attempt_outcomes"]["hedge_lost"],
                         {"rows": 1, "output_tokens": 4, "input_tokens": 8, "cost_usd": 0.0006})
        self.assertEqual(s["hedged"], 1)

    def test_figures_from_summary(self):
        """Retries per request = failed attempts / client requests; hedge rate
        from the hedged column; the losers' tokens and cost, and their cost
        as a share of the clients' (0.0006 / 0.009)."""
        make_ledger(self.path, hedged_column=True)
        f = routing.attempt_figures(routing.ledger_summary(self.path, 100.0))
        self.assertEqual(f["failed_attempts"], 2)
        self.assertAlmostEqual(f["retries_per_request"], 2 / 3)
        self.assertEqual(f["hedges"], 1)
        self.assertAlmostEqual(f["hedge_rate"], 1 / 3)
        self.assertEqual(f["hedge_lost_output_tokens"], 4)
        self.assertAlmostEqual(f["hedge_lost_cost_usd"], 0.0006)
        self.assertAlmostEqual(f["hedge_lost_cost_share"], 0.0006 / 0.009)

    def test_ledger_without_hedged_column(self):
        """A ledger written before hedging has no `hedged` column: the summary
        says unknown (None) and the hedge count falls back to the losers."""
        make_ledger(self.path, hedged_column=False)
        s = routing.ledger_summary(self.path, 100.0)
        self.assertIsNone(s["hedged"])
        self.assertEqual(routing.attempt_figures(s)["hedges"], 1)


class ReportTests(unittest.TestCase):
    def peer(self, p99, errors=0, **kw):
        m = {"launched": 10, "ok_streams": 10 - errors, "errors": errors, "error_kinds": {},
             "ttft_p50_ms": 5.0, "ttft_p99_ms": p99, "upstreams": {"a": {}, "b": {"slowed": 2, "failed": 3}}}
        m.update(kw)
        return m

    def test_hedge_ratio_against_direct_a(self):
        """The hedge table states each gateway peer's TTFT p99 over direct-a's
        and over llmgate-a-only's, and an unavailable peer's reason."""
        scen = routing.scenarios(smoke=True)
        results = {"HEDGE": {"direct-a": self.peer(10.0), "llmgate-a-only": self.peer(8.0),
                             "llmgate": self.peer(12.0),
                             "llmgate-hedge": {"unavailable": "n/a: config rejected (x)"}}}
        text = routing.markdown(results, scen)
        row = next(l for l in text.splitlines() if l.startswith("| llmgate |"))
        self.assertIn("| 1.20x | 1.50x |", row)
        self.assertIn("| llmgate-hedge | n/a: config rejected (x) |", text)

    def test_smoke_fails_on_client_errors_in_fail30(self):
        """Smoke mode fails when a client of llmgate saw an error in FAIL30,
        not when a direct peer did (direct-b is expected to) nor when a peer
        is unavailable."""
        ledger = {"client_outcomes": {}, "attempt_outcomes": {}}
        good = {"FAIL30": {"direct-b": self.peer(9.0, errors=3),
                           "llmgate": self.peer(9.0, ledger=ledger)},
                "HEDGE": {"llmgate-hedge": {"unavailable": "n/a"}}}
        self.assertEqual(routing.smoke_check(good), [])
        bad = {"FAIL30": {"llmgate": self.peer(9.0, errors=2, ledger=ledger)}}
        self.assertEqual(routing.smoke_check(bad), ["FAIL30/llmgate: 2 client errors"])

    def test_scenarios_faults(self):
        """HEDGE slows 10% of B's requests by 2 s; the FAIL30 variants fail
        30% of B's with 503, 500, and a reset (status 0); A has no fault."""
        sc = routing.scenarios()
        self.assertEqual(sc["HEDGE"]["upstreams"], {"a": [], "b": ["-slow-fraction", "0.1", "-slow-ttft", "2"]})
        for name, status in (("FAIL30", "503"), ("FAIL30-500", "500"), ("FAIL30-RESET", "0")):
            self.assertEqual(sc[name]["upstreams"], {"a": [], "b": ["-fail-fraction", "0.3", "-fail-status", status]})


@unittest.skipUnless(os.path.exists(os.path.join(run.BIN, "upstream")), "bench/bin not built")
class UpstreamFaultTests(unittest.TestCase):
    """The Go mock upstream's -slow-* and -fail-* flags, over real sockets."""

    def start(self, *flags):
        port = run.free_port()
        proc = subprocess.Popen([os.path.join(run.BIN, "upstream"), "-addr", "127.0.0.1:%d" % port] + list(flags),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(run.stop, proc)
        run.wait_port(port, 10, proc)
        return port

    def post(self, port):
        """(status, seconds to the first body byte) of one streamed request."""
        req = urllib.request.Request("http://127.0.0.1:%d/v1/chat/completions" % port,
                                     data=b'{"stream":true}', headers={"x-mock-tokens": "1", "x-mock-delay-ms": "0"})
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read(1)
                return r.status, time.monotonic() - t0
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
            self.assertIn("message", body["error"])
            return e.code, time.monotonic() - t0

    def test_fail_fraction_is_seeded(self):
        """-fail-fraction 0.3 fails about 30% of 200 requests with
        -fail-status; the same seed fails the same requests, another seed
        other ones."""
        runs = []
        for seed in ("7", "7", "8"):
            port = self.start("-fail-fraction", "0.3", "-fail-status", "503", "-seed", seed)
            runs.append([self.post(port)[0] for _ in range(200)])
        self.assertEqual(set(runs[0]), {200, 503})
        self.assertTrue(40 <= runs[0].count(503) <= 80, runs[0].count(503))
        self.assertEqual(runs[0], runs[1])
        self.assertNotEqual(runs[0], runs[2])

    def test_slow_fraction_delays_first_event(self):
        """-slow-fraction 0.5 -slow-ttft 0.3: about half the streams send
        their first event after 0.3 s or more, the others at once."""
        port = self.start("-slow-fraction", "0.5", "-slow-ttft", "0.3")
        waits = [self.post(port) for _ in range(20)]
        self.assertEqual({s for s, _ in waits}, {200})
        slow = [t for _, t in waits if t >= 0.3]
        self.assertTrue(4 <= len(slow) <= 16, waits)
        self.assertTrue(all(t < 0.2 for _, t in waits if t < 0.3), waits)

    def test_fail_status_zero_resets(self):
        """-fail-status 0 resets the connection: no HTTP answer at all."""
        port = self.start("-fail-fraction", "1", "-fail-status", "0")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            try:
                data = s.recv(100)
            except ConnectionResetError:
                data = b""
        self.assertEqual(data, b"")


if __name__ == "__main__":
    unittest.main()

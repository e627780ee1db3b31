# -*- test-case-name: tests.policy.test_usage -*-
"""
C{llmgate usage --by key} with a key file: each key's budget, period,
spend in the current period (from the ledger, as the daemon sums it at
start) and the share used, in text, JSON and CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from calendar import timegm
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate import cli
from llmgate.accounting import report
from llmgate.accounting.ledger import Ledger
from llmgate.policy import keys as keymod
from llmgate.policy.usage import annotator
from tests.accounting.test_ledger import makeRecord, syncRunner

# 2030-01-15 12:00 UTC: the current day and month of these tests.
NOW = float(timegm((2030, 1, 15, 12, 0, 0)))
HASH = "sha256:" + "ab" * 32


class BudgetColumnTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ledger = os.path.join(self.dir, "usage.db")
        self.config = os.path.join(self.dir, "llmgate.toml")
        led = Ledger(self.ledger, Clock(), run_in_thread=syncRunner)
        led.startService()
        for ts, key, cost in [
            (NOW - 3600, "alice", 1.0),            # today
            (NOW - 3 * 86400, "alice", 2.0),       # this month, not today
            (NOW - 40 * 86400, "alice", 4.0),      # last month
            (NOW - 3600, "bob", 0.5),
            (NOW - 3600, "carol", 0.25),           # not in the key file
        ]:
            led.record(makeRecord(ts=ts, key_name=key, cost_usd=cost))
        self.successResultOf(led.stopService())

    def keys(self, **tables: Any) -> None:
        keymod.write_raw(os.path.join(self.dir, keymod.DEFAULT_FILE), tables)

    def usage(self, *argv: str, now: float = NOW) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser()
        report.add_arguments(parser)
        args = parser.parse_args(["--ledger", self.ledger, "--config", self.config, "--by", "key", *argv])
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = report.run(args, annotate=annotator(lambda: now))
        return code, out.getvalue(), err.getvalue()

    def test_json(self) -> None:
        """--json rows carry budget, period, the spend in the current period and the share used; others null."""
        self.keys(alice={"hash": HASH, "budget_usd": 10.0, "period": "month"},
                  bob={"hash": HASH.replace("ab", "cd"), "budget_usd": 2.0, "period": "day"},
                  dave={"hash": HASH.replace("ab", "ef")})
        code, out, _ = self.usage("--json")
        self.assertEqual(code, 0)
        rows = {r["key"]: r for r in json.loads(out)["rows"]}
        a, b, c = rows["alice"], rows["bob"], rows["carol"]
        self.assertEqual((a["budget_usd"], a["period"], a["period_spent_usd"], a["budget_used"]), (10.0, "month", 3.0, 0.3))
        self.assertEqual((b["budget_usd"], b["period"], b["period_spent_usd"], b["budget_used"]), (2.0, "day", 0.5, 0.25))
        self.assertEqual((c["budget_usd"], c["period"], c["period_spent_usd"], c["budget_used"]), (None, None, None, None))
        # The cost column is still the whole range's.
        self.assertEqual(a["cost_usd"], 7.0)

    def test_total_and_day(self) -> None:
        """The spend is the period's: a total budget counts every row, a day budget today's."""
        self.keys(alice={"hash": HASH, "budget_usd": 8.0, "period": "total"})
        _, out, _ = self.usage("--json")
        a = {r["key"]: r for r in json.loads(out)["rows"]}["alice"]
        self.assertEqual((a["period_spent_usd"], a["budget_used"]), (7.0, 0.875))
        _, out, _ = self.usage("--json", now=NOW + 86400)
        a = {r["key"]: r for r in json.loads(out)["rows"]}["alice"]
        self.assertEqual(a["period_spent_usd"], 7.0)

    def test_csv_and_text(self) -> None:
        """CSV has the four columns; the text table shows the share as a percentage."""
        self.keys(alice={"hash": HASH, "budget_usd": 10.0, "period": "month"})
        _, out, _ = self.usage("--csv")
        rows = list(csv.DictReader(io.StringIO(out)))
        alice = [r for r in rows if r["key"] == "alice"][0]
        carol = [r for r in rows if r["key"] == "carol"][0]
        self.assertEqual((alice["budget_usd"], alice["period"], alice["period_spent_usd"], alice["budget_used"]),
                         ("10.0", "month", "3.0", "0.3"))
        self.assertEqual(carol["budget_usd"], "")
        _, out, _ = self.usage()
        header, _, line = out.splitlines()[:3]
        self.assertEqual(header.split()[-4:], ["budget", "period", "spent_in_period", "used"])
        self.assertEqual(line.split()[-4:], ["10.000000", "month", "3.000000", "30.0%"])

    def test_no_key_file(self) -> None:
        """Without a key file the report is as before: no budget columns, no error."""
        code, out, err = self.usage("--json")
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("budget_usd", json.loads(out)["rows"][0])
        _, out, _ = self.usage("--csv")
        self.assertNotIn("budget", out.splitlines()[0])

    def test_bad_key_file(self) -> None:
        """A key file that cannot be read is said on stderr; the report still prints, without the columns."""
        with open(os.path.join(self.dir, keymod.DEFAULT_FILE), "w") as f:
            f.write("{not json")
        code, out, err = self.usage("--json")
        self.assertEqual(code, 0)
        self.assertIn("no budget columns", err)
        self.assertNotIn("budget_usd", json.loads(out)["rows"][0])

    def test_not_by_key(self) -> None:
        """Grouped by something else than the key, there are no budget columns."""
        self.keys(alice={"hash": HASH, "budget_usd": 10.0})
        _, out, _ = self.usage("--json", "--by", "model")
        self.assertNotIn("budget_usd", json.loads(out)["rows"][0])

    def test_console_script(self) -> None:
        """`llmgate usage --by key --config PATH` finds the key file beside the config and shows the budget."""
        now = time.time()
        led = Ledger(self.ledger, Clock(), run_in_thread=syncRunner)
        led.startService()
        led.record(makeRecord(ts=now - 1, key_name="erin", cost_usd=1.5))
        self.successResultOf(led.stopService())
        with open(self.config, "w") as f:
            f.write('[keys]\nfile = "team-keys.json"\n')
        keymod.write_raw(os.path.join(self.dir, "team-keys.json"), {"erin": {"hash": HASH, "budget_usd": 3.0, "period": "day"}})
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        code = cli.main(["usage", "--ledger", self.ledger, "--config", self.config, "--by", "key", "--json"])
        self.assertEqual(code, 0)
        erin = {r["key"]: r for r in json.loads(out.getvalue())["rows"]}["erin"]
        self.assertEqual((erin["budget_usd"], erin["period_spent_usd"], erin["budget_used"]), (3.0, 1.5, 0.5))

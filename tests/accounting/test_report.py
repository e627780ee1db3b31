# -*- test-case-name: tests.accounting.test_report -*-
"""
Tests for L{llmgate.accounting.report}, the C{llmgate usage} command.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sqlite3
import sys
from calendar import timegm
from typing import Any, List, Tuple

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting import report
from llmgate.accounting.ledger import Ledger
from tests.accounting.test_ledger import makeRecord, openRecord, syncRunner


def at(day: int, hour: int = 12) -> float:
    """
    Unix time of 2024-05-<day> <hour>:00 UTC.
    """
    return float(timegm((2024, 5, day, hour, 0, 0)))


class _Fixture(SynchronousTestCase):
    """
    A ledger written by the real L{Ledger}.
    """

    def setUp(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        self.path = os.path.join(d, "usage.db")
        ledger = Ledger(self.path, Clock(), run_in_thread=syncRunner)
        ledger.startService()
        A, B = "team-a", "team-b"
        for rec in [
            # team-a, gpt-4o-mini, May 1: two priced requests
            makeRecord(ts=at(1, 0), key_name=A, input_tokens=10, output_tokens=5,
                       cost_usd=0.25),
            makeRecord(ts=at(1, 23), key_name=A, input_tokens=20, output_tokens=7,
                       cached_input_tokens=4, cost_usd=0.5),
            # team-a, gpt-4o-mini, May 2: one priced, one unknown price,
            # estimated
            makeRecord(ts=at(2), key_name=A, input_tokens=1, output_tokens=1,
                       cost_usd=1.0),
            makeRecord(ts=at(2), key_name=A, input_tokens=2, output_tokens=3,
                       cost_usd=None, source="estimated"),
            # team-b, claude, May 2: unknown price only, reasoning + cache
            makeRecord(ts=at(2), key_name=B, model="claude-x", provider="anthropic",
                       route="/v1/messages", input_tokens=100, output_tokens=50,
                       cache_creation_tokens=30, cache_creation_1h_tokens=20,
                       reasoning_tokens=9, cost_usd=None),
            # team-b, claude, May 3: rejected, no tokens at all
            makeRecord(ts=at(3), key_name=B, model="claude-x", provider="anthropic",
                       route="/v1/messages", status=429, outcome="rejected",
                       input_tokens=None, output_tokens=None, source=None,
                       cost_usd=None),
        ]:
            ledger.record(rec)
        self.successResultOf(ledger.stopService())

    def run_usage(self, *argv: str, include_rejected: bool = True) -> Tuple[int, str, str]:
        # These tests sum the whole ledger, the rejected row included
        # (RejectedTests checks the default, which leaves it out).
        parser = argparse.ArgumentParser()
        report.add_arguments(parser)
        args = parser.parse_args(["--ledger", self.path, *argv] + (["--include-rejected"] if include_rejected else []))
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = report.run(args)
        return code, out.getvalue(), err.getvalue()

    def json_rows(self, *argv: str) -> List[dict[str, Any]]:
        code, out, err = self.run_usage("--json", *argv)
        self.assertEqual((code, err), (0, ""))
        rows: List[dict[str, Any]] = json.loads(out)["rows"]
        return rows


class ReportTests(_Fixture):
    """
    Sums over a ledger written by the real L{Ledger}.
    """

    def test_defaultGroupsByKeyModelDay(self) -> None:
        """
        The default grouping is key, model, day (UTC), with every sum.
        """
        rows = self.json_rows()
        self.assertEqual(
            [(r["key"], r["model"], r["day"]) for r in rows],
            [
                ("team-a", "gpt-4o-mini", "2024-05-01"),
                ("team-a", "gpt-4o-mini", "2024-05-02"),
                ("team-b", "claude-x", "2024-05-02"),
                ("team-b", "claude-x", "2024-05-03"),
            ],
        )
        self.assertEqual(
            rows[0],
            {
                "key": "team-a", "model": "gpt-4o-mini", "day": "2024-05-01",
                "requests": 2, "input_tokens": 30, "output_tokens": 12,
                "cached_input_tokens": 4, "cache_creation_tokens": 0,
                "cache_creation_1h_tokens": 0, "reasoning_tokens": 0, "cost_usd": 0.75, "unknown_cost": 0,
                "estimated": 0, "in_flight": 0, "interrupted": 0,
            },
        )

    def test_unknownCost(self) -> None:
        """
        Known costs are summed and unknown ones counted; a group with no
        known cost has cost null, never 0.
        """
        rows = self.json_rows()
        self.assertEqual((rows[1]["cost_usd"], rows[1]["unknown_cost"]), (1.0, 1))
        self.assertEqual(rows[1]["estimated"], 1)
        self.assertEqual((rows[2]["cost_usd"], rows[2]["unknown_cost"]), (None, 1))
        self.assertEqual(rows[2]["reasoning_tokens"], 9)
        self.assertEqual(rows[2]["cache_creation_tokens"], 30)
        self.assertEqual(rows[2]["cache_creation_1h_tokens"], 20)
        # A request with no token counts adds a request and nothing else.
        self.assertEqual((rows[3]["requests"], rows[3]["input_tokens"]), (1, 0))

    def test_byKey(self) -> None:
        """
        --by key collapses models and days; total sums the groups.
        """
        code, out, _ = self.run_usage("--json", "--by", "key")
        doc = json.loads(out)
        self.assertEqual(doc["by"], ["key"])
        a, b = doc["rows"]
        self.assertEqual(
            (a["key"], a["requests"], a["input_tokens"], a["cost_usd"], a["unknown_cost"]),
            ("team-a", 4, 33, 1.75, 1),
        )
        self.assertEqual(
            (b["key"], b["requests"], b["cost_usd"], b["unknown_cost"]),
            ("team-b", 2, None, 2),
        )
        t = doc["total"]
        self.assertEqual((t["requests"], t["cost_usd"], t["unknown_cost"]), (6, 1.75, 3))

    def test_byProviderRoute(self) -> None:
        """
        provider and route are groupings too.
        """
        rows = self.json_rows("--by", "provider,route")
        self.assertEqual(
            [(r["provider"], r["route"], r["requests"]) for r in rows],
            [("anthropic", "/v1/messages", 2), ("openai", "/v1/chat/completions", 4)],
        )

    def test_sinceUntil(self) -> None:
        """
        --since is inclusive, --until exclusive; a bare date is midnight UTC.
        """
        rows = self.json_rows("--by", "day", "--since", "2024-05-02", "--until", "2024-05-03")
        self.assertEqual([(r["day"], r["requests"]) for r in rows], [("2024-05-02", 3)])
        rows = self.json_rows("--by", "day", "--until", "2024-05-01T12:00:00")
        self.assertEqual([(r["day"], r["requests"]) for r in rows], [("2024-05-01", 1)])
        rows = self.json_rows("--by", "day", "--since", "2024-05-01T23:00:00+00:00")
        self.assertEqual(sum(r["requests"] for r in rows), 5)

    def test_emptyRange(self) -> None:
        """
        A range with no requests gives no rows and a zero total, cost null.
        """
        code, out, _ = self.run_usage("--json", "--since", "2030-01-01")
        doc = json.loads(out)
        self.assertEqual(doc["rows"], [])
        self.assertEqual((doc["total"]["requests"], doc["total"]["cost_usd"]), (0, None))

    def test_csv(self) -> None:
        """
        --csv prints a header and one line per group; unknown cost is empty.
        """
        code, out, _ = self.run_usage("--csv", "--by", "key")
        self.assertEqual(code, 0)
        lines = list(csv.DictReader(io.StringIO(out)))
        self.assertEqual([l["key"] for l in lines], ["team-a", "team-b"])
        self.assertEqual(lines[0]["cost_usd"], "1.75")
        self.assertEqual(lines[1]["cost_usd"], "")
        self.assertEqual(lines[1]["unknown_cost"], "2")

    def test_table(self) -> None:
        """
        The default output is an aligned table with a TOTAL line; unknown
        cost shows as "-".
        """
        code, out, _ = self.run_usage("--by", "key")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("key "))
        self.assertIn("cost_usd", lines[0])
        self.assertEqual(len({len(l) for l in lines[:1] + lines[2:]}), 1, out)
        self.assertEqual(lines[2].split()[0:2], ["team-a", "4"])
        self.assertIn("1.750000", lines[2])
        self.assertIn(" - ", lines[3])
        self.assertEqual(lines[-1].split()[0:2], ["TOTAL", "6"])

    def test_missingLedger(self) -> None:
        """
        A missing ledger file is a clear message on stderr and exit 1.
        """
        self.path = os.path.join(self.mktemp(), "nope.db")
        code, out, err = self.run_usage()
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no ledger at", err)
        self.assertIn("nope.db", err)

    def test_notADatabase(self) -> None:
        """
        A file that is not SQLite is reported, exit 1.
        """
        with open(self.path, "wb") as f:
            f.write(b"x" * 1024)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.remove(self.path + suffix)
        code, out, err = self.run_usage()
        self.assertEqual(code, 1)
        self.assertIn("cannot read", err)

    def test_badOptions(self) -> None:
        """
        Bad --by or dates are usage errors (exit 2) naming the problem.
        """
        code, _, err = self.run_usage("--by", "key,colour")
        self.assertEqual(code, 2)
        self.assertIn("--by", err)
        code, _, err = self.run_usage("--since", "last tuesday")
        self.assertEqual(code, 2)
        self.assertIn("last tuesday", err)

    def test_readsWhileWriterOpen(self) -> None:
        """
        The report reads (read-only) while a writer holds an open
        transaction, and does not see the uncommitted rows.
        """
        writer = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(writer.close)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            "UPDATE usage SET key_name = 'changed'"
        )
        rows = self.json_rows("--by", "key")
        self.assertEqual([r["key"] for r in rows], ["team-a", "team-b"])
        writer.execute("ROLLBACK")

    def test_noTableYet(self) -> None:
        """
        A ledger file the daemon created but has not written to yet is an
        empty report, not an error.
        """
        os.remove(self.path)
        sqlite3.connect(self.path).close()
        code, out, err = self.run_usage("--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["rows"], [])


class RejectedTests(_Fixture):
    """
    By default the requests the gateway refused itself are left out (and
    said to be); --include-rejected counts them.  (Inherits the fixture:
    one rejected row, team-b on May 3.)
    """

    def test_leftOutByDefault(self) -> None:
        """The default report leaves the rejected request out and says how many were."""
        code, out, err = self.run_usage("--json", "--by", "key", include_rejected=False)
        doc = json.loads(out)
        self.assertEqual([(r["key"], r["requests"]) for r in doc["rows"]], [("team-a", 4), ("team-b", 1)])
        self.assertEqual((doc["total"]["requests"], doc["rejected_left_out"]), (5, 1))
        code, out, err = self.run_usage("--by", "key", include_rejected=False)
        self.assertEqual(out.splitlines()[-2].split()[:2], ["TOTAL", "5"])
        self.assertIn("1 request the gateway refused itself not counted: --include-rejected", out.splitlines()[-1])

    def test_byOutcome(self) -> None:
        """--by outcome with --include-rejected shows the rejected group."""
        rows = self.json_rows("--by", "outcome")
        self.assertEqual([(r["outcome"], r["requests"]) for r in rows], [("completed", 5), ("rejected", 1)])

    def test_closedPipe(self) -> None:
        """
        `llmgate usage | head -1`: the reader leaves early; the command exits
        0 with nothing on stderr (no BrokenPipeError traceback).
        """
        import subprocess

        ledger = Ledger(self.path, Clock(), run_in_thread=syncRunner)
        ledger.startService()
        # Enough groups for well over a pipe buffer (64 KiB) of table.
        for i in range(3000):
            ledger.record(makeRecord(i + 100, ts=at(4), model=f"model-{i:05d}"))
        self.successResultOf(ledger.stopService())
        p = subprocess.Popen(
            [sys.executable, "-c", "import sys; from llmgate import cli; sys.exit(cli.main())",
             "usage", "--ledger", self.path, "--by", "model"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert p.stdout is not None and p.stderr is not None
        self.assertTrue(p.stdout.readline().startswith(b"model "))
        p.stdout.close()
        err = p.stderr.read()
        self.assertEqual((p.wait(30), err), (0, b""))


class ServedModelReportTests(SynchronousTestCase):
    """
    C{--by served_model}: the model the responses named, next to the one
    asked for.
    """

    def setUp(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        self.path = os.path.join(d, "usage.db")

    def run_usage(self, *argv: str) -> Tuple[int, str, str]:
        return _Fixture.run_usage(self, *argv)  # type: ignore[arg-type]

    def test_byServedModel(self) -> None:
        """
        Requests to one router model group by the model that served each;
        a request whose response named none is its own group (null).
        """
        ledger = Ledger(self.path, Clock(), run_in_thread=syncRunner)
        ledger.startService()
        for served, cost in [("gpt-4o-mini-2024-07-18", 0.25), ("gpt-4.1-2025-04-14", 1.0),
                             ("gpt-4o-mini-2024-07-18", 0.5), (None, None)]:
            ledger.record(makeRecord(ts=at(1), model="model-router", served_model=served, cost_usd=cost))
        self.successResultOf(ledger.stopService())
        code, out, err = self.run_usage("--json", "--by", "model,served_model")
        self.assertEqual((code, err), (0, ""))
        rows = json.loads(out)["rows"]
        self.assertEqual(
            [(r["model"], r["served_model"], r["requests"], r["cost_usd"]) for r in rows],
            [("model-router", None, 1, None), ("model-router", "gpt-4.1-2025-04-14", 1, 1.0),
             ("model-router", "gpt-4o-mini-2024-07-18", 2, 0.75)],
        )
        code, out, _ = self.run_usage("--by", "served_model")
        self.assertEqual(out.splitlines()[2].split()[:2], ["-", "1"])

    def test_oldLedgerFile(self) -> None:
        """
        A file written before the column existed (not migrated: no daemon
        of this version opened it) groups all its rows under null.
        """
        from tests.accounting.test_ledger import oldLedgerFile

        oldLedgerFile(self.path)
        code, out, err = self.run_usage("--json", "--by", "served_model")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([(r["served_model"], r["requests"]) for r in json.loads(out)["rows"]], [(None, 1)])

    def test_oldLedgerFileWithout1hColumn(self) -> None:
        """
        A file written before C{cache_creation_1h_tokens} existed (not
        migrated) is summed with 0 one-hour cache writes, in every format.
        """
        from tests.accounting.test_ledger import oldLedgerFile

        oldLedgerFile(self.path, drop=("served_model", "cache_creation_1h_tokens"))
        code, out, err = self.run_usage("--json", "--by", "key")
        self.assertEqual((code, err), (0, ""))
        doc = json.loads(out)
        self.assertEqual([(r["requests"], r["cache_creation_1h_tokens"]) for r in doc["rows"]], [(1, 0)])
        self.assertEqual(doc["total"]["cache_creation_1h_tokens"], 0)
        code, out, err = self.run_usage("--by", "key")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("write_1h", out.splitlines()[0])


class OpenAndInterruptedTests(SynchronousTestCase):
    """
    The report over a ledger with open, finalised and interrupted rows.
    """

    def test_countedOnceAndShown(self) -> None:
        """
        A finalised request counts once (its open row is gone); rows the
        previous run left open are shown as interrupted, with the tokens
        known then; the current run's open rows are in_flight; --by outcome
        tells them apart.
        """
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "usage.db")
        clock = Clock()
        done = makeRecord(0, ts=at(1), input_tokens=10, output_tokens=5)
        cut = openRecord(1, ts=at(1), output_tokens=30, source="estimated")
        first = Ledger(path, clock, run_in_thread=syncRunner)
        first.startService()
        first.open(openRecord(0, request_id=done.request_id, ts=at(1)))
        first.open(cut)
        clock.advance(first.batch_interval)
        first.record(done)
        self.successResultOf(first.stopService())  # cut never finished
        second = Ledger(path, clock, run_in_thread=syncRunner)
        second.startService()
        second.open(openRecord(2, ts=at(1)))
        clock.advance(second.batch_interval)

        parser = argparse.ArgumentParser()
        report.add_arguments(parser)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        code = report.run(parser.parse_args(["--ledger", path, "--json", "--by", "outcome"]))
        self.successResultOf(second.stopService())
        self.assertEqual(code, 0)
        doc = json.loads(out.getvalue())
        self.assertEqual(
            [(r["outcome"], r["requests"], r["output_tokens"], r["in_flight"], r["interrupted"]) for r in doc["rows"]],
            [("completed", 1, 5, 0, 0), ("interrupted", 1, 30, 0, 1), ("open", 1, 0, 1, 0)],
        )
        self.assertEqual(
            (doc["total"]["requests"], doc["total"]["in_flight"], doc["total"]["interrupted"]), (3, 1, 1)
        )

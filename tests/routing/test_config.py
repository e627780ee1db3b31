"""The [models] deployments/fallbacks and [routing] settings, validated in config.parse."""

from __future__ import annotations

import os
import sqlite3

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import Ledger, UsageRecord, read_records
from llmgate.config import ConfigError, Deployment, Routing
from tests.accounting.test_ledger import makeRecord, oldLedgerFile, syncRunner
from tests.fakes import make_config


class DeploymentConfigTests(SynchronousTestCase):
    def test_deployments_and_fallbacks(self) -> None:
        """deployments = [...] and fallbacks parse; the first deployment is the model's provider."""
        cfg = make_config(
            models={
                "gpt-4o": {
                    "deployments": [{"provider": "oai", "upstream_model": "x", "weight": 2}, {"provider": "oai"}],
                    "fallbacks": ["mini"],
                },
                "mini": {"provider": "oai"},
            }
        )
        m = cfg.models["gpt-4o"]
        self.assertEqual(m.deployments, (Deployment("oai", "x", 2.0), Deployment("oai", "gpt-4o", 1.0)))
        self.assertEqual((m.provider, m.upstream_model, m.fallbacks), ("oai", "x", ("mini",)))
        self.assertEqual(cfg.models["mini"].deployments, (Deployment("oai", "mini", 1.0),))
        self.assertEqual(cfg.routing, Routing())

    def test_errors_name_the_setting(self) -> None:
        """Each bad routing setting is refused with its name."""
        cases = [
            ({"m": {"deployments": []}}, {}, "models.m.deployments"),
            ({"m": {"deployments": [{"provider": "nope"}]}}, {}, "models.m.deployments[0].provider"),
            ({"m": {"deployments": [{"provider": "oai", "weight": 0}]}}, {}, "models.m.deployments[0].weight"),
            ({"m": {"deployments": [{"provider": "oai", "region": "x"}]}}, {}, "models.m.deployments[0].region"),
            ({"m": {"deployments": [{"provider": "oai"}, {"provider": "ant"}]}}, {}, "models.m.deployments"),
            ({"m": {"provider": "oai", "deployments": [{"provider": "oai"}]}}, {}, "models.m"),
            ({"m": {"provider": "oai", "fallbacks": ["ghost"]}}, {}, "models.m.fallbacks[0]"),
            ({"m": {"provider": "oai", "fallbacks": ["m"]}}, {}, "models.m.fallbacks[0]"),
            ({"m": {"provider": "oai", "fallbacks": ["c"]}, "c": {"provider": "ant"}}, {}, "models.m.fallbacks[0]"),
            ({}, {"max_attempts": 0}, "routing.max_attempts"),
            ({}, {"breaker_cooldown": -1}, "routing.breaker_cooldown"),
            ({}, {"balance": "fastest"}, "routing.balance"),
            ({}, {"hedge": True}, "routing.hedge"),
        ]
        for models, routing, where in cases:
            doc = {"models": models}
            if routing:
                doc["routing"] = routing
            with self.assertRaises(ConfigError, msg=where) as e:
                make_config(**doc)
            self.assertIn(where, str(e.exception))

    def test_routing_settings(self) -> None:
        """[routing] settings reach the config."""
        cfg = make_config(routing={"max_attempts": 4, "breaker_failures": 2, "breaker_cooldown": 5, "balance": "least_outstanding", "deadline": 9, "retry_after_cap": 7})
        self.assertEqual(cfg.routing, Routing(4, 9.0, 7.0, 2, 5.0, "least_outstanding"))


class HedgeConfigTests(SynchronousTestCase):
    def test_hedge_settings(self) -> None:
        """hedge_after (seconds or "p95") and hedge_max_fraction per model; off (None) by default; retry_after_wait in [routing]."""
        cfg = make_config(
            models={
                "a": {"provider": "oai", "hedge_after": 0.5},
                "b": {"deployments": [{"provider": "oai"}], "hedge_after": "p95", "hedge_max_fraction": 0.25},
                "c": {"provider": "oai"},
            },
            routing={"retry_after_wait": 2},
        )
        m = cfg.models
        self.assertEqual((m["a"].hedge_after, m["a"].hedge_max_fraction), (0.5, 0.1))
        self.assertEqual((m["b"].hedge_after, m["b"].hedge_max_fraction), ("p95", 0.25))
        self.assertEqual(m["c"].hedge_after, None)
        self.assertEqual(cfg.routing.retry_after_wait, 2.0)
        self.assertEqual(Routing().retry_after_wait, 5.0)
        self.assertEqual(make_config(routing={"retry_after_wait": 0}).routing.retry_after_wait, 0.0)

    def test_hedge_errors(self) -> None:
        """Bad hedging settings are refused with their names."""
        cases = [
            ({"m": {"provider": "oai", "hedge_after": 0}}, {}, "models.m.hedge_after"),
            ({"m": {"provider": "oai", "hedge_after": "p99"}}, {}, "models.m.hedge_after"),
            ({"m": {"provider": "oai", "hedge_after": True}}, {}, "models.m.hedge_after"),
            ({"m": {"provider": "oai", "hedge_after": 1, "hedge_max_fraction": 0}}, {}, "models.m.hedge_max_fraction"),
            ({"m": {"provider": "oai", "hedge_after": 1, "hedge_max_fraction": 1.5}}, {}, "models.m.hedge_max_fraction"),
            ({}, {"retry_after_wait": -1}, "routing.retry_after_wait"),
            ({}, {"retry_after_wait": "5"}, "routing.retry_after_wait"),
        ]
        for models, routing, where in cases:
            doc = {"models": models}
            if routing:
                doc["routing"] = routing
            with self.assertRaises(ConfigError, msg=where) as e:
                make_config(**doc)
            self.assertIn(where, str(e.exception))

    def test_old_file_gets_hedged_column(self) -> None:
        """A ledger file without the hedged column gets it: old rows read 0, a hedged record 1."""
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "usage.db")
        oldLedgerFile(path, drop=("hedged",))
        ledger = Ledger(path, Clock(), run_in_thread=syncRunner)
        ledger.startService()
        ledger.record(makeRecord(1, hedged=True))
        self.successResultOf(ledger.stopService())
        rows = read_records(path)
        self.assertEqual([r["hedged"] for r in rows], [0, 1])


class AttemptColumnsMigrationTests(SynchronousTestCase):
    def test_old_file_gets_attempt_columns(self) -> None:
        """A ledger file without attempt/parent_request_id gets them: old rows read attempt 1, new rows keep theirs."""
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "usage.db")
        oldLedgerFile(path, drop=("attempt", "parent_request_id"))
        ledger = Ledger(path, Clock(), run_in_thread=syncRunner)
        ledger.startService()
        ledger.record(makeRecord(1, attempt=2, parent_request_id="parent"))
        self.successResultOf(ledger.stopService())
        rows = read_records(path)
        self.assertEqual([(r["attempt"], r["parent_request_id"]) for r in rows], [(1, None), (2, "parent")])
        self.assertIsInstance(UsageRecord(**rows[1]), UsageRecord)
        conn = sqlite3.connect(path)
        self.assertIn("attempt", [r[1] for r in conn.execute("PRAGMA table_info(usage)")])
        conn.close()


class CheckConfigRoutingTests(SynchronousTestCase):
    def test_check_config_validates_routing(self) -> None:
        """llmgate check-config runs the same validation: a fallback to an unknown model is one error line."""
        from tests.test_cli import CheckConfigTests

        t = CheckConfigTests()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                '[providers.a]\nkind = "openai"\nbase_url = "http://127.0.0.1:1/v1"\n'
                '[models."gpt-4o"]\ndeployments = [{provider = "a", weight = 2}, {provider = "a", upstream_model = "y"}]\n'
                'fallbacks = ["gpt-4o-mini"]\n'
            )
        code, out, err = t.run_cli("check-config", path)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("models.gpt-4o.fallbacks[0]: no model named 'gpt-4o-mini'", err)
        with open(path, "a") as f:
            f.write('[models."gpt-4o-mini"]\nprovider = "a"\n[routing]\nmax_attempts = 2\n')
        code, out, err = t.run_cli("check-config", path)
        self.assertEqual(code, 0, err)


class ReportTests(SynchronousTestCase):
    def test_failed_attempts_are_no_requests(self) -> None:
        """llmgate usage counts a retried request once, and its failed attempt apart (not as unpriced)."""
        from llmgate.accounting import report

        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "usage.db")
        ledger = Ledger(path, Clock(), run_in_thread=syncRunner)
        ledger.startService()
        served = makeRecord(1, attempt=2, provider="b")
        failed = makeRecord(
            2, request_id=served.request_id + "-1", parent_request_id=served.request_id, provider="a",
            outcome="upstream_error", status=500, cost_usd=None, input_tokens=None, output_tokens=None,
        )
        ledger.record(served)
        ledger.record(failed)
        self.successResultOf(ledger.stopService())
        conn = sqlite3.connect(path)
        [total] = report.query(conn, [])
        by = {r["provider"]: r for r in report.query(conn, ["provider"])}
        conn.close()
        self.assertEqual((total["requests"], total["failed_attempts"], total["unknown_cost"]), (1, 1, 0))
        self.assertEqual((by["a"]["requests"], by["a"]["failed_attempts"]), (0, 1))
        self.assertEqual((by["b"]["requests"], by["b"]["failed_attempts"]), (1, 0))

    def test_hedge_loser_cost_counted(self) -> None:
        """A hedge that lost has its own priced row: its cost is in the total, it is no request and no unknown cost."""
        from llmgate.accounting import report

        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "usage.db")
        ledger = Ledger(path, Clock(), run_in_thread=syncRunner)
        ledger.startService()
        served = makeRecord(1, attempt=2, provider="b", cost_usd=0.5, hedged=True)
        lost = makeRecord(
            2, request_id=served.request_id + "-1", parent_request_id=served.request_id, provider="a",
            outcome="hedge_lost", cost_usd=0.25,
        )
        unpriced = makeRecord(3, cost_usd=None)
        for rec in (served, lost, unpriced):
            ledger.record(rec)
        self.successResultOf(ledger.stopService())
        conn = sqlite3.connect(path)
        [total] = report.query(conn, [])
        conn.close()
        self.assertEqual((total["requests"], total["failed_attempts"], total["unknown_cost"], total["cost_usd"]), (2, 1, 1, 0.75))


class StartupLineTests(SynchronousTestCase):
    def test_models_line_shows_deployments(self) -> None:
        """The start-up block names every deployment (with its weight) and the fallbacks."""
        from llmgate.ops.startup import _deployments

        cfg = make_config(
            models={
                "g": {"deployments": [{"provider": "oai", "weight": 2}, {"provider": "oai", "upstream_model": "y"}], "fallbacks": ["h"]},
                "h": {"provider": "oai"},
            }
        )
        self.assertEqual(_deployments(cfg.models["g"]), "oai/g*2 | oai/y (fallbacks h)")
        self.assertEqual(_deployments(cfg.models["h"]), "oai/h")

    def test_models_line_shows_tags(self) -> None:
        """Each deployment's tags follow it in the start-up block."""
        from llmgate.ops.startup import _deployments

        cfg = make_config(
            models={
                "g": {"deployments": [{"provider": "oai", "weight": 2, "tags": ["eu", "cheap"]}, {"provider": "oai", "upstream_model": "y"}]},
                "h": {"provider": "oai", "tags": ["us"]},
            }
        )
        self.assertEqual(_deployments(cfg.models["g"]), "oai/g*2[eu,cheap] | oai/y")
        self.assertEqual(_deployments(cfg.models["h"]), "oai/h[us]")


class BalanceConfigTests(SynchronousTestCase):
    """[routing] balance = "latency", the failure-ratio breaker keys and deployment tags."""

    def test_new_settings_parse(self) -> None:
        """balance = "latency", the ratio keys and tags (deployment and single form) reach the config."""
        cfg = make_config(
            models={
                "m": {"deployments": [{"provider": "oai", "tags": ["eu", "cheap"]}, {"provider": "oai", "upstream_model": "u"}]},
                "one": {"provider": "oai", "tags": ["us"]},
            },
            routing={"balance": "latency", "breaker_failure_ratio": 0.3, "breaker_window": 12, "breaker_min_requests": 5},
        )
        r = cfg.routing
        self.assertEqual((r.balance, r.breaker_failure_ratio, r.breaker_window, r.breaker_min_requests), ("latency", 0.3, 12.0, 5))
        self.assertEqual([d.tags for d in cfg.models["m"].deployments], [("eu", "cheap"), ()])
        self.assertEqual(cfg.models["one"].deployments[0].tags, ("us",))
        d = Routing()
        self.assertEqual((d.breaker_failure_ratio, d.breaker_window, d.breaker_min_requests), (0.5, 30.0, 20))

    def test_errors_name_the_setting(self) -> None:
        """Each bad new setting is refused with its name and what is expected."""
        cases = [
            ({}, {"breaker_failure_ratio": 0}, "routing.breaker_failure_ratio: must be a fraction"),
            ({}, {"breaker_failure_ratio": 1.5}, "routing.breaker_failure_ratio: must be a fraction"),
            ({}, {"breaker_failure_ratio": "half"}, "routing.breaker_failure_ratio: expected"),
            ({}, {"breaker_window": 0}, "routing.breaker_window: must be greater than 0"),
            ({}, {"breaker_min_requests": 0}, "routing.breaker_min_requests: must be an integer >= 1"),
            ({}, {"breaker_min_requests": 2.5}, "routing.breaker_min_requests: must be an integer >= 1"),
            ({}, {"balance": "fastest"}, "routing.balance: expected one of 'weighted', 'least_outstanding', 'latency'"),
            ({"m": {"deployments": [{"provider": "oai", "tags": "eu"}]}}, {}, "models.m.deployments[0].tags: expected list"),
            ({"m": {"deployments": [{"provider": "oai", "tags": ["e u"]}]}}, {}, "models.m.deployments[0].tags[0]: 'e u' is not a tag"),
            ({"m": {"deployments": [{"provider": "oai", "tags": [""]}]}}, {}, "models.m.deployments[0].tags[0]"),
            ({"m": {"deployments": [{"provider": "oai", "tags": ["x" * 33]}]}}, {}, "is not a tag"),
            ({"m": {"deployments": [{"provider": "oai", "tags": ["eu", "eu"]}]}}, {}, "models.m.deployments[0].tags: a tag is listed twice"),
            ({"m": {"deployments": [{"provider": "oai", "tags": [str(i) for i in range(17)]}]}}, {}, "at most 16 tags"),
            ({"m": {"provider": "oai", "tags": [1]}}, {}, "models.m.tags[0]: expected str"),
            ({"m": {"tags": ["eu"], "deployments": [{"provider": "oai"}]}}, {}, "models.m: set provider/upstream_model/tags or deployments"),
        ]
        for models, routing, message in cases:
            doc: dict = {"models": models}
            if routing:
                doc["routing"] = routing
            with self.assertRaises(ConfigError, msg=message) as e:
                make_config(**doc)
            self.assertIn(message, str(e.exception))

    def test_check_config(self) -> None:
        """llmgate check-config refuses a bad new key with one line naming it, and accepts the good ones."""
        from tests.test_cli import CheckConfigTests

        t = CheckConfigTests()
        path = self.mktemp()
        base = (
            '[providers.a]\nkind = "openai"\nbase_url = "http://127.0.0.1:1/v1"\n'
            '[models."gpt-4o"]\ndeployments = [{provider = "a", tags = ["eu", "cheap"]}, {provider = "a", upstream_model = "y", tags = ["us"]}]\n'
        )
        for bad, message in [
            ('[routing]\nbalance = "latency"\nbreaker_failure_ratio = 2\n', "routing.breaker_failure_ratio: must be a fraction"),
            ('[routing]\nbreaker_window = -3\n', "routing.breaker_window: must be greater than 0"),
            ('[routing]\nbreaker_min_requests = 0\n', "routing.breaker_min_requests: must be an integer >= 1"),
            ('[routing]\nbalance = "p2c"\n', "routing.balance: expected one of"),
            ('[models.other]\nprovider = "a"\ntags = ["no/slash"]\n', "models.other.tags[0]: 'no/slash' is not a tag"),
        ]:
            with open(path, "w") as f:
                f.write(base + bad)
            code, out, err = t.run_cli("check-config", path)
            self.assertEqual((code, out), (1, ""), bad)
            self.assertIn(message, err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
        with open(path, "w") as f:
            f.write(base + '[routing]\nbalance = "latency"\nbreaker_failure_ratio = 0.4\nbreaker_window = 20\nbreaker_min_requests = 10\n')
        code, out, err = t.run_cli("check-config", path)
        self.assertEqual(code, 0, err)

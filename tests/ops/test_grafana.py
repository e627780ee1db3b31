"""docs/grafana-llmgate.json: importable, and built on metrics llmgate exports."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops.deployments import DeploymentGauges
from llmgate.ops.gcstats import GCPauses
from llmgate.ops.metrics import Metrics
from llmgate.routing.breaker import Breakers
from tests.ops.test_status import REC

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "grafana-llmgate.json")
# The series a family of each type exposes (prometheus_client's naming).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "gauge": ("",)}
_NAME = re.compile(r"\bllmgate_[a-z0-9_]+")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


class _Pool:
    name, jobs, bytes, rejected = "llmgate-parse", 0, 0, 0


class _Ledger:
    write_failures = dropped = 0

    def pending_count(self) -> int:
        return 0


class _Exchange:
    started, headers_at, first_byte_at, first_write_at = 1.0, 1.1, 1.2, 1.21
    added_max, added_sum, added_n = 0.003, 0.004, 2


def exported() -> dict[str, set[str]]:
    """Every series name a gateway's registry (built as llmgate.tap does) exports, with its label names."""
    metrics = Metrics(keys=["alice"])
    metrics.registry.register(GCPauses())
    metrics.rejected("alice", "budget")
    metrics.budget_left("alice", 1.0)
    metrics.watch_executor(_Pool())
    metrics.watch_ledger(_Ledger())
    # Records of each kind make every labelled child exist, so its labels show.
    ex = _Exchange()
    metrics.observe(replace(REC, cost_usd=0.01, cached_input_tokens=1, reasoning_tokens=1), ex)
    metrics.observe(replace(REC, outcome="client_cancelled", phase="body"), ex)
    metrics.observe(replace(REC, outcome="upstream_error", phase="headers", status=502), ex)
    metrics.attempt("a", "retry")
    metrics.hedge("gpt-4o-mini", "won")
    # The per-deployment gauges share the registry (as llmgate.tap builds it).
    breakers = Breakers(Clock())
    breakers.observe_ttft(("a", "m"), 0.1)
    DeploymentGauges(metrics.registry, breakers, lambda: [("a", "m")]).update()
    out: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        labels = {k for s in family.samples for k in s.labels}
        for suffix in SUFFIXES[family.type]:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def queries(panels: list[dict[str, Any]]) -> list[str]:
    out = []
    for p in panels:
        out += [t["expr"] for t in p.get("targets", [])]
        out += queries(p.get("panels", []))
    return out


class DashboardTests(SynchronousTestCase):
    def setUp(self) -> None:
        with open(DASHBOARD) as f:
            self.dash = json.load(f)

    def test_importable(self) -> None:
        """The dashboard is JSON Grafana imports: schema version, a DS_PROMETHEUS input every panel uses."""
        self.assertIsInstance(self.dash["schemaVersion"], int)
        self.assertEqual([i["name"] for i in self.dash["__inputs"]], ["DS_PROMETHEUS"])
        self.assertEqual(self.dash["__inputs"][0]["pluginId"], "prometheus")
        panels = [p for p in self.dash["panels"] if p["type"] != "row"]
        self.assertGreater(len(panels), 8)
        for p in panels:
            self.assertEqual(p["datasource"]["uid"], "${DS_PROMETHEUS}", p["title"])
            self.assertTrue(p["targets"], p["title"])
        ids = [p["id"] for p in self.dash["panels"]]
        self.assertEqual(len(ids), len(set(ids)))

    def test_every_metric_exists(self) -> None:
        """Every llmgate_* name in a query is a series the registry exports, and every label it groups or filters by exists on it."""
        names = exported()
        used = set()
        for expr in queries(self.dash["panels"]):
            found = _NAME.findall(expr)
            self.assertTrue(found, expr)
            for name in found:
                self.assertIn(name, names, f"{name} in {expr!r} is not exported")
                used.add(name)
            labels = set().union(*(names[n] for n in found))
            grouped = {lbl.strip() for g in _BY.findall(expr) for lbl in g.split(",") if lbl.strip()}
            filtered = set(_MATCHER.findall("".join(re.findall(r"\{([^}]*)\}", expr))))
            self.assertLessEqual(grouped | filtered, labels, expr)
        # Each kind of figure has a panel: traffic, tokens, spend, TTFT, ledger, pools, GC.
        for family in ("llmgate_requests_total", "llmgate_tokens_total", "llmgate_cost_usd_total",
                       "llmgate_ttft_seconds_bucket", "llmgate_gateway_added_first_byte_seconds_bucket",
                       "llmgate_gateway_added_chunk_max_seconds_bucket",
                       "llmgate_upstream_headers_seconds_bucket", "llmgate_request_duration_seconds_bucket",
                       "llmgate_upstream_errors_total", "llmgate_cancellations_total",
                       "llmgate_active_requests", "llmgate_ledger_pending", "llmgate_ledger_write_failures_total",
                       "llmgate_executor_jobs", "llmgate_gc_pause_seconds_bucket",
                       "llmgate_upstream_attempts_total", "llmgate_hedges_total",
                       "llmgate_deployment_breaker_state", "llmgate_deployment_ttft_ewma_seconds"):
            self.assertIn(family, used)

    def test_checker_catches_unknown_names(self) -> None:
        """The check is not vacuous: a misspelt metric or label is not in the exported set."""
        names = exported()
        self.assertNotIn("llmgate_request_total", names)
        self.assertNotIn("llmgate_ttft_seconds", names)
        self.assertNotIn("key", names["llmgate_ttft_seconds_bucket"])
        self.assertIn("key", names["llmgate_cost_usd_total"])

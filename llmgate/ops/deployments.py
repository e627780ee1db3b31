# -*- test-case-name: tests.ops.test_deployments -*-
"""
Per-deployment state in C{/metrics}: requests in flight, breaker state,
TTFT EWMA and error ratio of each configured deployment, read from the
routing's L{Breakers <llmgate.routing.breaker.Breakers>} when metrics are
scraped (one process) or every second (a worker under C{--workers N},
whose gauges live in files the supervisor reads: a gauge's value must be
written, it cannot be computed at scrape time).

Labels are C{provider} and C{upstream_model} of the deployments the
config names, never a client-chosen model name a default provider
serves: the label set is bounded by the config. A deployment a reload
removed loses its series (in multiprocess mode, where prometheus_client
cannot remove a series, its values go to 0).

Under C{--workers N} each worker balances on its own observations, so
these are per-process views, aggregated by the supervisor as:

  - C{llmgate_deployment_outstanding}: C{livesum}. Requests in flight add
    up across workers: the sum is the deployment's true load from this
    gateway.
  - C{llmgate_deployment_breaker_state}: C{liveall} (one series per
    worker, with a C{pid} label). Each worker has its own breaker; a sum
    of states means nothing and a max would rank half-open (2) above open
    (1), so every worker's state is shown.
  - C{llmgate_deployment_ttft_ewma_seconds} and
    C{llmgate_deployment_error_ratio}: C{livemax}. Workers see the same
    deployment through similar traffic, so their views are close; the
    worst one is what an alert on a slow or failing deployment should see.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Gauge

from llmgate.ops.periodic import Periodic

Key = tuple[str, str]


def _multiprocess() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


class DeploymentGauges:
    """
    @param registry: the registry of L{llmgate.ops.metrics.Metrics}.
    @param breakers: the routing's breakers (C{outstanding}, C{state},
        C{ttft_ewma}, C{error_ratio} by deployment key).
    @param deployments: returns the configured deployments' keys now
        (after a reload, the new config's).
    """

    def __init__(self, registry: CollectorRegistry, breakers: Any, deployments: Callable[[], Iterable[Key]]) -> None:
        labels = ["provider", "upstream_model"]
        self.outstanding = Gauge(
            "llmgate_deployment_outstanding", "Requests in flight to a deployment.",
            labels, registry=registry, multiprocess_mode="livesum",
        )
        self.breaker_state = Gauge(
            "llmgate_deployment_breaker_state", "A deployment's circuit breaker: 0 closed, 1 open, 2 half-open.",
            labels, registry=registry, multiprocess_mode="liveall",
        )
        self.ttft = Gauge(
            "llmgate_deployment_ttft_ewma_seconds",
            "EWMA of a deployment's time to first byte (served attempts; absent until the first).",
            labels, registry=registry, multiprocess_mode="livemax",
        )
        self.error_ratio = Gauge(
            "llmgate_deployment_error_ratio",
            "Failed attempts over attempts to a deployment in the breaker window.",
            labels, registry=registry, multiprocess_mode="livemax",
        )
        self._gauges = (self.outstanding, self.breaker_state, self.ttft, self.error_ratio)
        self._breakers = breakers
        self._deployments = deployments
        self._shown: set[Key] = set()
        self._timed: set[Key] = set()

    def update(self) -> None:
        """Set every configured deployment's gauges from the breakers now."""
        b = self._breakers
        keys = set(self._deployments())
        for k in keys:
            self.outstanding.labels(*k).set(b.outstanding(k))
            self.breaker_state.labels(*k).set(b.state(k))
            self.error_ratio.labels(*k).set(b.error_ratio(k))
            ewma = b.ttft_ewma(k)
            if ewma is not None:
                self.ttft.labels(*k).set(ewma)
                self._timed.add(k)
        for k in self._shown - keys:
            self._forget(k)
        self._shown = keys

    def _forget(self, k: Key) -> None:
        if _multiprocess():
            for g in (self.outstanding, self.breaker_state, self.error_ratio):
                g.labels(*k).set(0)
            return
        for g in self._gauges:
            if g is not self.ttft or k in self._timed:
                g.remove(*k)
        self._timed.discard(k)


class DeploymentGaugesLoop(Periodic):
    """A worker's L{DeploymentGauges.update} every C{interval} seconds."""

    def __init__(self, gauges: DeploymentGauges, clock: Any, interval: float = 1.0) -> None:
        super().__init__(clock, interval, gauges.update, now=True)

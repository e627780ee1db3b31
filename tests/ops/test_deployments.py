"""Per-deployment gauges in /metrics (llmgate.ops.deployments), after traffic through the in-memory gateway."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from llmgate.ops.deployments import DeploymentGauges, DeploymentGaugesLoop
from llmgate.ops.metrics import Metrics, MetricsResource
from llmgate.routing.balance import configured_keys
from tests.fakes import FakeResponse, SSE_HEADERS, parse_response
from tests.ops.test_metrics import samples
from tests.routing.helpers import CHAT, DONE, E1, USAGE, FixedRng, routed_gateway

A = (("provider", "a"), ("upstream_model", "gpt-4o-a"))
B = (("provider", "b"), ("upstream_model", "gpt-4o-b"))
SMALL = (("provider", "b"), ("upstream_model", "small-b"))


def scrape(resource: MetricsResource) -> dict:  # type: ignore[type-arg]
    """GET /metrics through a Site on memory transports: the parsed samples."""
    site = Site(resource, reactor=MemoryReactorClock())
    channel = site.buildProtocol(None)
    t = StringTransport()
    channel.makeConnection(t)
    channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    status, _, body, _ = parse_response(t.value())
    assert status == 200, status
    return samples(body.decode())


class DeploymentMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = routed_gateway(routing={"breaker_failures": 2, "breaker_cooldown": 30})
        self.metrics = Metrics()
        res = self.gw.resource
        self.gauges = DeploymentGauges(self.metrics.registry, res.breakers, lambda: configured_keys(res.config))
        self.resource = MetricsResource(self.metrics.registry, before=self.gauges.update)

    def test_metrics_after_traffic(self) -> None:
        """
        After a stream on a (TTFT 0.2 s) still open, and two connect
        failures on small's b: a has 1 in flight and its EWMA, small-b's
        breaker is open with error ratio 1; once a's stream ends, 0 in flight.
        """
        gw = self.gw
        gw.resource.rng = FixedRng(0.1)
        gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(0.2)
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        r.send(E1)
        gw.clock.advance(0)
        for _ in range(2):
            gw.post("/v1/chat/completions", {**CHAT, "model": "small"})
            gw.http.calls[-1]["deferred"].errback(Failure(ConnectionRefusedError()))
            gw.clock.advance(0)
        got = scrape(self.resource)
        self.assertEqual(got[("llmgate_deployment_outstanding", A)], 1)
        self.assertEqual(got[("llmgate_deployment_outstanding", B)], 0)
        self.assertEqual(got[("llmgate_deployment_breaker_state", SMALL)], 1)
        self.assertEqual(got[("llmgate_deployment_breaker_state", A)], 0)
        self.assertEqual(got[("llmgate_deployment_error_ratio", SMALL)], 1.0)
        self.assertEqual(got[("llmgate_deployment_error_ratio", A)], 0.0)
        # No served attempt has ended yet: no EWMA series.
        self.assertNotIn(("llmgate_deployment_ttft_ewma_seconds", A), got)
        r.send(USAGE + DONE)
        r.end()
        gw.clock.advance(0)
        got = scrape(self.resource)
        self.assertEqual(got[("llmgate_deployment_outstanding", A)], 0)
        self.assertAlmostEqual(got[("llmgate_deployment_ttft_ewma_seconds", A)], 0.2)
        self.assertNotIn(("llmgate_deployment_ttft_ewma_seconds", B), got)
        # Half-open after the cool-down.
        gw.clock.advance(30)
        self.assertEqual(scrape(self.resource)[("llmgate_deployment_breaker_state", SMALL)], 2)

    def test_labels_bounded_to_configured(self) -> None:
        """A model name only a default provider serves is tracked by the breakers but never a label; a reload drops removed deployments' series."""
        from tests.fakes import Gateway, make_config

        gw = Gateway(make_config())
        res = gw.resource
        metrics = Metrics()
        gauges = DeploymentGauges(metrics.registry, res.breakers, lambda: configured_keys(res.config))
        resource = MetricsResource(metrics.registry, before=gauges.update)
        gw.post("/v1/chat/completions", {**CHAT, "model": "client-chosen-name"})
        gw.clock.advance(0)
        self.assertEqual(res.breakers.outstanding(("oai", "client-chosen-name")), 1)
        got = scrape(resource)
        names = {dict(labels).get("upstream_model") for (name, labels) in got if name.startswith("llmgate_deployment_")}
        self.assertEqual(names, {"real-model"})
        res.reconfigure(make_config(models={"other": {"provider": "oai", "upstream_model": "new-model"}}))
        got = scrape(resource)
        names = {dict(labels).get("upstream_model") for (name, labels) in got if name.startswith("llmgate_deployment_")}
        self.assertEqual(names, {"new-model"})


class WorkerDeploymentMetricsTests(SynchronousTestCase):
    """Under --workers: gauges pushed on a timer, summed / kept per worker / maxed by the supervisor."""

    def test_loop_pushes(self) -> None:
        """The worker's loop sets the gauges every second and stops with its service."""
        clock = Clock()
        gw = routed_gateway()
        metrics = Metrics()
        gauges = DeploymentGauges(metrics.registry, gw.resource.breakers, lambda: configured_keys(gw.resource.config))
        svc = DeploymentGaugesLoop(gauges, clock)
        svc.startService()
        gw.resource.breakers.taken(("a", "gpt-4o-a"))
        self.assertEqual(gauges.outstanding.labels("a", "gpt-4o-a")._value.get(), 0)
        clock.advance(1)
        self.assertEqual(gauges.outstanding.labels("a", "gpt-4o-a")._value.get(), 1)
        svc.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_multiprocess_modes(self) -> None:
        """Two workers: outstanding adds up, breaker state is one series per pid, TTFT EWMA and error ratio show the worst."""
        from prometheus_client import CollectorRegistry, values
        from prometheus_client.multiprocess import MultiProcessCollector

        path = self.mktemp()
        os.makedirs(path)
        self.patch(os, "environ", dict(os.environ, PROMETHEUS_MULTIPROC_DIR=path))

        class FakeBreakers:
            def __init__(self, out: int, state: int, ewma: float, ratio: float) -> None:
                self.out, self.st, self.ewma, self.ratio = out, state, ewma, ratio

            def outstanding(self, k):  # type: ignore[no-untyped-def]
                return self.out

            def state(self, k):  # type: ignore[no-untyped-def]
                return self.st

            def ttft_ewma(self, k):  # type: ignore[no-untyped-def]
                return self.ewma

            def error_ratio(self, k):  # type: ignore[no-untyped-def]
                return self.ratio

        for pid, br in ((2001, FakeBreakers(2, 0, 0.3, 0.1)), (2002, FakeBreakers(3, 1, 0.5, 0.05))):
            self.patch(values, "ValueClass", values.MultiProcessValue(lambda pid=pid: pid))
            DeploymentGauges(Metrics().registry, br, lambda: [("a", "m")]).update()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        got = {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in registry.collect() for s in fam.samples}
        L = (("provider", "a"), ("upstream_model", "m"))
        self.assertEqual(got[("llmgate_deployment_outstanding", L)], 5)
        self.assertEqual(got[("llmgate_deployment_breaker_state", (("pid", "2001"), *L))], 0)
        self.assertEqual(got[("llmgate_deployment_breaker_state", (("pid", "2002"), *L))], 1)
        self.assertEqual(got[("llmgate_deployment_ttft_ewma_seconds", L)], 0.5)
        self.assertEqual(got[("llmgate_deployment_error_ratio", L)], 0.1)

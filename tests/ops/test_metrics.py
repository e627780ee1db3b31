"""Prometheus metrics: updated per finished request, served on demand."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.recorder import Accounting
from llmgate.ops.metrics import Metrics, MetricsResource
from tests.fakes import SSE_HEADERS, FakeResponse, Gateway, parse_response


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class MetricsTests(SynchronousTestCase):
    def test_request_and_tokens_counted(self) -> None:
        """
        A finished stream counts one request by route/status/outcome and its
        tokens by bucket; the active gauge goes up and back down; the
        provider key appears nowhere.
        """
        gw = Gateway()
        metrics = Metrics()
        gw.resource.accounting = Accounting(gw.clock, metrics=metrics)
        gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True})
        self.assertEqual(metrics.active._value.get(), 1)
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}\n\ndata: [DONE]\n\n')
        r.end()
        self.assertEqual(metrics.active._value.get(), 0)
        site = Gateway().site
        site.resource = MetricsResource(metrics.registry)
        channel = site.buildProtocol(None)
        from twisted.internet.testing import StringTransport

        t = StringTransport()
        channel.makeConnection(t)
        channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        body = parse_response(t.value())[2].decode()
        got = samples(body)
        self.assertEqual(
            got[("llmgate_requests_total", (("key", "anonymous"), ("outcome", "completed"), ("provider", "oai"), ("route", "/v1/chat/completions"), ("status", "200")))], 1
        )
        self.assertEqual(
            got[("llmgate_tokens_total", (("bucket", "output"), ("key", "anonymous"), ("model", "gpt-4o"), ("provider", "oai"), ("source", "reported")))], 7
        )
        self.assertNotIn("sk-upstream", body)

    def test_model_labels_are_bounded(self) -> None:
        """Client-chosen model names cannot grow the registry without bound."""
        from llmgate.ops import metrics as m

        class Rec:
            route, status, outcome, ttft_ms, source, cost_usd, provider = "/v1/x", 200, "completed", None, "reported", None, "p"
            key_name, streamed, phase = "k", False, None
            input_tokens, output_tokens, cached_input_tokens, cache_creation_tokens, reasoning_tokens = 1, 1, 0, 0, 0

        metrics = Metrics()
        for i in range(m.MAX_MODELS + 50):
            rec = Rec()
            rec.model = f"model-{i}"  # type: ignore[attr-defined]
            metrics.observe(rec)
        models = {s.labels["model"] for fam in metrics.registry.collect() for s in fam.samples if "model" in s.labels}
        self.assertEqual(len(models), m.MAX_MODELS + 1)
        self.assertIn("other", models)

    def test_unknown_routes_share_one_label(self) -> None:
        """Client-chosen paths cannot grow the registry: they count as "other"."""
        gw = Gateway()
        metrics = Metrics()
        gw.resource.accounting = Accounting(gw.clock, metrics=metrics)
        for i in range(20):
            gw.post(f"/v1/nothing-{i}", {"model": "m"})
        routes = {s.labels["route"] for fam in metrics.registry.collect() for s in fam.samples if "route" in s.labels}
        self.assertEqual(routes, {"other"})


class ModelLabelTests(SynchronousTestCase):
    def observe(self, metrics: Metrics, model: str, status: int) -> None:
        class Rec:
            route, outcome, ttft_ms, source, cost_usd, provider = "/v1/chat/completions", "client_cancelled", None, "estimated", 0.5, "p"
            key_name, streamed, phase = "k", False, "body"
            input_tokens, output_tokens, cached_input_tokens, cache_creation_tokens, reasoning_tokens = 3, 1, 0, 0, 0

        rec = Rec()
        rec.model, rec.status = model, status  # type: ignore[attr-defined]
        metrics.observe(rec)

    def models(self, metrics: Metrics) -> set[str]:
        return {s.labels["model"] for fam in metrics.registry.collect() for s in fam.samples if "model" in s.labels}

    def test_junk_names_are_other(self) -> None:
        """
        A name nobody configured and no upstream accepted (here: tokens
        estimated for a cancelled or refused request) is labelled "other".
        """
        metrics = Metrics(models=["public-model"])
        self.observe(metrics, "x" * 10_000, 0)
        self.observe(metrics, "junk-1", 404)
        self.assertEqual(self.models(metrics), {"other"})

    def test_configured_and_accepted_names_are_kept(self) -> None:
        """Configured names are labels whatever the status; others once an upstream answered 200."""
        metrics = Metrics(models=["public-model"])
        self.observe(metrics, "public-model", 0)
        self.observe(metrics, "gpt-4o", 200)
        self.observe(metrics, "gpt-4o", 0)
        self.assertEqual(self.models(metrics), {"public-model", "gpt-4o"})

    def test_executor_gauges(self) -> None:
        """A watched executor's queue is reported by pool name."""
        from tests.ops.test_executors import make

        ex, _ = make(max_jobs=1)
        metrics = Metrics()
        metrics.watch_executor(ex)
        ex.submit(lambda: 1, size=10)
        self.failureResultOf(ex.submit(lambda: 2))
        got = {(s.name, s.labels.get("pool")): s.value for fam in metrics.registry.collect() for s in fam.samples}
        self.assertEqual(got[("llmgate_executor_jobs", "test")], 1)
        self.assertEqual(got[("llmgate_executor_bytes", "test")], 10)
        self.assertEqual(got[("llmgate_executor_rejected", "test")], 1)


class MultiprocessTests(SynchronousTestCase):
    """
    Under C{--workers} each worker writes its metrics to files in a shared
    directory and the supervisor serves the sum.
    """

    def worker_metrics(self, path: str, pid: int) -> Metrics:
        """A worker process's L{Metrics}: multiprocess values as pid C{pid}."""
        import os

        from prometheus_client import values

        self.patch(os, "environ", dict(os.environ, PROMETHEUS_MULTIPROC_DIR=path))
        self.patch(values, "ValueClass", values.MultiProcessValue(lambda: pid))
        return Metrics()

    def record(self, **kw: object) -> object:
        class Rec:
            route, status, outcome, ttft_ms, source, cost_usd, provider = (
                "/v1/chat/completions", 200, "completed", 5.0, "reported", 0.5, "p")
            model, key_name, streamed, phase = "m", "k", True, None
            input_tokens, output_tokens, cached_input_tokens, cache_creation_tokens, reasoning_tokens = 3, 4, 0, 0, 0

        rec = Rec()
        for k, v in kw.items():
            setattr(rec, k, v)
        return rec

    def test_supervisor_serves_the_sum(self) -> None:
        """
        Two workers' counters, histograms and live gauges add up in the
        supervisor's C{/metrics}; a dead worker's counters stay in the sum
        but its live gauges go once it is marked dead.
        """
        import os

        from prometheus_client.multiprocess import mark_process_dead
        from twisted.internet import defer
        from twisted.internet.testing import StringTransport
        from twisted.web.server import Site

        from llmgate.ops.metrics import AggregateMetricsResource

        path = self.mktemp()
        os.makedirs(path)
        a = self.worker_metrics(path, 1001)
        b = self.worker_metrics(path, 1002)
        a.observe(self.record())
        b.observe(self.record())
        b.observe(self.record(status=502, outcome="upstream_error"))
        a.active.inc(2)
        b.active.inc(1)
        a.ledger_dropped.inc(3)

        def scrape() -> dict:  # type: ignore[type-arg]
            calls: list[tuple[object, ...]] = []

            def in_thread(f, *args):  # type: ignore[no-untyped-def]
                calls.append(args)
                return defer.maybeDeferred(f, *args)

            from twisted.internet.testing import MemoryReactorClock

            site = Site(AggregateMetricsResource(lambda: path, in_thread), reactor=MemoryReactorClock())
            channel = site.buildProtocol(None)
            t = StringTransport()
            channel.makeConnection(t)
            channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            self.assertEqual(calls, [(path,)])
            return samples(parse_response(t.value())[2].decode())

        got = scrape()
        ok = ("llmgate_requests_total", (("key", "other"), ("outcome", "completed"), ("provider", "p"), ("route", "/v1/chat/completions"), ("status", "200")))
        self.assertEqual(got[ok], 2)
        self.assertEqual(got[("llmgate_tokens_total", (("bucket", "output"), ("key", "other"), ("model", "m"), ("provider", "p"), ("source", "reported")))], 12)
        self.assertEqual(got[("llmgate_ttft_seconds_count", (("route", "/v1/chat/completions"),))], 3)
        self.assertEqual(got[("llmgate_active_requests", ())], 3)
        self.assertEqual(got[("llmgate_ledger_dropped_total", ())], 3)
        mark_process_dead(1001, path)
        got = scrape()
        self.assertEqual(got[ok], 2)
        self.assertEqual(got[("llmgate_active_requests", ())], 1)

    def test_worker_updates_not_batched(self) -> None:
        """
        A worker's updates reach its multiprocess files (the supervisor's
        sum) at once even when the gateway asks for batching: a SIGKILLed
        worker must lose no count.
        """
        import os

        from twisted.internet.testing import MemoryReactorClock

        from llmgate.ops.metrics import render_multiprocess

        path = self.mktemp()
        os.makedirs(path)
        clock = MemoryReactorClock()
        w = self.worker_metrics(path, 1003)
        w.batch(clock)
        for _ in range(4):
            w.observe(self.record())
        w.attempt("p", "first")
        got = samples(render_multiprocess(path).decode())
        ok = ("llmgate_requests_total", (("key", "other"), ("outcome", "completed"), ("provider", "p"), ("route", "/v1/chat/completions"), ("status", "200")))
        self.assertEqual(got[ok], 4)
        self.assertEqual(got[("llmgate_ttft_seconds_count", (("route", "/v1/chat/completions"),))], 4)
        self.assertEqual(got[("llmgate_upstream_attempts_total", (("provider", "p"), ("reason", "first")))], 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_worker_pushes_ledger_gauges(self) -> None:
        """
        A gauge's function is never called under multiprocess mode, so a
        worker copies the ledger's state into the gauges on a timer.
        """
        from twisted.internet.task import Clock

        class FakeLedger:
            write_failures, dropped = 0, 0
            pending = 0

            def pending_count(self) -> int:
                return self.pending

        clock = Clock()
        ledger = FakeLedger()
        metrics = Metrics()
        svc = metrics.push_ledger(ledger, clock, interval=1.0)
        svc.startService()
        ledger.pending, ledger.write_failures, ledger.dropped = 7, 2, 1
        self.assertEqual(metrics.ledger_pending._value.get(), 0)
        clock.advance(1.0)
        got = (metrics.ledger_pending._value.get(), metrics.ledger_failures._value.get(), metrics.ledger_dropped._value.get())
        self.assertEqual(got, (7, 2, 1))
        svc.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class OperatorMetricsTests(SynchronousTestCase):
    """Key and provider labels, latency histograms, cancellations, upstream errors, ledger counters."""

    def gateway(self, keys: tuple[str, ...] = ()) -> tuple[Gateway, Metrics]:
        gw = Gateway()
        metrics = Metrics(keys=keys)
        gw.resource.accounting = Accounting(gw.clock, metrics=metrics)
        return gw, metrics

    def got(self, metrics: Metrics) -> dict:  # type: ignore[type-arg]
        out = {}
        for fam in metrics.registry.collect():
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def test_key_labels_bounded(self) -> None:
        """Configured key names are labels; a missing name is "none", an unconfigured one "other"."""
        metrics = Metrics(keys=["team-a"])
        self.assertEqual(
            [metrics._key(n) for n in ("team-a", "anonymous", "", "sk-looks-like-a-secret")],
            ["team-a", "anonymous", "none", "other"],
        )

    def test_stream_timings(self) -> None:
        """
        A relayed stream observes its total duration, the upstream's time to
        headers, TTFT and the latency the gateway added to the first bytes
        (the coalescer holds them to the end of the reactor turn).
        """
        gw, metrics = self.gateway()
        gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True})
        gw.clock.advance(0.25)
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        gw.clock.advance(0.5)
        r.send(b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
        gw.clock.advance(0.002)  # the turn ends 2 ms later
        r.send(b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\ndata: [DONE]\n\n')
        r.end()
        gw.clock.advance(0)
        got = self.got(metrics)
        route = ("route", "/v1/chat/completions")
        self.assertEqual(got[("llmgate_upstream_headers_seconds_sum", (("provider", "oai"),))], 0.25)
        self.assertEqual(got[("llmgate_ttft_seconds_sum", (route,))], 0.75)
        self.assertAlmostEqual(got[("llmgate_gateway_added_first_byte_seconds_sum", (route,))], 0.002)
        self.assertAlmostEqual(got[("llmgate_request_duration_seconds_sum", (("provider", "oai"), route))], 0.752)

    def test_later_chunk_added_latency(self) -> None:
        """
        Later chunks (after the first write) observe, once per stream, the
        worst and the mean time from the read that started the chunk to the
        chunk's write at the end of the reactor turn; the first chunk is
        not counted among them.
        """
        gw, metrics = self.gateway()
        gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        ev = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
        r.send(ev)
        gw.clock.advance(0.010)  # first chunk: not a later one
        r.send(ev)
        r.send(ev)  # two reads in one turn: one chunk
        gw.clock.advance(0.004)  # later chunk 1 waited 4 ms
        r.send(ev)
        gw.clock.advance(0.002)  # later chunk 2 waited 2 ms
        r.send(b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\ndata: [DONE]\n\n')
        r.end()
        gw.clock.advance(0)  # later chunk 3 (the end) waited 0 ms
        got = self.got(metrics)
        route = (("route", "/v1/chat/completions"),)
        self.assertEqual(got[("llmgate_gateway_added_chunk_max_seconds_count", route)], 1)
        self.assertAlmostEqual(got[("llmgate_gateway_added_chunk_max_seconds_sum", route)], 0.004)
        self.assertAlmostEqual(got[("llmgate_gateway_added_chunk_mean_seconds_sum", route)], 0.002)

    def test_no_later_chunks_no_observation(self) -> None:
        """A response written in one chunk observes no later-chunk latency."""
        gw, metrics = self.gateway()
        gw.post("/v1/chat/completions", {"model": "gpt-4o"})
        r = FakeResponse(200, {b"content-type": [b"application/json"]})
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}')
        r.end()
        gw.clock.advance(0)
        got = self.got(metrics)
        self.assertEqual(got.get(("llmgate_gateway_added_chunk_max_seconds_count", (("route", "/v1/chat/completions"),)), 0), 0)

    def test_ttft_only_for_streams(self) -> None:
        """A non-streaming response observes no TTFT."""
        gw, metrics = self.gateway()
        gw.post("/v1/chat/completions", {"model": "gpt-4o"})
        r = FakeResponse(200, {b"content-type": [b"application/json"]})
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}')
        r.end()
        gw.clock.advance(0)
        got = self.got(metrics)
        self.assertNotIn(("llmgate_ttft_seconds_count", (("route", "/v1/chat/completions"),)), got)
        self.assertEqual(got[("llmgate_request_duration_seconds_count", (("provider", "oai"), ("route", "/v1/chat/completions")))], 1)

    def test_cancellations_and_upstream_errors(self) -> None:
        """A client hanging up mid-stream counts by phase; upstream 429 and unreachable by reason."""
        from twisted.internet.error import ConnectionRefusedError, ConnectError
        from twisted.python.failure import Failure

        gw, metrics = self.gateway()
        channel, _ = gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
        gw.clock.advance(0)
        channel.connectionLost(Failure(ConnectionRefusedError()))
        gw.clock.advance(0)
        gw.post("/v1/chat/completions", {"model": "gpt-4o"})
        r = FakeResponse(429, {b"content-type": [b"application/json"]})
        gw.http.calls[1]["deferred"].callback(r)
        r.send(b"{}")
        r.end()
        gw.post("/v1/chat/completions", {"model": "gpt-4o"})
        gw.http.calls[2]["deferred"].errback(ConnectError())
        gw.clock.advance(0)
        got = self.got(metrics)
        self.assertEqual(got[("llmgate_cancellations_total", (("phase", "body"),))], 1)
        self.assertEqual(got[("llmgate_upstream_errors_total", (("provider", "oai"), ("reason", "http_429")))], 1)
        self.assertEqual(got[("llmgate_upstream_errors_total", (("provider", "oai"), ("reason", "connect")))], 1)

    def test_ledger_counters(self) -> None:
        """Ledger write failures and drops are _total counters, brought up to date before a scrape."""
        class FakeLedger:
            write_failures, dropped = 0, 0

            def pending_count(self) -> int:
                return 0

        ledger = FakeLedger()
        metrics = Metrics()
        metrics.watch_ledger(ledger)
        ledger.write_failures, ledger.dropped = 4, 2
        resource = MetricsResource(metrics.registry, before=metrics.sync_ledger)
        from twisted.web.test.requesthelper import DummyRequest

        body = resource.render_GET(DummyRequest([b""])).decode()
        got = samples(body)
        self.assertEqual(got[("llmgate_ledger_write_failures_total", ())], 4)
        self.assertEqual(got[("llmgate_ledger_dropped_total", ())], 2)
        ledger.write_failures = 5
        got = samples(resource.render_GET(DummyRequest([b""])).decode())
        self.assertEqual(got[("llmgate_ledger_write_failures_total", ())], 5)


class BatchedTests(SynchronousTestCase):
    """
    Per-request updates summed on the reactor thread and written into the
    prometheus values at a scrape, on a timer, or at shutdown: what
    /metrics shows is what the unbatched updates show.
    """

    def records(self) -> list[tuple[object, object]]:
        """Finished requests of every kind, with timings on and between the bucket bounds."""

        class Rec:
            route, status, outcome, ttft_ms, source, cost_usd, provider = (
                "/v1/chat/completions", 200, "completed", 5.0, "reported", 0.25, "p")
            model, key_name, streamed, phase, duration_ms = "m", "k", True, None, 50.0
            input_tokens, output_tokens, cached_input_tokens, cache_creation_tokens, reasoning_tokens = 3, 4, 2, 1, 5

        class Ex:
            headers_at, started, first_write_at, first_byte_at = 1.01, 1.0, 1.0021, 1.002
            added_n, added_max, added_sum = 4, 0.0001, 0.0002

        def rec(**kw: object) -> object:
            r = Rec()
            for k, v in kw.items():
                setattr(r, k, v)
            return r

        out: list[tuple[object, object]] = []
        for ttft in (0.0, 5.0, 10.0, 7.5, 2500.0, 99000.0, None):
            out.append((rec(ttft_ms=ttft, duration_ms=(ttft or 1.0) * 2), Ex()))
        out.append((rec(outcome="client_cancelled", phase="body", source=None, cost_usd=None), Ex()))
        out.append((rec(status=502, outcome="upstream_error", phase="headers", streamed=False), None))
        out.append((rec(route="/nope", status=404, outcome="rejected", ttft_ms=None, source=None), None))
        out.append((rec(model="other-model", key_name="", source="estimated", cost_usd=0.125), Ex()))
        return out

    def exposition(self, metrics: Metrics) -> list[str]:
        from prometheus_client.exposition import generate_latest

        # _created samples are the children's creation times.
        return [line for line in generate_latest(metrics.registry).decode().splitlines() if "_created" not in line]

    def test_same_exposition_as_unbatched(self) -> None:
        """
        The same requests and attempts give the same /metrics text batched
        as unbatched (counters, token sums, each histogram's buckets).
        """
        from twisted.internet.testing import MemoryReactorClock

        plain, batched = Metrics(models=["m"], keys=["k"]), Metrics(models=["m"], keys=["k"])
        batched.batch(MemoryReactorClock())
        for m in (plain, batched):
            for _ in range(3):
                for rec, ex in self.records():
                    m.observe(rec, ex)
                m.attempt("p", "first")
                m.attempt("p", "retry")
        want = self.exposition(plain)
        self.assertIn('llmgate_ttft_seconds_bucket{le="0.005",route="/v1/chat/completions"} 12.0', want)
        self.assertEqual(self.exposition(batched), want)

    def test_written_on_timer_and_at_shutdown(self) -> None:
        """
        Batched updates reach the values (a worker's files) once, summed,
        FLUSH_INTERVAL after the first one, and at reactor shutdown; a
        scrape writes them at once and cancels the timer.
        """
        from twisted.internet.testing import MemoryReactorClock

        from llmgate.ops.metrics import FLUSH_INTERVAL

        clock = MemoryReactorClock()
        metrics = Metrics(models=["m"], keys=["k"])
        metrics.batch(clock)
        rec, ex = self.records()[1]
        requests = metrics.requests.labels("/v1/chat/completions", "200", "completed", "k", "p")._value
        incs: list[float] = []
        real_inc = requests.inc
        self.patch(requests, "inc", lambda n: (incs.append(n), real_inc(n)))
        for _ in range(5):
            metrics.observe(rec, ex)
        self.assertEqual(requests.get(), 0)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(FLUSH_INTERVAL)
        self.assertEqual((requests.get(), incs), (5, [5.0]))
        metrics.observe(rec, ex)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        metrics.registry.collect()
        list(metrics.registry.collect())
        self.assertEqual(requests.get(), 6)
        self.assertEqual(clock.getDelayedCalls(), [])
        metrics.observe(rec, ex)
        for f, args, kwargs in clock.triggers["after"]["shutdown"]:
            f(*args, **kwargs)
        self.assertEqual(requests.get(), 7)

    def test_gateway_requests_counted_in_a_scrape(self) -> None:
        """A batched gateway's finished request is in the very next scrape."""
        gw = Gateway()
        metrics = Metrics()
        metrics.batch(gw.clock)
        gw.resource.accounting = Accounting(gw.clock, metrics=metrics)
        gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True})
        r = FakeResponse(200, SSE_HEADERS)
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}\n\ndata: [DONE]\n\n')
        r.end()
        gw.clock.advance(0)
        got = samples(MetricsResource(metrics.registry).render_GET(_dummy()).decode())
        self.assertEqual(
            got[("llmgate_requests_total", (("key", "anonymous"), ("outcome", "completed"), ("provider", "oai"), ("route", "/v1/chat/completions"), ("status", "200")))], 1
        )
        self.assertEqual(got[("llmgate_upstream_attempts_total", (("provider", "oai"), ("reason", "first")))], 1)


def _dummy() -> object:
    from twisted.web.test.requesthelper import DummyRequest

    return DummyRequest([b""])

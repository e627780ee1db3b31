"""The status page's board, spend view, rendering and admin routes."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from llmgate.accounting.ledger import UsageRecord
from llmgate.ops import status
from llmgate.ops.metrics import Metrics, MetricsResource
from llmgate.policy.keys import KeyRecord
from llmgate.policy.limits import Quotas

# 2026-11-18 12:00:00 UTC (the next day is in the same month)
NOON = 1795003200.0

REC = UsageRecord(
    request_id="r", ts=NOON, key_name="k", route="/v1/chat/completions", model="gpt-4o-mini", provider="openai",
    upstream_model="gpt-4o-mini", upstream_id=None, status=200, streamed=True, outcome="completed", phase=None,
    input_tokens=1, output_tokens=1, cached_input_tokens=0, cache_creation_tokens=0, reasoning_tokens=0,
    source="reported", cost_usd=None, ttft_ms=100.0, duration_ms=200.0, bytes_in=1, bytes_out=1,
)


def board(minutes: int = 15, **kw: Any) -> tuple[status.StatusBoard, Clock]:
    clock = Clock()
    clock.advance(NOON)
    return status.StatusBoard(clock, minutes=minutes, **kw), clock


class BoardTests(SynchronousTestCase):
    def test_counts_per_provider_and_minute(self) -> None:
        """Requests, errors and cancellations are counted per provider, per minute."""
        b, clock = board()
        b.observe(REC)
        b.observe(replace(REC, outcome="upstream_error", status=502))
        b.observe(replace(REC, outcome="gateway_error", status=500, provider="anthropic"))
        clock.advance(60)
        b.observe(replace(REC, outcome="client_cancelled", status=200))
        self.assertEqual(b.totals(), {"openai": [3, 1, 1], "anthropic": [1, 1, 0]})
        self.assertEqual(b.totals(1), {"openai": [1, 0, 1]})
        window = b.window()
        self.assertEqual(window[0].minute, int(NOON // 60) + 1)
        self.assertEqual(window[1].counts, {"openai": [2, 1, 0], "anthropic": [1, 1, 0]})

    def test_old_minutes_leave_the_window(self) -> None:
        """A minute older than the ring is neither shown nor kept: memory is bounded by the ring."""
        b, clock = board(minutes=3)
        b.observe(REC)
        clock.advance(3 * 60)
        self.assertEqual(b.totals(), {})
        self.assertIsNone(b.ttft_percentiles())
        b.observe(REC)
        self.assertEqual(b.totals(), {"openai": [1, 0, 0]})
        self.assertEqual(len(b._ring), 3)

    def test_request_without_provider(self) -> None:
        """A request refused before a provider was chosen counts under "-"."""
        b, _ = board()
        b.observe(replace(REC, provider="", outcome="rejected", status=401, ttft_ms=None))
        self.assertEqual(b.totals(), {"-": [1, 0, 0]})

    def test_ttft_percentiles_nearest_rank(self) -> None:
        """p50/p90/p99 are nearest-rank over the window's streamed 200s only."""
        b, clock = board()
        for ms in range(1, 101):
            b.observe(replace(REC, ttft_ms=float(ms)))
            if ms == 50:
                clock.advance(60)
        # Not samples: an error body, a non-streamed reply.
        b.observe(replace(REC, ttft_ms=9999.0, status=500, outcome="upstream_error"))
        b.observe(replace(REC, ttft_ms=9999.0, streamed=False))
        n, q = b.ttft_percentiles()
        self.assertEqual(n, 100)
        self.assertEqual(q, {0.5: 50.0, 0.9: 90.0, 0.99: 99.0})

    def test_ttft_samples_bounded(self) -> None:
        """Past the per-minute cap, a reservoir keeps the sample count fixed."""
        b, _ = board(ttft_samples=10, rng=random.Random(1))
        for ms in range(1000):
            b.observe(replace(REC, ttft_ms=float(ms)))
        self.assertEqual(b.ttft_percentiles()[0], 10)
        self.assertEqual(b.window()[0].seen, 1000)

    def test_last_errors_bounded(self) -> None:
        """Only the last N error records are kept, with route, model, provider, status."""
        b, clock = board(last_errors=3)
        for i in range(5):
            b.observe(replace(REC, outcome="upstream_error", status=500 + i, model=f"m{i}"))
            clock.advance(1)
        b.observe(REC)
        self.assertEqual([e[4] for e in b.errors], [502, 503, 504])
        self.assertEqual(b.errors[-1][:5], (NOON + 4, "/v1/chat/completions", "m4", "openai", 504))


class SpendTests(SynchronousTestCase):
    def test_spend_read_from_quota_state(self) -> None:
        """Spend today and in the budget's period come from the quotas' state."""
        clock = Clock()
        clock.advance(NOON)
        quotas = Quotas(clock)
        quotas.load_spend({"team": {"day": 1.5, "month": 7.25, "total": 9.0}})
        keys = [
            KeyRecord("team", b"x" * 32, budget_usd=10.0, period="month"),
            KeyRecord("free", b"y" * 32),
        ]
        got = status.key_spend(quotas, keys, clock.seconds())
        self.assertEqual(got, [("team", 1.5, 10.0, "month", 7.25), ("free", 0.0, None, "month", 0.0)])
        # The next day: today's spend reads 0 though nothing rolled it over.
        got = status.key_spend(quotas, keys, NOON + 86400)
        self.assertEqual(got[0][1], 0.0)
        self.assertEqual(got[0][4], 7.25)


class RenderTests(SynchronousTestCase):
    def test_client_strings_are_escaped(self) -> None:
        """Model names and routes come from clients: the page shows them as text, never markup."""
        b, _ = board()
        evil = '<script>alert("x")</script>'
        b.observe(replace(REC, outcome="upstream_error", status=500, model=evil, route="/v1/<img src=x>"))
        page = status.render(b, 2, [("<k>", 0.5, 1.0, "day", 0.5)])
        self.assertNotIn("<script>", page)
        self.assertNotIn("<img", page)
        self.assertNotIn("<k>", page)
        self.assertIn("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;", page)
        self.assertIn("&lt;k&gt;", page)
        self.assertIn('<meta http-equiv="refresh"', page)
        self.assertIn(">2</span>", page)

    def test_budget_share(self) -> None:
        """A key at or past its budget is shown in red as a share of it."""
        b, _ = board()
        page = status.render(b, 0, [("team", 3.0, 2.0, "day", 3.0)])
        self.assertIn("<span class=err>150%</span>", page)
        self.assertIn("$2.00", page)


class AdminRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        clock.advance(NOON)
        self.metrics = Metrics()
        self.metrics.board = status.StatusBoard(clock)
        page = status.StatusResource(self.metrics.board, lambda: 0, lambda: Quotas(clock), lambda: [])
        self.site = Site(status.AdminRoot(MetricsResource(self.metrics.registry), page))

    def get(self, path: bytes) -> tuple[int, bytes, bytes]:
        req = DummyRequest(path.lstrip(b"/").split(b"/"))
        req.uri = path
        resource = self.site.getResourceFor(req)
        body = resource.render(req)
        if isinstance(body, bytes):
            req.write(body)
        return req.responseCode or 200, b"".join(req.written), req.responseHeaders.getRawHeaders(b"content-type")[0]

    def test_status_and_root_serve_the_page(self) -> None:
        """C{/} and C{/status} serve the HTML page, fed by Metrics.observe; C{/metrics} still serves metrics."""
        self.metrics.observe(replace(REC, provider="p-one"))
        for path in (b"/", b"/status"):
            code, body, ctype = self.get(path)
            self.assertEqual((code, ctype), (200, b"text/html; charset=utf-8"))
            self.assertIn(b'<tr data-provider="p-one">', body)
        code, body, ctype = self.get(b"/metrics")
        self.assertIn(b"llmgate_requests_total", body)
        self.assertTrue(ctype.startswith(b"text/plain"))

    def test_other_paths_404(self) -> None:
        """Anything else on the admin listener is 404."""
        code, _, _ = self.get(b"/nothing")
        self.assertEqual(code, 404)



class WorkersViewTests(SynchronousTestCase):
    def test_summary_of_summed_metrics(self) -> None:
        """
        The supervisor's view reads the metric families: live requests,
        requests by outcome, tokens and cost by provider, TTFT percentiles
        interpolated in the histogram's buckets as Prometheus does.
        """
        metrics = Metrics()
        metrics.active.inc(2)
        for ms in (30.0, 35.0, 40.0, 45.0):  # all in the (0.025, 0.05] bucket
            metrics.observe(replace(REC, ttft_ms=ms, cost_usd=0.25))
        metrics.observe(replace(REC, outcome="upstream_error", status=500, ttft_ms=None, source=None))
        view = status.summarize(metrics.registry.collect())
        self.assertEqual(view["active"], 2.0)
        self.assertEqual(view["outcomes"], {"completed": 4.0, "upstream_error": 1.0})
        self.assertEqual(view["requests"], 5.0)
        # Requests, errors, tokens, cost.
        self.assertEqual(view["providers"], {"openai": [5.0, 1.0, 8.0, 1.0]})
        n, q = view["ttft"]
        self.assertEqual(n, 4)
        # Rank 2 of 4 in the bucket (25 ms, 50 ms] holding all four: 25 + 25 * 2/4.
        self.assertAlmostEqual(q[0.5], 37.5)
        self.assertAlmostEqual(q[0.99], 25 + 25 * 3.96 / 4)

    def test_quantile_in_inf_bucket(self) -> None:
        """A rank in the +Inf bucket reads the highest finite bound, as histogram_quantile does."""
        self.assertEqual(status._bucket_quantile(0.99, [(1.0, 1.0), (float("inf"), 10.0)]), 1.0)

    def test_workers_page(self) -> None:
        """The supervisor's page shows the summed figures, escaped, and says what is per worker."""
        clock = Clock()
        clock.advance(NOON)
        view = {
            "active": 3.0, "outcomes": {"completed": 7.0, "upstream_error": 2.0}, "requests": 9.0,
            "providers": {"<p>": [9.0, 2.0, 10.0, 0.5]}, "ttft": (7, {0.5: 12.0, 0.9: 40.0, 0.99: 80.0}), "ledger": {"pending": 1.0},
        }
        seen = []

        def in_thread(f: Any, path: str) -> Any:
            from twisted.internet.defer import succeed

            seen.append((f, path))
            return succeed(view)

        req = DummyRequest([b"status"])
        res = status.WorkersStatusResource(3, lambda: "/dir", in_thread, clock)
        from twisted.web.server import NOT_DONE_YET

        self.assertIs(res.render(req), NOT_DONE_YET)
        self.assertEqual(seen, [(status.aggregate_view, "/dir")])
        body = b"".join(req.written).decode()
        self.assertTrue(req.finished)
        self.assertIn("3 worker processes", body)
        self.assertIn('<span class=big id=live>3</span>', body)
        self.assertIn('<tr data-outcome="upstream_error"><td class=l>upstream_error</td><td class=err>2</td>', body)
        self.assertIn("&lt;p&gt;", body)
        self.assertNotIn("<p>", body.split("<body>")[1].replace("<p class=muted>", "").replace("<p>Live", ""))
        self.assertIn("<td>12 ms</td><td>40 ms</td><td>80 ms</td>", body)
        self.assertIn("--workers 1", body)
        self.assertIn("<td class=requests>9</td><td class='errors err'>2</td><td>10</td><td>$0.5000</td>", body)

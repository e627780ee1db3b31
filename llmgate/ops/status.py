# -*- test-case-name: tests.ops.test_status -*-
"""
The status page: what an operator looks at first in an incident.

Served at C{/} and C{/status} on the C{[metrics] port} listener (the admin
listener: it names keys and models, which are not for every client).  One
server-rendered HTML page, no script, refreshed by the browser every few
seconds (C{<meta http-equiv=refresh>}).  It shows:

  - the streams being relayed now;
  - requests, errors and cancellations per provider, per minute, over the
    last L{StatusBoard.minutes} minutes, and TTFT percentiles over the
    same window;
  - each key's spend today and in its budget's period, against the budget
    (read from the quota state in L{llmgate.policy.limits}, never kept a
    second time here);
  - the last upstream and gateway errors (time, route, model, provider,
    status, phase; a usage record holds no secret).

L{StatusBoard} is fed by L{llmgate.ops.metrics.Metrics.observe}, once per
finished request: a dict update and a list append into a ring of
per-minute slots, so its memory is bounded by minutes x providers (the
configured providers; a request that never reached one counts as "-") plus
L{TTFT_SAMPLES} samples a minute and L{LAST_ERRORS} error rows.  Measured (CPython 3.11, shared machine):
1.2 us per record fed; a page over a full ring (15 minutes x 512 TTFT
samples, 4 providers, 50 keys, 20 errors) renders in 1.7 ms on the
reactor thread, 16 kB.

Everything written into the page is escaped: model names and routes come
from clients.

Under C{--workers N} (N above 1) the admin listener is the supervisor's,
which relays no request; each worker's board is its own.  The supervisor
serves L{WorkersStatusResource}: the supervisor's view, built from the
workers' summed metrics (the files C{/metrics} sums): live streams,
requests by outcome, requests, errors, tokens and cost by provider and
TTFT percentiles (from the histogram's buckets), since start; the page says that the
per-minute view, the spend per key and the last errors are per worker.
"""

from __future__ import annotations

import html
import math
import random
import time
from collections import deque
from typing import Any, Callable, Iterable, Optional

from twisted.web.resource import Resource

from llmgate.policy.keys import period_start

# TTFT samples kept per minute: past this, reservoir sampling keeps a
# uniform sample of the minute (percentiles stay unbiased, memory bounded).
TTFT_SAMPLES = 512
LAST_ERRORS = 20
ERROR_OUTCOMES = ("upstream_error", "gateway_error")
REFRESH_SECONDS = 5


class _Minute:
    """One minute's counters: provider -> [requests, errors, cancelled], TTFT samples."""

    __slots__ = ("minute", "counts", "ttft", "seen")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.counts: dict[str, list[int]] = {}
        self.ttft: list[float] = []
        self.seen = 0  # TTFT values offered this minute (for the reservoir)


class StatusBoard:
    """
    Per-minute counters and the last errors, from usage records.

    @param clock: C{IReactorTime} (wall time: minutes are shown in UTC).
    @param minutes: how many minutes the ring holds.
    """

    def __init__(
        self,
        clock: Any,
        minutes: int = 15,
        last_errors: int = LAST_ERRORS,
        ttft_samples: int = TTFT_SAMPLES,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.clock = clock
        self.minutes = minutes
        self.ttft_samples = ttft_samples
        self._ring: list[Optional[_Minute]] = [None] * minutes
        self.errors: deque[tuple[float, str, str, str, int, str, str]] = deque(maxlen=last_errors)
        self._rng = rng or random.Random()

    def _slot(self, minute: int) -> _Minute:
        i = minute % self.minutes
        slot = self._ring[i]
        if slot is None or slot.minute != minute:
            slot = self._ring[i] = _Minute(minute)
        return slot

    def observe(self, rec: Any) -> None:
        """Count one finished request (called by L{Metrics.observe})."""
        now = self.clock.seconds()
        slot = self._slot(int(now // 60))
        provider = rec.provider or "-"
        c = slot.counts.get(provider)
        if c is None:
            c = slot.counts[provider] = [0, 0, 0]
        c[0] += 1
        if rec.outcome in ERROR_OUTCOMES:
            c[1] += 1
            self.errors.append(
                (now, rec.route, rec.model, provider, rec.status, rec.outcome, rec.phase or "")
            )
        elif rec.outcome == "client_cancelled":
            c[2] += 1
        # TTFT of streams the provider answered, not of error bodies.
        if rec.ttft_ms is not None and rec.streamed and rec.status == 200:
            slot.seen += 1
            if len(slot.ttft) < self.ttft_samples:
                slot.ttft.append(rec.ttft_ms)
            else:
                j = self._rng.randrange(slot.seen)
                if j < self.ttft_samples:
                    slot.ttft[j] = rec.ttft_ms

    def window(self) -> list[_Minute]:
        """The minutes of the ring still in the window, newest first (gaps included, empty)."""
        now = int(self.clock.seconds() // 60)
        out = []
        for m in range(now, now - self.minutes, -1):
            slot = self._ring[m % self.minutes]
            out.append(slot if slot is not None and slot.minute == m else _Minute(m))
        return out

    def providers(self) -> list[str]:
        return sorted({p for slot in self.window() for p in slot.counts})

    def totals(self, last: Optional[int] = None) -> dict[str, list[int]]:
        """Per provider: [requests, errors, cancelled] over the last C{last} minutes (default: all)."""
        out: dict[str, list[int]] = {}
        for slot in self.window()[: last or self.minutes]:
            for p, c in slot.counts.items():
                t = out.setdefault(p, [0, 0, 0])
                for i in range(3):
                    t[i] += c[i]
        return out

    def ttft_percentiles(self, qs: Iterable[float] = (0.5, 0.9, 0.99)) -> Optional[tuple[int, dict[float, float]]]:
        """(samples, {q: ms}) over the window, nearest-rank; L{None} without samples."""
        samples = sorted(v for slot in self.window() for v in slot.ttft)
        if not samples:
            return None
        n = len(samples)
        return n, {q: samples[min(n - 1, max(0, math.ceil(q * n) - 1))] for q in qs}


def key_spend(quotas: Any, keys: Iterable[Any], now: float) -> list[tuple[str, float, Optional[float], str, float]]:
    """
    Per key: (name, spent today, budget or None, budget period, spent in
    that period), read from the quota state's L{Spend} of each key.  A
    period the clock has left since the key's last request reads 0 (the
    state rolls it over at the next one): this reads, never mutates.
    """
    spends = getattr(quotas.state, "spend", {})
    out = []
    for key in keys:
        s = spends.get(key.name)

        def spent(period: str) -> float:
            if s is None:
                return 0.0
            if period != "total" and s.starts.get(period) != period_start(period, now):
                return 0.0
            return s.spent.get(period, 0.0)

        out.append((key.name, spent("day"), key.budget_usd, key.period, spent(key.period)))
    return out


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}
.big{font-size:2em;font-weight:600}.muted{color:#777}
.err{color:#b00020;font-weight:600}.ok{color:#1b7f2a}.warn{color:#b36b00}
.bar{display:inline-block;height:.7em;background:#4a7bd0;vertical-align:middle}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _ms(v: float) -> str:
    return f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms"


def _hhmm(minute: int) -> str:
    return time.strftime("%H:%M", time.gmtime(minute * 60))


def render(
    board: StatusBoard,
    live: int,
    spend: list[tuple[str, float, Optional[float], str, float]],
    version: str = "",
) -> str:
    """The page, as text (escaped)."""
    now = board.clock.seconds()
    providers = board.providers()
    totals = board.totals()
    last5 = board.totals(5)
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        "<title>llmgate status</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>llmgate {_e(version)}</h1>",
        f'<p class=muted>{_e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)))} '
        f"· this process (pid {_e(_pid())}) · refreshes every {REFRESH_SECONDS} s · "
        '<a href="/metrics">/metrics</a></p>',
        f'<p>Live streams: <span class=big id=live>{int(live)}</span></p>',
        f"<h2>Requests per provider (last {board.minutes} minutes)</h2>",
    ]
    if not providers:
        out.append("<p class=muted>No requests yet.</p>")
    else:
        out.append(
            "<table id=providers><tr><th class=l>provider</th><th>requests</th><th>errors</th>"
            "<th>cancelled</th><th>requests, last 5 min</th><th>errors, last 5 min</th></tr>"
        )
        for p in providers:
            t, f = totals.get(p, [0, 0, 0]), last5.get(p, [0, 0, 0])
            cls = "err" if t[1] else "ok"
            out.append(
                f'<tr data-provider="{_e(p)}"><td class=l>{_e(p)}</td><td class=requests>{t[0]}</td>'
                f"<td class='errors {cls}'>{t[1]}</td><td>{t[2]}</td><td>{f[0]}</td><td>{f[1]}</td></tr>"
            )
        out.append("</table>")
        out.append("<h2>Per minute (UTC): requests / errors</h2><table id=minutes><tr><th class=l>minute</th>")
        out.extend(f"<th>{_e(p)}</th>" for p in providers)
        out.append("<th class=l></th></tr>")
        window = board.window()
        peak = max((sum(c[0] for c in s.counts.values()) for s in window), default=0) or 1
        for slot in window:
            n = sum(c[0] for c in slot.counts.values())
            out.append(f"<tr><td class=l>{_hhmm(slot.minute)}</td>")
            for p in providers:
                c = slot.counts.get(p, [0, 0, 0])
                err = f' / <span class=err>{c[1]}</span>' if c[1] else " / 0"
                out.append(f"<td>{c[0]}{err}</td>")
            out.append(f'<td class=l><span class=bar style="width:{int(120 * n / peak)}px"></span></td></tr>')
        out.append("</table>")
    out.append(f"<h2>Time to first token, streams (last {board.minutes} minutes)</h2>")
    pct = board.ttft_percentiles()
    if pct is None:
        out.append("<p class=muted id=ttft>No streams yet.</p>")
    else:
        n, q = pct
        out.append(
            "<table id=ttft><tr><th>samples</th><th>p50</th><th>p90</th><th>p99</th></tr>"
            f"<tr><td>{n}</td><td>{_ms(q[0.5])}</td><td>{_ms(q[0.9])}</td><td>{_ms(q[0.99])}</td></tr></table>"
        )
    out.append("<h2>Spend per key</h2>")
    if not spend:
        out.append("<p class=muted>No gateway keys configured.</p>")
    else:
        out.append(
            "<table id=spend><tr><th class=l>key</th><th>today</th><th>budget</th>"
            "<th class=l>period</th><th>spent in period</th><th>used</th></tr>"
        )
        for name, today, budget, period, spent in spend:
            if budget is None:
                b, used = '<span class=muted>none</span>', ""
            else:
                share = spent / budget if budget > 0 else 1.0
                cls = "err" if share >= 1 else "warn" if share >= 0.8 else "ok"
                b, used = f"${budget:,.2f}", f"<span class={cls}>{share:.0%}</span>"
            out.append(
                f"<tr><td class=l>{_e(name)}</td><td>${today:,.4f}</td><td>{b}</td>"
                f"<td class=l>{_e(period if budget is not None else '')}</td><td>${spent:,.4f}</td><td>{used}</td></tr>"
            )
        out.append("</table>")
    out.append(f"<h2>Last errors (up to {board.errors.maxlen})</h2>")
    if not board.errors:
        out.append("<p class=muted id=errors>None.</p>")
    else:
        out.append(
            "<table id=errors><tr><th class=l>time (UTC)</th><th class=l>route</th><th class=l>model</th>"
            "<th class=l>provider</th><th>status</th><th class=l>outcome</th><th class=l>phase</th></tr>"
        )
        for ts, route, model, provider, status, outcome, phase in reversed(board.errors):
            out.append(
                f"<tr class=error><td class=l>{_e(time.strftime('%H:%M:%S', time.gmtime(ts)))}</td>"
                f"<td class=l>{_e(route)}</td><td class=l>{_e(model)}</td><td class=l>{_e(provider)}</td>"
                f"<td class=err>{_e(status)}</td><td class=l>{_e(outcome)}</td><td class=l>{_e(phase)}</td></tr>"
            )
        out.append("</table>")
    out.append("</body></html>")
    return "".join(out)


def _pid() -> int:
    import os

    return os.getpid()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llmgate")
    except Exception:
        return ""


class StatusResource(Resource):
    """C{GET /} and C{/status}: L{render} of one process's board."""

    isLeaf = True

    def __init__(
        self,
        board: StatusBoard,
        live: Callable[[], int],
        quotas: Callable[[], Any],
        keys: Callable[[], Iterable[Any]],
    ) -> None:
        """
        @param live: the number of requests being relayed now.
        @param quotas: returns the L{Quotas} (its state holds the spend).
        @param keys: returns the configured key records (with budgets).
        """
        super().__init__()
        self.board = board
        self._live = live
        self._quotas = quotas
        self._keys = keys
        self._version = _version()

    def render_GET(self, request: Any) -> bytes:
        spend = key_spend(self._quotas(), self._keys(), self.board.clock.seconds())
        page = render(self.board, self._live(), spend, self._version)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return page.encode("utf-8")


def summarize(families: Iterable[Any]) -> dict[str, Any]:
    """
    The supervisor's view under C{--workers}: figures since start from
    the workers' summed metric families (L{prometheus_client} C{Metric}s).
    Pure: the reading of the files is L{aggregate_view}'s.
    """
    view: dict[str, Any] = {
        "active": 0.0, "outcomes": {}, "providers": {}, "ttft": None,
        "ledger": {}, "requests": 0.0,
    }
    buckets: dict[float, float] = {}
    for fam in families:
        for smp in fam.samples:
            name, labels, value = smp.name, smp.labels, smp.value
            if name == "llmgate_active_requests":
                view["active"] += value
            elif name == "llmgate_requests_total":
                view["requests"] += value
                o = labels.get("outcome", "?")
                view["outcomes"][o] = view["outcomes"].get(o, 0.0) + value
                p = _provider_row(view, labels)
                p[0] += value
                if o in ERROR_OUTCOMES:
                    p[1] += value
            elif name in ("llmgate_tokens_total", "llmgate_cost_usd_total"):
                _provider_row(view, labels)[2 if name == "llmgate_tokens_total" else 3] += value
            elif name == "llmgate_ttft_seconds_bucket":
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + value
            elif name.startswith("llmgate_ledger_") and not name.endswith("_created"):
                key = name[len("llmgate_ledger_"):].removesuffix("_total")
                view["ledger"][key] = view["ledger"].get(key, 0.0) + value
    bounds = sorted(buckets.items())
    total = bounds[-1][1] if bounds else 0.0
    if total > 0:
        view["ttft"] = (int(total), {q: _bucket_quantile(q, bounds) * 1000.0 for q in (0.5, 0.9, 0.99)})
    return view


def _provider_row(view: dict[str, Any], labels: dict[str, str]) -> list[float]:
    """[requests, errors, tokens, cost] of the labels' provider ("-": none chosen)."""
    return view["providers"].setdefault(labels.get("provider") or "-", [0.0, 0.0, 0.0, 0.0])


def _bucket_quantile(q: float, bounds: list[tuple[float, float]]) -> float:
    """Prometheus's C{histogram_quantile} over cumulative (upper bound, count) pairs, +Inf last."""
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if upper == float("inf"):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def aggregate_view(path: str) -> dict[str, Any]:
    """L{summarize} of the multiprocess files in C{path}.  Reads files: call it off the reactor."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return summarize(registry.collect())


def render_workers(view: dict[str, Any], workers: int, now: float, version: str = "") -> str:
    """The supervisor's page (escaped), from L{summarize}'s view."""
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        f"<title>llmgate status</title><style>{_CSS}</style></head><body>",
        f"<h1>llmgate {_e(version)}</h1>",
        f'<p class=muted>{_e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)))} '
        f"· {int(workers)} worker processes, summed since start · refreshes every {REFRESH_SECONDS} s · "
        '<a href="/metrics">/metrics</a></p>',
        f"<p>Live streams: <span class=big id=live>{int(view['active'])}</span></p>",
        f"<h2>Requests since start by outcome</h2><table id=outcomes><tr><th class=l>outcome</th><th>requests</th></tr>",
    ]
    for outcome, n in sorted(view["outcomes"].items()):
        cls = " class=err" if outcome in ERROR_OUTCOMES and n else ""
        out.append(f'<tr data-outcome="{_e(outcome)}"><td class=l>{_e(outcome)}</td><td{cls}>{int(n)}</td></tr>')
    out.append(f"<tr><th class=l>all</th><th>{int(view['requests'])}</th></tr></table>")
    out.append("<h2>Requests, tokens and spend since start by provider</h2>")
    if view["providers"]:
        out.append(
            "<table id=providers><tr><th class=l>provider</th><th>requests</th><th>errors</th>"
            "<th>tokens</th><th>cost</th></tr>"
        )
        for p, (req, err, tok, cost) in sorted(view["providers"].items()):
            cls = "err" if err else "ok"
            out.append(
                f'<tr data-provider="{_e(p)}"><td class=l>{_e(p)}</td><td class=requests>{int(req)}</td>'
                f"<td class='errors {cls}'>{int(err)}</td><td>{int(tok)}</td><td>${cost:,.4f}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p class=muted>No requests yet.</p>")
    out.append("<h2>Time to first relayed byte of streams since start (llmgate_ttft_seconds buckets)</h2>")
    if view["ttft"] is None:
        out.append("<p class=muted id=ttft>No streams yet.</p>")
    else:
        n, q = view["ttft"]
        out.append(
            "<table id=ttft><tr><th>samples</th><th>p50</th><th>p90</th><th>p99</th></tr>"
            f"<tr><td>{n}</td><td>{_ms(q[0.5])}</td><td>{_ms(q[0.9])}</td><td>{_ms(q[0.99])}</td></tr></table>"
        )
    led = view["ledger"]
    if led:
        out.append(
            "<h2>Usage ledger</h2><table id=ledger><tr><th>pending</th><th>write failures</th><th>dropped</th></tr>"
            f"<tr><td>{int(led.get('pending', 0))}</td><td>{int(led.get('write_failures', 0))}</td>"
            f"<td>{int(led.get('dropped', 0))}</td></tr></table>"
        )
    out.append(
        "<p class=muted>The per-minute view, the spend per key and the last errors are kept by each "
        "worker and are not shown here; <code>--workers 1</code> serves the full page.</p></body></html>"
    )
    return "".join(out)


class WorkersStatusResource(Resource):
    """
    The supervisor's C{/status} under C{--workers N}: the workers' summed
    metrics (read in a thread, like L{AggregateMetricsResource}).
    """

    isLeaf = True

    def __init__(self, workers: int, path: Callable[[], str], in_thread: Any, clock: Any) -> None:
        super().__init__()
        self.workers = workers
        self.path = path
        self._in_thread = in_thread
        self._clock = clock
        self._version = _version()

    def render_GET(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        d = self._in_thread(aggregate_view, self.path())
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(view: dict[str, Any]) -> None:
            if gone:
                return
            page = render_workers(view, self.workers, self._clock.seconds(), self._version)
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.write(page.encode("utf-8"))
            request.finish()

        def failed(f: Any) -> None:
            from twisted.logger import Logger

            Logger(namespace="llmgate.status").failure("reading the workers' metrics failed", f)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET


class AdminRoot(Resource):
    """The admin listener: C{/metrics}, and the status page at C{/} and C{/status}."""

    def __init__(self, metrics: Resource, status: Resource) -> None:
        super().__init__()
        self.putChild(b"metrics", metrics)
        self.putChild(b"status", status)
        self._status = status

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"" and not request.postpath:
            return self._status
        return Resource.getChild(self, path, request)

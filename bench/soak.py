#!/usr/bin/env python3
"""
Soak test: many mixed streams through a real gateway, looking for slow leaks.

Starts a real C{twistd -n llmgate-mock} and a real C{twistd -n llmgate}
pointed at it (127.0.0.1 only, ports chosen by the kernel), then drives N
requests (default 50,000) with bounded concurrency from cheap asyncio
clients (raw HTTP/1.1, one connection per request, no SDK). The mix:

  complete      streamed chat completions, Anthropic streams and plain JSON
  cancel        the client reads a few events, then leaves (FIN or RST)
  reset         the mock resets the upstream mid-stream (x-mock-fault: reset-mid)
  status500     the upstream answers 500 (relayed as is)
  html200       the upstream answers a stream request with HTML (gateway 502)
  rejected      invalid JSON (the gateway answers 400 itself)

It reports the gateway's RSS after warm-up and at the end, its open file
descriptors before, after warm-up and after the load, and, after stopping
the gateway with SIGTERM, the ledger: row count against requests sent,
outcome counts per kind against what the clients saw, and one record per
request matched by the gateway's own request id, which every answer carries
in x-request-id and the ledger keeps as request_id (a gateway from before
request ids is matched by the upstream id it relays, and the kinds without
one by count). Exits 1 if it finds a leak, a missing or duplicate
record, or a client that saw something other than what its kind should give.

    python bench/soak.py                      # 50,000 requests, 200 at a time
    python bench/soak.py -n 5000 -c 200       # quick check

Everything is bounded: each request has a timeout, the whole load has a
deadline (--max-seconds), and the daemons are stopped by pid (SIGKILL after
a grace period).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# kind -> (weight, ledger outcome the gateway must record)
MIX = {
    "complete_chat": (45, "completed"),
    "complete_anthropic": (10, "completed"),
    "complete_json": (5, "completed"),
    "cancel": (20, "client_cancelled"),
    "reset": (10, "upstream_error"),
    "status500": (4, "upstream_error"),
    "html200": (3, "upstream_error"),
    "rejected": (3, "rejected"),
}


# --------------------------------------------------------------------------- processes


class Proc:
    """A C{twistd -n PLUGIN} child whose log goes to a file (not to our memory)."""

    LISTEN = {"llmgate": r"GatewaySite starting on (\d+)", "llmgate-mock": r"Site starting on (\d+)"}

    def __init__(self, plugin: str, args: list[str], workdir: str, env: Optional[dict[str, str]] = None,
                 gc_trace: float = 0.0) -> None:
        self.plugin = plugin
        self.log_path = os.path.join(workdir, plugin + ".log")
        self._log = open(self.log_path, "wb")
        code = "from twisted.scripts.twistd import run; run()"
        if gc_trace:
            code = _GC_TRACE % gc_trace + code
        cmd = [sys.executable, "-c", code, "-n", "--pidfile=", plugin, *args]
        self.proc = subprocess.Popen(
            cmd, cwd=workdir, env={**os.environ, **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid
        self.port = self._wait_port(60)

    def _wait_port(self, timeout: float) -> int:
        rx = re.compile(self.LISTEN[self.plugin])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                m = rx.search(f.read().decode("utf-8", "replace"))
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise SystemExit(f"{self.plugin} did not start:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        with open(self.log_path, "rb") as f:
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return -1

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def sockets(self) -> int:
        n = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
        return n

    def stop(self, grace: float = 60.0) -> Optional[int]:
        """SIGTERM, wait up to C{grace} seconds, then SIGKILL. The exit status."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)


# Run in the gateway before twistd with --gc-trace: every N seconds, a full
# collection and one log line with the count of live gc-tracked objects per
# type (a leak shows as a type that keeps growing; allocator fragmentation
# does not). The collections change the RSS figures: diagnosis only.
_GC_TRACE = """
import collections, gc, json, sys
from twisted.internet import reactor
def _gc_dump():
    gc.collect()  # count live objects, not garbage the next collection frees
    c = collections.Counter(type(o).__name__ for o in gc.get_objects())
    sys.stdout.write("SOAK-GC " + json.dumps(dict(c.most_common(40))) + "\\n")
    sys.stdout.flush()
    reactor.callLater(%s, _gc_dump)
reactor.callWhenRunning(_gc_dump)
"""


def gc_growth(log_path: str, warm_at: float) -> list[tuple[str, int, int]]:
    """Types whose object count grew most between the dump after warm-up and the last one."""
    dumps = []
    with open(log_path, "rb") as f:
        for line in f:
            if b"SOAK-GC " in line:
                dumps.append(json.loads(line.split(b"SOAK-GC ", 1)[1]))
    if len(dumps) < 2:
        return []
    first = dumps[min(len(dumps) - 1, max(0, int(warm_at)))]
    last = dumps[-1]
    rows = [(k, first.get(k, 0), v) for k, v in last.items()]
    rows.sort(key=lambda r: r[2] - r[1], reverse=True)
    return rows[:10]


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def gateway_config(mock_port: int, ledger: str) -> str:
    return (
        "[providers.mock]\n"
        'kind = "openai"\n'
        f'base_url = "http://127.0.0.1:{mock_port}/v1"\n'
        'api_key_env = "SOAK_UPSTREAM_KEY"\n'
        "default = true\n"
        "[providers.mockant]\n"
        'kind = "anthropic"\n'
        f'base_url = "http://127.0.0.1:{mock_port}"\n'
        'api_key_env = "SOAK_UPSTREAM_KEY"\n'
        "default = true\n"
        f'[ledger]\npath = "{ledger}"\n'
    )


# --------------------------------------------------------------------------- clients


def build_request(kind: str, port: int) -> bytes:
    """The raw HTTP/1.1 request for one stream of C{kind}."""
    path = "/v1/chat/completions"
    headers = {"x-mock-tokens": "20"}
    body: Any = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "soak"}]}
    if kind == "complete_anthropic":
        path = "/v1/messages"
        body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "soak"}]}
    elif kind == "complete_json":
        body["stream"] = False
    elif kind == "cancel":
        headers = {"x-mock-tokens": "200", "x-mock-delay-ms": "10"}
    elif kind == "reset":
        # A delay between pieces, so that the events before the reset leave
        # the mock (an abort drops what is still in its write buffer).
        headers.update({"x-mock-fault": "reset-mid", "x-mock-delay-ms": "2"})
    elif kind == "status500":
        headers["x-mock-fault"] = "status-500"
    elif kind == "html200":
        headers["x-mock-fault"] = "html-200"
    raw = b"{not json" if kind == "rejected" else json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(raw)}\r\n\r\n"
    return head.encode() + raw


# The first id in a body: the completion's or message's own id, which the
# gateway records as upstream_id in preference to the response header.
_ID = re.compile(rb'"id"\s*:\s*"([^"]+)"')


class Result:
    __slots__ = ("kind", "status", "upstream_id", "gateway_id", "ok", "why")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.status = 0
        self.upstream_id: Optional[str] = None
        # The gateway's own request id (its x-request-id, the ledger's
        # request_id), on every answer, refusals included.
        self.gateway_id: Optional[str] = None
        self.ok = False
        self.why = ""


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """The body of a chunked response and whether its last chunk came."""
    out = []
    i = 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            return b"".join(out), False
        try:
            size = int(data[i:j].split(b";")[0], 16)
        except ValueError:
            return b"".join(out), False
        if size == 0:
            return b"".join(out), True
        out.append(data[j + 2:j + 2 + size])
        i = j + 2 + size + 2
        if i > len(data):
            return b"".join(out), False


async def one(kind: str, port: int, rid: int, timeout: float) -> Result:
    res = Result(kind)
    try:
        await asyncio.wait_for(_one(kind, port, rid, res), timeout)
    except asyncio.TimeoutError:
        res.why = "client timeout"
    except OSError as e:
        res.why = f"socket error {e.__class__.__name__}: {e}"
    return res


async def _one(kind: str, port: int, rid: int, res: Result) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_request(kind, port))
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        res.status = int(lines[0].split(" ")[1])
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        res.gateway_id = hdrs.get("x-request-id")
        res.upstream_id = hdrs.get("x-upstream-request-id") or hdrs.get("request-id")
        if kind == "cancel":
            seen = b""
            while seen.count(b"data:") < 3:
                chunk = await reader.read(65536)
                if not chunk:
                    res.why = f"status {res.status}: the response ended before the client left: {seen[-160:]!r}"
                    return
                seen += chunk
            body_id = _ID.search(seen)
            if body_id:
                res.upstream_id = body_id.group(1).decode()
            if rid % 2:
                writer.transport.abort()  # RST
            else:
                writer.close()  # FIN
            res.ok = res.status == 200
            res.why = "" if res.ok else f"status {res.status}"
            return
        rest = await reader.read()  # Connection: close: the body ends at EOF
        chunked = hdrs.get("transfer-encoding", "").lower() == "chunked"
        body, whole = dechunk(rest) if chunked else (rest, True)
        body_id = _ID.search(body)
        if body_id:
            res.upstream_id = body_id.group(1).decode()
        res.ok, res.why = check(kind, res.status, body, whole)
    finally:
        if not writer.transport.is_closing():
            writer.close()


def observed_outcome(r: Result) -> str:
    """
    The ledger outcome what this client saw calls for: its kind's when it
    got what its kind should give, else judged from the status it got.
    """
    if r.ok:
        return MIX[r.kind][1]
    if r.status == 400:
        return "rejected"
    if r.status >= 500 or r.status == 200:
        return "upstream_error"
    return "unknown"


def check(kind: str, status: int, body: bytes, whole: bool) -> tuple[bool, str]:
    """Whether what the client got is what C{kind} must give."""
    if kind == "complete_chat":
        good = status == 200 and whole and body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
    elif kind == "complete_anthropic":
        good = status == 200 and whole and b"event: message_stop" in body and b"event: error" not in body
    elif kind == "complete_json":
        good = status == 200 and b'"usage"' in body
    elif kind == "reset":
        # Relayed as a stream that ends in an error event, never a [DONE].
        good = status == 200 and whole and b"stream_interrupted" in body and b"[DONE]" not in body
    elif kind == "status500":
        good = status == 500
    elif kind == "html200":
        good = status == 502
    elif kind == "rejected":
        good = status == 400
    else:
        raise AssertionError(kind)
    return good, "" if good else f"status {status} complete={whole} body={body[-160:]!r}"


# --------------------------------------------------------------------------- load


class Load:
    def __init__(self, n: int, concurrency: int, port: int, timeout: float, deadline: float, seed: int) -> None:
        rng = random.Random(seed)
        kinds = list(MIX)
        weights = [MIX[k][0] for k in kinds]
        self.plan = rng.choices(kinds, weights, k=n)
        self.n = n
        self.concurrency = concurrency
        self.port = port
        self.timeout = timeout
        self.deadline = deadline
        self.next = 0
        self.done = 0
        self.results: list[Result] = []
        self.milestones: dict[int, Any] = {}

    async def worker(self, on_done: Any) -> None:
        while self.next < self.n and time.monotonic() < self.deadline:
            i = self.next
            self.next += 1
            r = await one(self.plan[i], self.port, i, self.timeout)
            self.results.append(r)
            self.done += 1
            on_done(self.done)

    async def run(self, on_done: Any) -> None:
        await asyncio.gather(*(self.worker(on_done) for _ in range(self.concurrency)))


def settle_fds(gw: Proc, floor: int, seconds: float) -> int:
    """The gateway's fd count once it stops falling (or after C{seconds})."""
    end = time.monotonic() + seconds
    last = gw.fds()
    while time.monotonic() < end and last > floor:
        time.sleep(0.5)
        now = gw.fds()
        if now == last:
            break
        last = now
    return gw.fds()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=50_000, help="requests to send (default 50000)")
    ap.add_argument("-c", "--concurrency", type=int, default=200, help="requests in flight (default 200)")
    ap.add_argument("--warmup", type=int, default=None, help="requests before the baseline RSS (default n/10)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--max-seconds", type=float, default=1200.0, help="stop sending new requests after this")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--idle-wait", type=float, default=75.0, metavar="SECONDS",
                    help="after the run, wait up to this long for the fd count to fall back to the start's "
                         "(idle pooled connections close after 60 s); 0 to skip")
    ap.add_argument("--workers", type=int, default=1,
                    help="gateway worker processes (default 1: the figures are that process's)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--gc-trace", type=float, default=0.0, metavar="SECONDS",
                    help="log the gateway's object counts per type every SECONDS and report the growth")
    ap.add_argument("--mix", help="weights instead of the default mix, e.g. complete_chat=9,cancel=1")
    args = ap.parse_args()
    if args.mix:
        weights = {k: int(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
        for k in list(MIX):
            MIX[k] = (weights.pop(k, 0), MIX[k][1])
        if weights:
            ap.error(f"unknown kinds {sorted(weights)}; known: {sorted(MIX)}")
    warmup = args.warmup if args.warmup is not None else max(1, args.n // 10)

    work = tempfile.mkdtemp(prefix="llmgate-soak-")
    ledger = os.path.join(work, "usage.db")
    conf = os.path.join(work, "llmgate.toml")
    mock = Proc("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], work)
    with open(conf, "w") as f:
        f.write(gateway_config(mock.port, ledger))
    # One process by default: RSS and file descriptors are read from its pid.
    gw = Proc("llmgate", ["--config", conf, "--workers", str(args.workers), "--port", "tcp:0:interface=127.0.0.1"], work,
              env={"SOAK_UPSTREAM_KEY": "soak-key"}, gc_trace=args.gc_trace)
    gw_started = time.monotonic()
    anomalies: list[str] = []
    fig: dict[str, Any] = {"n": args.n, "concurrency": args.concurrency, "warmup": warmup, "workdir": work}
    try:
        fig["fds_start"] = gw.fds()
        fig["rss_start_kb"] = gw.rss_kb()
        load = Load(args.n, args.concurrency, gw.port, args.timeout, time.monotonic() + args.max_seconds, args.seed)
        t0 = time.monotonic()
        step = max(1, args.n // 10)

        def on_done(done: int) -> None:
            if done == warmup:
                fig["warm_at_s"] = time.monotonic() - gw_started
                fig["rss_warm_kb"] = gw.rss_kb()
                fig["fds_warm"] = gw.fds()
            if done % step == 0 or done == args.n:
                el = time.monotonic() - t0
                rss = gw.rss_kb()
                fig.setdefault("rss_trend_kb", []).append((done, rss))
                print(f"  {done:>7} done  {done / el:7.0f} req/s  gateway RSS {rss / 1024:6.1f} MB  fds {gw.fds()}",
                      flush=True)

        asyncio.run(load.run(on_done))
        elapsed = time.monotonic() - t0
        fig["sent"] = load.done
        fig["seconds"] = round(elapsed, 1)
        fig["req_per_s"] = round(load.done / elapsed, 1)
        if load.done < args.n:
            anomalies.append(f"deadline: only {load.done} of {args.n} requests were sent in {args.max_seconds:.0f} s")
        time.sleep(2)  # let cancellations and records settle
        fig["rss_end_kb"] = gw.rss_kb()
        fig["fds_end"] = settle_fds(gw, fig["fds_start"], 15)
        fig["sockets_end"] = gw.sockets()
        fig["mock_fds_end"] = mock.fds()
        if args.idle_wait > 0:
            # The idle pooled upstream connections close after the pool's
            # cachedConnectionTimeout (60 s): then the count is back at the
            # start's, or something leaked.
            deadline = time.monotonic() + args.idle_wait
            while time.monotonic() < deadline and gw.fds() > fig["fds_start"]:
                time.sleep(1)
            fig["fds_idle"] = gw.fds()
            if fig["fds_idle"] > fig["fds_start"]:
                anomalies.append(f"fds: {fig['fds_start']} at start, {fig['fds_idle']} after {args.idle_wait:.0f} s idle")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mock.port}/mock/stats", timeout=10) as resp:
                fig["mock_stats"] = json.loads(resp.read())
        except OSError as e:
            fig["mock_stats"] = str(e)
        if "rss_warm_kb" in fig:
            fig["rss_ratio_end_over_warm"] = round(fig["rss_end_kb"] / fig["rss_warm_kb"], 3)
        rc = gw.stop(grace=120)
        fig["gateway_exit"] = rc
        if rc not in (0, -signal.SIGTERM):
            anomalies.append(f"gateway exit status {rc} after SIGTERM")
    finally:
        gw.kill()
        mock.stop(10)
        mock.kill()

    # What the clients saw.
    results = load.results
    by_kind = Counter(r.kind for r in results)
    bad = [r for r in results if not r.ok]
    fig["client_kinds"] = dict(by_kind)
    fig["client_unexpected"] = len(bad)
    for why, count in Counter((r.kind, r.why[:200]) for r in bad).most_common(8):
        anomalies.append(f"client saw the unexpected {count}x: {why}")

    # The ledger.
    db = sqlite3.connect(ledger)
    rows = db.execute("SELECT request_id, upstream_id, outcome, status, route FROM usage").fetchall()
    db.close()
    fig["ledger_rows"] = len(rows)
    if len(rows) != len(results):
        anomalies.append(f"ledger has {len(rows)} rows for {len(results)} requests")
    want = Counter(observed_outcome(r) for r in results)
    got = Counter(row[2] for row in rows)
    fig["ledger_outcomes"] = dict(got)
    fig["expected_outcomes"] = dict(want)
    if got != want:
        anomalies.append(f"ledger outcomes {dict(got)} != what the clients did {dict(want)}")
    # One record per request: by the gateway's request id where the client
    # saw one (every answer of a current gateway), else by the upstream's.
    by_request: dict[str, list[str]] = {}
    by_upstream: dict[str, list[str]] = {}
    for rid, uid, outcome, _, _ in rows:
        by_request.setdefault(rid, []).append(outcome)
        if uid:
            by_upstream.setdefault(uid, []).append(outcome)

    def record_of(r: Result) -> Optional[list[str]]:
        if r.gateway_id:
            return by_request.get(r.gateway_id)
        return by_upstream.get(r.upstream_id) if r.upstream_id else None

    seen = [r for r in results if r.gateway_id or r.upstream_id]
    dup = {k: v for k, v in by_upstream.items() if len(v) > 1}
    missing = [r for r in seen if record_of(r) is None]
    wrong = [r for r in seen if record_of(r) is not None and record_of(r)[0] != observed_outcome(r)]
    fig["matched_by_request_id"] = sum(1 for r in results if r.gateway_id and r.gateway_id in by_request)
    fig["matched_by_upstream_id"] = sum(1 for r in results if not r.gateway_id and r.upstream_id in by_upstream)
    fig["duplicate_records"] = len(dup)
    fig["missing_records"] = len(missing)
    fig["wrong_outcome_records"] = len(wrong)
    if dup:
        anomalies.append(f"{len(dup)} upstream ids with more than one record, e.g. {list(dup.items())[:3]}")
    if missing:
        anomalies.append(f"{len(missing)} requests with no record, e.g. {[(r.kind, r.gateway_id or r.upstream_id) for r in missing[:5]]}")
    if wrong:
        anomalies.append(f"{len(wrong)} records with the wrong outcome, e.g. "
                         f"{[(r.kind, r.gateway_id or r.upstream_id, record_of(r)) for r in wrong[:5]]}")

    # Leaks.
    if "rss_warm_kb" in fig and fig["rss_ratio_end_over_warm"] > 1.2:
        anomalies.append(f"RSS grew from {fig['rss_warm_kb']} kB after warm-up to {fig['rss_end_kb']} kB at the end")
    trend = fig.get("rss_trend_kb", [])
    if len(trend) >= 4:
        mid = trend[len(trend) // 2 - 1][1]
        fig["rss_ratio_end_over_half"] = round(trend[-1][1] / mid, 3)
        if trend[-1][1] > mid * 1.05:
            anomalies.append(f"RSS still rising in the second half: {mid} kB at {trend[len(trend) // 2 - 1][0]} "
                             f"requests, {trend[-1][1]} kB at {trend[-1][0]}")
    if "fds_warm" in fig and fig["fds_end"] > max(fig["fds_start"], fig["fds_warm"]) + 20:
        anomalies.append(f"fds: {fig['fds_start']} at start, {fig['fds_warm']} after warm-up, {fig['fds_end']} at the end")

    if args.gc_trace and "warm_at_s" in fig:
        fig["gc_growth_after_warmup"] = gc_growth(gw.log_path, fig["warm_at_s"] / args.gc_trace)
    fig["anomalies"] = anomalies
    print(json.dumps(fig, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    if anomalies:
        print("\nFOUND:\n  " + "\n  ".join(anomalies), file=sys.stderr)
        print(f"gateway log: {gw.log_path}", file=sys.stderr)
        return 1
    print("\nno leak, no missing or duplicate record")
    return 0


if __name__ == "__main__":
    sys.exit(main())

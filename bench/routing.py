#!/usr/bin/env python3
"""Routing scenarios for llmgate (issue 11). Python stdlib only.

Two mock upstreams (bench/upstream, started fresh with their faults for every
peer, so each peer meets the same seeded sequence of slow or failing
requests), one public model served by both (equal weight), and the Go load
generator (bench/loadgen) in a closed loop. After each llmgate peer has
stopped, its SQLite ledger is read (stdlib sqlite3) for the attempt rows.

HEDGE   A fast; B slow on 10% of requests (first event after 2 s). Peers:
        direct-a (the fast deployment's own TTFT), llmgate-a-only (llmgate
        over A alone: the gateway's own floor at this load), llmgate (both,
        no hedging), llmgate-hedge (hedge_after = 0.25), llmgate-hedge-p95
        (hedge_after = "p95"), llmgate-latency ([routing] balance =
        "latency") and llmgate-latency-hedge (latency + "p95"). Reports TTFT p50/p99, the p99 ratios to
        direct-a (issue 11's target for the hedged peers: <= 1.2x) and to
        llmgate-a-only, the hedge rate and the losers' tokens and cost
        (ledger rows with outcome "hedge_lost").
FAIL30  A healthy; B answers 30% of requests 503 at once (FAIL30-500: 500;
        FAIL30-RESET: the connection is reset). Peers: direct-a, direct-b,
        llmgate (default routing). Reports client-visible errors (target 0),
        the failed-attempt rows (outcome "upstream_error", with a
        parent_request_id), retries per request and TTFT p99 vs direct-a.

A peer whose configuration `llmgate check-config` refuses (e.g. hedge_after
before hedging exists) is reported as "n/a: config rejected", not run.

    .venv/bin/python bench/routing.py                         # HEDGE,FAIL30,FAIL30-500,FAIL30-RESET
    .venv/bin/python bench/routing.py --scenarios HEDGE --repeat 3
    .venv/bin/python bench/routing.py --smoke                 # tiny CI run

(from the repository root, with the Python that has llmgate installed.)
JSON goes to bench/out/routing-<time>.json; markdown tables to stdout.
See docs/benchmarks.md, "Routing scenarios".
"""

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the main runner: build, processes, load generator)

MODEL = "gpt-4o-mini"  # the load generator's default model; priced in prices.json
DEFAULT_SCENARIOS = ("HEDGE", "FAIL30", "FAIL30-500", "FAIL30-RESET")
SMOKE_SCENARIOS = ("HEDGE", "FAIL30")


# --------------------------------------------------------------------------- scenarios

def scenarios(smoke=False, concurrency=100, hold=20.0):
    """Scenario parameters: the load (as bench/run.py's: c, tokens, delay ms,
    ramp s, hold s), each upstream's fault flags, and the peers. A peer is
    (name, target) with target "a"/"b" (direct to that upstream) or a dict
    of llmgate settings (hedge_after; absent = hedging off; only = the one
    upstream the model uses, for the gateway's own floor without the slow
    deployment)."""
    load = dict(c=concurrency, tokens=30, delay=20, ramp=1.0, hold=hold)
    slow_ttft = 2.0
    if smoke:
        load = dict(c=5, tokens=5, delay=10, ramp=0.2, hold=1.0, smoke=True)
        slow_ttft = 0.3
    hedge = dict(
        desc="A fast; B slow (first event after %g s) on 10%% of its requests" % slow_ttft,
        kind="hedge", upstreams={"a": [], "b": ["-slow-fraction", "0.1", "-slow-ttft", "%g" % slow_ttft]},
        peers=[("direct-a", "a"), ("llmgate-a-only", {"only": "a"}), ("llmgate", {}),
               ("llmgate-hedge", {"hedge_after": 0.25}), ("llmgate-hedge-p95", {"hedge_after": "p95"}),
               ("llmgate-latency", {"routing.balance": "latency"}),
               ("llmgate-latency-hedge", {"routing.balance": "latency", "hedge_after": "p95"})], **load)
    fail = lambda status, what: dict(
        desc="A healthy; B %s on 30%% of its requests" % what, kind="fail",
        upstreams={"a": [], "b": ["-fail-fraction", "0.3", "-fail-status", str(status)]},
        peers=[("direct-a", "a"), ("direct-b", "b"), ("llmgate", {})], **load)
    sc = {
        "HEDGE": hedge,
        "FAIL30": fail(503, "answers 503 at once"),
        "FAIL30-500": fail(500, "answers 500 at once"),
        "FAIL30-RESET": fail(0, "resets the connection before answering"),
    }
    if smoke:  # seconds, not minutes: one hedged peer, no direct-b, no llmgate-a-only
        sc["HEDGE"]["peers"] = [p for p in sc["HEDGE"]["peers"] if p[0] in ("direct-a", "llmgate", "llmgate-hedge")]
        for name in ("FAIL30", "FAIL30-500", "FAIL30-RESET"):
            sc[name]["peers"] = [p for p in sc[name]["peers"] if p[0] != "direct-b"]
    return sc


def _toml_value(v):
    return json.dumps(v) if isinstance(v, str) else repr(v)


def routing_config(up_ports, ledger_path, model_settings=None):
    """llmgate's TOML: providers a and b (one mock upstream each), one model
    over both at equal weight, the model's extra settings (e.g. hedge_after;
    a "routing.NAME" key goes to [routing] as NAME), the ledger at
    ledger_path."""
    lines = []
    for name, port in sorted(up_ports.items()):
        lines += ['[providers.%s]' % name, 'kind = "openai"',
                  'base_url = "http://127.0.0.1:%d/v1"' % port, '']
    deps = ", ".join('{provider = "%s", upstream_model = "%s", weight = 1}' % (n, MODEL)
                     for n in sorted(up_ports))
    lines += ['[models."%s"]' % MODEL, "deployments = [%s]" % deps]
    settings = sorted((model_settings or {}).items())
    for k, v in settings:
        if not k.startswith("routing."):
            lines.append("%s = %s" % (k, _toml_value(v)))
    routing = [(k.split(".", 1)[1], v) for k, v in settings if k.startswith("routing.")]
    if routing:
        lines += ["", "[routing]"] + ["%s = %s" % (k, _toml_value(v)) for k, v in routing]
    lines += ["", "[ledger]", "path = %s" % json.dumps(ledger_path), ""]
    return "\n".join(lines)


def peer_deployments(up_ports, settings):
    """(upstreams, model settings) of an llmgate peer: `only` keeps one
    upstream and is not a model setting."""
    settings = dict(settings)
    only = settings.pop("only", None)
    return ({only: up_ports[only]} if only else dict(up_ports)), settings


def check_config(path):
    """None when `llmgate check-config` accepts the file, else its message."""
    r = subprocess.run([sys.executable, "-c", "import sys; from llmgate.cli import main; sys.exit(main())",
                        "check-config", path], capture_output=True, text=True, timeout=60)
    if r.returncode == 0:
        return None
    return (r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else "exit %d" % r.returncode


# --------------------------------------------------------------------------- ledger

def ledger_summary(path, since):
    """What the ledger says about the requests that started at or after
    `since` (unix s; the warm-up's rows come before): client-facing records
    (parent_request_id NULL) by outcome, how many were hedged, and the
    attempt rows (parent_request_id set) by outcome with their tokens and
    cost. Columns a ledger lacks (`hedged` before hedging exists) count as
    unknown (None)."""
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        cols = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
        rows = conn.execute(
            "SELECT outcome, parent_request_id IS NOT NULL, COUNT(*), COALESCE(SUM(output_tokens), 0), "
            "COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cost_usd), 0), "
            "%s FROM usage WHERE ts >= ? GROUP BY 1, 2" % ("SUM(hedged)" if "hedged" in cols else "NULL"),
            (since,)).fetchall()
    finally:
        conn.close()
    out = {"client_requests": 0, "client_outcomes": {}, "hedged": None if "hedged" not in cols else 0,
           "attempt_rows": 0, "attempt_outcomes": {}, "client_cost_usd": 0.0}
    for outcome, is_attempt, n, out_tok, in_tok, cost, hedged in rows:
        if is_attempt:
            out["attempt_rows"] += n
            out["attempt_outcomes"][outcome] = {"rows": n, "output_tokens": out_tok,
                                                "input_tokens": in_tok, "cost_usd": cost}
        else:
            out["client_requests"] += n
            out["client_outcomes"][outcome] = n
            out["client_cost_usd"] += cost
            if out["hedged"] is not None:
                out["hedged"] += hedged or 0
    return out


def attempt_figures(ledger):
    """Derived figures: failed attempts, retries per client request, hedge
    rate, and the losing hedges' tokens and cost (share of the clients')."""
    n = ledger["client_requests"]
    failed = ledger["attempt_outcomes"].get("upstream_error", {}).get("rows", 0)
    lost = ledger["attempt_outcomes"].get("hedge_lost", {})
    # Each hedge leaves exactly one loser; the hedged column, when present, counts them directly.
    hedges = ledger["hedged"] if ledger["hedged"] is not None else lost.get("rows", 0)
    return {
        "failed_attempts": failed,
        "retries_per_request": failed / n if n else None,
        "hedges": hedges,
        "hedge_rate": hedges / n if n else None,
        "hedge_lost_rows": lost.get("rows", 0),
        "hedge_lost_output_tokens": lost.get("output_tokens", 0),
        "hedge_lost_cost_usd": lost.get("cost_usd", 0.0),
        "hedge_lost_cost_share": (lost.get("cost_usd", 0.0) / ledger["client_cost_usd"]
                                  if ledger["client_cost_usd"] else None),
    }


# --------------------------------------------------------------------------- running

def start_upstreams(faults, workdir, tag):
    """Start one mock upstream per name with its fault flags; {name: (proc, port)}."""
    ups = {}
    try:
        for name, flags in sorted(faults.items()):
            port = run.free_port()
            proc = run.start([os.path.join(run.BIN, "upstream"), "-addr", "127.0.0.1:%d" % port] + flags,
                             os.path.join(workdir, "upstream-%s-%s.log" % (tag, name)))
            ups[name] = (proc, port)
            run.wait_port(port, 10, proc)
    except Exception:
        for proc, _ in ups.values():
            run.stop(proc)
        raise
    return ups


def start_llmgate(name, up_ports, settings, workdir):
    """Start llmgate over the upstreams; (proc, url, ledger) or raises
    run.Unavailable when check-config refuses the configuration."""
    up_ports, settings = peer_deployments(up_ports, settings)
    tmp = tempfile.mkdtemp(prefix=name + "-", dir=workdir)
    ledger = os.path.join(tmp, "usage.db")
    conf = os.path.join(tmp, "llmgate.toml")
    with open(conf, "w") as f:
        f.write(routing_config(up_ports, ledger, settings))
    refused = check_config(conf)
    if refused:
        raise run.Unavailable("n/a: config rejected (%s)" % refused[:160])
    port = run.free_port()
    log = os.path.join(workdir, "%s.log" % name)
    extra = ["--workers", "1"] if run.has_workers_option() else []
    proc = run.start([run.twistd_path(), "-n", "--pidfile=", "llmgate", "--config", conf] + extra +
                     ["--port", "tcp:%d:interface=127.0.0.1" % port], log, cwd=tmp, env=run.llmgate_env())
    try:
        run.wait_port(port, 30, proc)
    except RuntimeError as e:
        run.stop(proc)
        with open(log, "rb") as f:
            tail = f.read()[-1500:].decode("utf-8", "replace")
        raise RuntimeError("%s failed to start: %s\n%s" % (name, e, tail))
    return proc, "http://127.0.0.1:%d/v1/chat/completions" % port, ledger


def run_case(sc, peer, target, workdir, tag):
    """One peer through one scenario, with fresh upstreams. A metrics dict,
    or {'unavailable': why} / {'failed': why}."""
    ups = start_upstreams(sc["upstreams"], workdir, tag)
    up_ports = {n: p for n, (_, p) in ups.items()}
    proc = ledger = None
    try:
        try:
            if isinstance(target, str):
                url = "http://127.0.0.1:%d/v1/chat/completions" % up_ports[target]
            else:
                proc, url, ledger = start_llmgate(peer, up_ports, target, workdir)
        except run.Unavailable as e:
            return {"unavailable": str(e)}
        except Exception as e:
            return {"failed": str(e)}
        run.warmup(url, up_ports["a"], sc.get("smoke"))
        for port in up_ports.values():
            run.http_json("http://127.0.0.1:%d/reset" % port, data=b"")
        since = time.time()
        lg_proc, timeout = run.run_loadgen(url, sc, up_ports["a"], keepalive=False)
        try:
            out, err = lg_proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            lg_proc.kill()
            lg_proc.communicate()
            return {"failed": "loadgen timed out after %ss" % timeout}
        if lg_proc.returncode != 0:
            return {"failed": "loadgen exit %s: %s" % (lg_proc.returncode, err[-500:].decode())}
        lg = json.loads(out)
        m = {"launched": lg["launched"], "ok_streams": lg["ok_streams"], "errors": lg["errors"],
             "error_kinds": lg["error_kinds"], "wall_s": lg["wall_s"],
             "ttft_p50_ms": lg["ttft_ms"].get("p50"), "ttft_p90_ms": lg["ttft_ms"].get("p90"),
             "ttft_p99_ms": lg["ttft_ms"].get("p99"), "ttft_max_ms": lg["ttft_ms"].get("max"),
             "upstreams": {n: run.http_json("http://127.0.0.1:%d/stats" % p) for n, p in up_ports.items()}}
        if proc is not None and proc.poll() is not None:
            m["error_kinds"]["peer exited with %s" % proc.returncode] = 1
    finally:
        run.stop(proc)
        for p, _ in ups.values():
            run.stop(p)
    if ledger:
        if os.path.exists(ledger):
            m["ledger"] = ledger_summary(ledger, since)
            m.update(attempt_figures(m["ledger"]))
        else:
            m["ledger"] = None
    return m


# --------------------------------------------------------------------------- reporting

def pct(x):
    return "-" if x is None else "%.1f%%" % (100 * x)


def p99_ratio(m, base):
    """A peer's TTFT p99 over the fast deployment's own (direct-a)."""
    a, b = m.get("ttft_p99_ms"), base.get("ttft_p99_ms")
    return a / b if a is not None and b else None


HEDGE_COLUMNS = ("peer | ok/launched | err | TTFT p50 ms | TTFT p99 ms | p99 / direct-a p99 (target <= 1.2x) | "
                 "p99 / llmgate-a-only p99 | "
                 "hedges (rate) | hedge_lost rows | losers' output tokens | losers' cost USD (share) | "
                 "B slowed | upstream cancels")
FAIL_COLUMNS = ("peer | ok/launched | client errors (target 0) | TTFT p50 ms | TTFT p99 ms | +p99 vs direct-a ms | "
                "failed attempts (upstream_error rows) | retries/request | B failed")


def _row(peer, m, base, kind, floor=None):
    if "failed" in m:
        return "| %s | FAILED: %s |" % (peer, m["failed"].splitlines()[0][:150])
    if "unavailable" in m:
        return "| %s | %s |" % (peer, m["unavailable"])
    f = run.fmt
    ups = m.get("upstreams", {})
    gated = "ledger" in m
    common = [peer, "%d/%d" % (m["ok_streams"], m["launched"]), f(m["errors"]),
              f(m["ttft_p50_ms"]), f(m["ttft_p99_ms"])]
    if kind == "hedge":
        r, rf = p99_ratio(m, base), p99_ratio(m, floor or {})
        cells = common + [
            "" if peer == "direct-a" else ("-" if r is None else "%.2fx" % r),
            "" if peer in ("direct-a", "llmgate-a-only") else ("-" if rf is None else "%.2fx" % rf),
            "%s (%s)" % (f(m.get("hedges")), pct(m.get("hedge_rate"))) if gated else "",
            f(m.get("hedge_lost_rows")) if gated else "",
            f(m.get("hedge_lost_output_tokens")) if gated else "",
            ("%.6f (%s)" % (m.get("hedge_lost_cost_usd") or 0.0, pct(m.get("hedge_lost_cost_share")))) if gated else "",
            f(ups.get("b", {}).get("slowed")),
            f(sum(u.get("cancelled", 0) for u in ups.values())),
        ]
    else:
        cells = common + [
            "" if peer == "direct-a" else run.diff(m["ttft_p99_ms"], base.get("ttft_p99_ms")),
            f(m.get("failed_attempts")) if gated else "",
            ("%.3f" % m["retries_per_request"]) if gated and m.get("retries_per_request") is not None else "",
            f(ups.get("b", {}).get("failed")),
        ]
    return "| " + " | ".join(cells) + " |"


def markdown(results, scen):
    lines = []
    for name, peers in results.items():
        sc = scen[name]
        cols = HEDGE_COLUMNS if sc["kind"] == "hedge" else FAIL_COLUMNS
        lines += ["", "### %s: %s" % (name, sc["desc"]),
                  "c=%(c)d closed loop for %(hold)g s, tokens=%(tokens)d, delay=%(delay)d ms; "
                  "one model over deployments A and B, weight 1 each" % sc, "",
                  "| " + cols + " |", "|" + "---|" * (cols.count("|") + 1)]
        base = peers.get("direct-a", {})
        for peer, m in peers.items():
            lines.append(_row(peer, m, base, sc["kind"], peers.get("llmgate-a-only")))
        for peer, m in peers.items():
            if m.get("error_kinds"):
                lines.append("\n%s errors: %s" % (peer, json.dumps(m["error_kinds"])[:300]))
            if "ledger" in m and m["ledger"] is not None:
                lines.append("\n%s ledger: client %s; attempts %s" % (
                    peer, json.dumps(m["ledger"]["client_outcomes"]),
                    json.dumps({k: v["rows"] for k, v in m["ledger"]["attempt_outcomes"].items()})))
    return "\n".join(lines)


def smoke_check(results):
    """Smoke mode: numbers exist for every peer that could run, and no client
    of llmgate saw an error in FAIL30 (a 503 a retry hides). No timing."""
    bad = []
    for name, peers in results.items():
        for peer, m in peers.items():
            if "unavailable" in m:
                continue
            if "failed" in m or not m.get("ok_streams") or m.get("ttft_p50_ms") is None:
                bad.append("%s/%s: %s" % (name, peer, m.get("failed", "no numbers")))
            elif peer.startswith("llmgate") and not m.get("ledger"):
                bad.append("%s/%s: no ledger rows" % (name, peer))
            elif name.startswith("FAIL30") and peer.startswith("llmgate") and m["errors"]:
                bad.append("%s/%s: %s client errors" % (name, peer, m["errors"]))
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=None, help="comma-separated, from %s" % ",".join(DEFAULT_SCENARIOS))
    ap.add_argument("--peers", default=None, help="only these peers (comma-separated)")
    ap.add_argument("-c", "--concurrency", type=int, default=100, help="concurrent streams (closed loop)")
    ap.add_argument("--hold", type=float, default=20.0, help="seconds each run keeps starting streams")
    ap.add_argument("--repeat", type=int, default=1, help="repeats; medians are reported")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (HEDGE, FAIL30; seconds)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the Go parts")
    ap.add_argument("--out", help="JSON output path (default bench/out/routing-<time>.json)")
    ap.add_argument("--report", metavar="JSON", help="only print the tables of an earlier run's JSON")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            doc = json.load(f)
        print(markdown(doc["results"], doc["scenarios"]))
        return
    scen = scenarios(args.smoke, args.concurrency, args.hold)
    names = (args.scenarios.split(",") if args.scenarios
             else list(SMOKE_SCENARIOS if args.smoke else DEFAULT_SCENARIOS))
    for n in names:
        if n not in scen:
            ap.error("unknown scenario %s" % n)
    only = set(args.peers.split(",")) if args.peers else None
    run.raise_nofile()
    if not run.ensure_built(args.rebuild):
        print("SKIPPED: `go` not found and bench/bin/ not built; install Debian's golang-go", file=sys.stderr)
        sys.exit(0 if args.smoke else 2)
    os.makedirs(run.OUT, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    facts = run.machine_facts()
    workdir = tempfile.mkdtemp(prefix="llmgate-routing-")
    t0 = time.time()
    raw = {}
    for rep in range(args.repeat):
        for n in names:
            for peer, target in scen[n]["peers"]:
                if only and peer not in only:
                    continue
                print("[%5.0fs] repeat %d %s %s ..." % (time.time() - t0, rep + 1, n, peer), file=sys.stderr, flush=True)
                raw.setdefault(n, {}).setdefault(peer, []).append(
                    run_case(scen[n], peer, target, workdir, "%s-%s-%d" % (n, peer, rep)))
                time.sleep(0.1 if args.smoke else 1)
    results = {n: {p: run.median_of(rs) for p, rs in peers.items()} for n, peers in raw.items()}
    doc = {"time": stamp, "machine": facts, "args": vars(args), "scenarios": scen, "workdir": workdir,
           "results": results, "raw": raw, "elapsed_s": time.time() - t0}
    path = args.out or os.path.join(run.OUT, "routing-%s%s.json" % ("smoke-" if args.smoke else "", stamp))
    run.save(doc, path)
    mf = facts
    print("# llmgate routing scenarios %s (%s, nproc=%s, %s, llmgate %s); JSON: %s" % (
        stamp, mf["cpu_model"], mf["nproc"], mf["go"], mf["git_head"], os.path.relpath(path, run.REPO)))
    print(markdown(results, scen))
    if args.smoke:
        run.smoke_verdict(smoke_check(results), t0)


if __name__ == "__main__":
    main()

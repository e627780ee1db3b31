#!/usr/bin/env python3
"""Benchmark runner for llmgate (issue 4). Python stdlib only.

Builds the Go parts (bench/bin/), starts the mock upstream, then for every
repeat x scenario x peer: starts the peer fresh, warms it up, measures its idle
RSS, runs the Go load generator through it while sampling /proc for the peer,
the upstream and the load generator, and stops the peer. Writes a JSON file to
bench/out/ and prints markdown tables (medians over repeats) to stdout.

    /work/venv/bin/python bench/run.py --peers direct,goproxy,llmgate --scenarios S1,S2 --scale 0.5
    /work/venv/bin/python bench/run.py --smoke      # tiny CI run, asserts only that numbers exist

See docs/benchmarks.md for what the scenarios and columns mean.
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
BIN = os.path.join(BENCH, "bin")
OUT = os.path.join(BENCH, "out")
GO_PARTS = ("upstream", "loadgen", "goproxy")
ALL_PEERS = ("direct", "goproxy", "llmgate", "llmgate-bare")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- scenarios

def nofile_hard():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def scenarios(scale, smoke):
    """Scenario parameters. c = concurrent streams, delay in ms, ramp in s."""
    s5_cap = min(20000, (nofile_hard() - 500) // 2)  # a proxy holds 2 sockets per stream
    sc = {
        "S1": dict(desc="1,000 streams x 50 tokens x 100 ms (the blog's test)",
                   c=1000, tokens=50, delay=100, ramp=2.0),
        "S2": dict(desc="200 streams x 200 tokens x 10 ms (event throughput)",
                   c=200, tokens=200, delay=10, ramp=1.0),
        "S3": dict(desc="5,000 open streams x 50 tokens x 200 ms (memory per stream)",
                   c=5000, tokens=50, delay=200, ramp=5.0),
        "S4": dict(desc="100 clients abort after 5 tokens (cancellation reaches the upstream)",
                   c=100, tokens=50, delay=100, ramp=1.0, abort_after=5),
        "S5": dict(desc="ramp at 1,000/s until failure or %d streams (max concurrent streams)" % s5_cap,
                   c=s5_cap, tokens=0, delay=1000, ramp=s5_cap / 1000.0, stop_on_error=True),
    }
    for s in sc.values():
        if smoke:
            s.update(c=5, tokens=5, delay=10, ramp=0.2, smoke=True)
            if "abort_after" in s:
                s["abort_after"] = 2
            continue
        s["c"] = max(1, int(round(s["c"] * scale)))
        if s.get("stop_on_error"):  # S5: keep the 1,000/s rate; streams outlive the ramp by 10 s
            s["ramp"] = s["c"] / 1000.0
            s["tokens"] = int(s["ramp"]) + 10
    return sc


# --------------------------------------------------------------------------- processes

def raise_nofile():
    """Raise the soft fd limit to the hard one; the processes we start inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with %s before listening" % proc.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("port %d not accepting connections after %ss" % (port, timeout))


def start(argv, log_path, cwd=None, env=None):
    log = open(log_path, "ab")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                            start_new_session=True)


def stop(proc, timeout=10):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def http_json(url, data=None, timeout=5):
    with urllib.request.urlopen(url, data=data, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


# --------------------------------------------------------------------------- build

def go_available():
    return shutil.which("go") is not None


def ensure_built(force=False):
    """Build the Go parts into bench/bin/ when missing or older than the sources."""
    missing = []
    for part in GO_PARTS:
        exe, src = os.path.join(BIN, part), os.path.join(BENCH, part, "main.go")
        if force or not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
            missing.append(part)
    if not missing:
        return True
    if not go_available():
        return False
    env = dict(os.environ)
    if not os.access(os.path.expanduser("~"), os.W_OK):
        env.setdefault("GOCACHE", os.path.join(BIN, ".gocache"))
    env.setdefault("GOFLAGS", "-mod=mod")
    os.makedirs(BIN, exist_ok=True)
    subprocess.run(["go", "build", "-o", BIN + "/"] + ["./" + p for p in missing],
                   cwd=BENCH, env=env, check=True, timeout=300)
    return True


# --------------------------------------------------------------------------- /proc sampling

def _children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return []


def proc_sample(pid):
    """(rss_kb, peak_rss_kb, cpu_seconds) of a live process and its descendants
    (llmgate --workers N: the supervisor and its workers), or None.  CPU also
    counts reaped children (cutime/cstime), e.g. a worker that was replaced."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/%d/status" % pid) as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except (OSError, IndexError):
        return None
    # utime, stime, cutime, cstime (fields 14-17)
    cpu = sum(int(x) for x in fields[11:15]) / CLK_TCK
    kb = lambda k: int(status.get(k, "0 kB").split()[0])
    rss, hwm = kb("VmRSS"), kb("VmHWM")
    for child in _children(pid):
        sub = proc_sample(child)
        if sub:
            rss, hwm, cpu = rss + sub[0], hwm + sub[1], cpu + sub[2]
    return rss, hwm, cpu


class Sampler(threading.Thread):
    """Samples RSS and CPU of named pids every `interval` seconds."""

    def __init__(self, pids, interval=0.1):
        super().__init__(daemon=True)
        self.pids, self.interval = dict(pids), interval
        self.samples = {name: [] for name in self.pids}  # name -> [(t, rss_kb, hwm_kb, cpu_s)]
        self._halt = threading.Event()

    def add(self, name, pid):
        self.samples.setdefault(name, [])
        self.pids[name] = pid

    def run(self):
        while not self._halt.is_set():
            t = time.time()
            for name, pid in list(self.pids.items()):
                s = proc_sample(pid)
                if s:
                    self.samples[name].append((t,) + s)
            self._halt.wait(self.interval)

    def finish(self):
        self._halt.set()
        self.join(5)
        return self.samples


# --------------------------------------------------------------------------- peers

LLMGATE_CONF = """\
[providers.bench]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}/v1"
default = true
"""


def llmgate_config(tmp, up_port, bare):
    conf = LLMGATE_CONF.format(up_port=up_port)
    if bare:
        conf += "\n[accounting]\nenabled = false\n\n[ledger]\nenabled = false\n"
    else:
        conf += '\n[ledger]\npath = "%s"\n' % os.path.join(tmp, "usage.db")
    path = os.path.join(tmp, "llmgate.toml")
    with open(path, "w") as f:
        f.write(conf)
    return path


def start_peer(name, up_port, workdir, backlog=None, workers=None):
    """Start a peer; return (process or None, chat completions URL, ledger path or None)."""
    ledger = None
    if name == "direct":
        return None, "http://127.0.0.1:%d/v1/chat/completions" % up_port, ledger
    port = free_port()
    log = os.path.join(workdir, "%s.log" % name)
    if name == "goproxy":
        proc = start([os.path.join(BIN, "goproxy"), "-addr", "127.0.0.1:%d" % port,
                      "-upstream", "http://127.0.0.1:%d" % up_port], log)
        timeout = 10
    elif name in ("llmgate", "llmgate-bare"):
        tmp = tempfile.mkdtemp(prefix=name + "-", dir=workdir)
        conf = llmgate_config(tmp, up_port, bare=name.endswith("bare"))
        ledger = None if name.endswith("bare") else os.path.join(tmp, "usage.db")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        # The working tree's twisted/plugins/ must be importable from the temp cwd
        # (an editable install maps the llmgate package only).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        proc = start([twistd, "-n", "--pidfile=", "llmgate", "--config", conf,
                      "--port", "tcp:%d:interface=127.0.0.1%s" % (port, ":backlog=%d" % backlog if backlog else "")]
                     + (["--workers", str(workers)] if workers else []),
                     log, cwd=tmp, env=env)
        timeout = 30
    else:
        raise ValueError("unknown peer %r" % name)
    try:
        wait_port(port, timeout, proc)
    except RuntimeError as e:
        stop(proc)
        with open(log, "rb") as f:
            tail = f.read()[-1500:].decode("utf-8", "replace")
        raise RuntimeError("%s failed to start: %s\n%s" % (name, e, tail))
    return proc, "http://127.0.0.1:%d/v1/chat/completions" % port, ledger


def ledger_bytes(path):
    """Size of the SQLite ledger and its WAL: a check that the ledger was really on."""
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


# --------------------------------------------------------------------------- load generator

def run_loadgen(url, sc, up_port, keepalive, extra_timeout=60):
    dur = sc["tokens"] * sc["delay"] / 1000.0
    argv = [os.path.join(BIN, "loadgen"), "-url", url, "-c", str(sc["c"]),
            "-tokens", str(sc["tokens"]), "-delay-ms", str(sc["delay"]),
            "-ramp", "%.3fs" % sc["ramp"], "-keepalive=%s" % ("true" if keepalive else "false"),
            "-timeout", "%ds" % int(dur * 3 + 30)]
    if sc.get("abort_after"):
        argv += ["-abort-after", str(sc["abort_after"]),
                 "-cancels", "http://127.0.0.1:%d/cancels" % up_port]
    if sc.get("stop_on_error"):
        argv += ["-stop-on-error"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    return proc, sc["ramp"] + dur * 3 + 30 + extra_timeout


def warmup(url, up_port, smoke=False):
    """A few short streams so lazy imports and first-use allocations are not counted."""
    sc = dict(c=5 if smoke else 20, tokens=3, delay=1, ramp=0.02 if smoke else 0.2)
    proc, timeout = run_loadgen(url, sc, up_port, keepalive=False)
    proc.communicate(timeout=timeout)


# --------------------------------------------------------------------------- metrics

def plateau(samples, timeline):
    """Peer samples taken while the number of open streams was within 5% of its peak.
    Returns (median rss_kb, median open streams) or (None, None)."""
    if not samples or not timeline:
        return None, None
    peak = max(n for _, n in timeline)
    if peak <= 0:
        return None, None
    rss, opens, j = [], [], 0
    for t, r, _, _ in samples:
        while j + 1 < len(timeline) and timeline[j + 1][0] <= t:
            j += 1
        if timeline[j][0] <= t and timeline[j][1] >= 0.95 * peak:
            rss.append(r)
            opens.append(timeline[j][1])
    if not rss:
        return None, None
    return statistics.median(rss), statistics.median(opens)


def listen_drops():
    """Kernel-wide count of SYNs dropped because a listen queue was full (TcpExt ListenDrops)."""
    try:
        with open("/proc/net/netstat") as f:
            rows = [line.split() for line in f if line.startswith("TcpExt:")]
        return int(dict(zip(rows[0][1:], rows[1][1:]))["ListenDrops"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


def cpu_delta(samples):
    return samples[-1][3] - samples[0][3] if len(samples) >= 2 else None


def summarize(lg, peer_samples, idle_rss, upstream_samples, upstream_stats):
    wall = lg["wall_s"] or 1e-9
    m = {
        "launched": lg["launched"], "ok_streams": lg["ok_streams"], "errors": lg["errors"],
        "error_kinds": lg["error_kinds"], "events": lg["events"], "tokens": lg["tokens_received"],
        "peak_open": lg["peak_open"], "wall_s": wall,
        "ttft_p50_ms": lg["ttft_ms"].get("p50"), "ttft_p90_ms": lg["ttft_ms"].get("p90"),
        "ttft_p99_ms": lg["ttft_ms"].get("p99"), "ttft_max_ms": lg["ttft_ms"].get("max"),
        "gap_p50_ms": lg["gap_ms"].get("p50"), "gap_p99_ms": lg["gap_ms"].get("p99"),
        "gap_max_ms": lg["gap_ms"].get("max"),
        "loadgen_cpu_s": lg["loadgen_cpu_s"], "loadgen_cpu_pct": 100 * lg["loadgen_cpu_s"] / wall,
        "upstream_started": upstream_stats.get("started"),
        "upstream_cancelled": upstream_stats.get("cancelled"),
    }
    up_cpu = cpu_delta(upstream_samples)
    if up_cpu is not None:
        m.update(upstream_cpu_s=up_cpu, upstream_cpu_pct=100 * up_cpu / wall)
    if "cancel_ms" in lg:
        c = lg["cancel_ms"]
        m.update(aborted=lg["aborted"], cancel_not_seen=lg["cancel_not_seen"],
                 cancel_p50_ms=c.get("p50"), cancel_p99_ms=c.get("p99"), cancel_max_ms=c.get("max"))
    if peer_samples:
        cpu = cpu_delta(peer_samples)
        rss_plat, open_plat = plateau(peer_samples, lg.get("open_timeline") or [])
        m.update(
            peer_cpu_s=cpu, peer_cpu_pct=100 * cpu / wall if cpu is not None else None,
            cpu_s_per_10k_events=(cpu * 1e4 / lg["events"]) if cpu is not None and lg["events"] else None,
            cpu_us_per_token=(cpu * 1e6 / lg["tokens_received"]) if cpu is not None and lg["tokens_received"] else None,
            idle_rss_mb=idle_rss / 1024,
            peak_rss_mb=max(max(s[1] for s in peer_samples), peer_samples[-1][2]) / 1024,
            top_rss_mb=max(s[1] for s in peer_samples) / 1024,
            plateau_rss_mb=rss_plat / 1024 if rss_plat else None,
            plateau_open=open_plat,
            rss_kb_per_stream=(rss_plat - idle_rss) / open_plat if rss_plat and open_plat else None,
        )
    return m


def run_case(name, sc, peer, up, up_port, workdir, keepalive, backlog=None, workers=None):
    """One peer through one scenario. Returns a metrics dict (or {'failed': reason})."""
    try:
        proc, url, ledger = start_peer(peer, up_port, workdir, backlog, workers)
    except Exception as e:  # the peer could not start: record it, go on
        return {"failed": str(e)}
    try:
        warmup(url, up_port, sc.get("smoke"))
        time.sleep(0.05 if sc.get("smoke") else 0.5)
        idle = proc_sample(proc.pid)[0] if proc else None
        http_json("http://127.0.0.1:%d/reset" % up_port, data=b"")
        drops0 = listen_drops()
        sampler = Sampler({"upstream": up.pid} | ({"peer": proc.pid} if proc else {}))
        sampler.start()
        lg_proc, timeout = run_loadgen(url, sc, up_port, keepalive)
        sampler.add("loadgen", lg_proc.pid)
        try:
            out, err = lg_proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            lg_proc.kill()
            out, err = lg_proc.communicate()
            return {"failed": "loadgen timed out after %ss" % timeout}
        finally:
            samples = sampler.finish()
        if lg_proc.returncode != 0:
            return {"failed": "loadgen exit %s: %s" % (lg_proc.returncode, err[-500:].decode())}
        lg = json.loads(out)
        stats = http_json("http://127.0.0.1:%d/stats" % up_port)
        if proc is not None and proc.poll() is not None:
            lg["error_kinds"]["peer exited with %s" % proc.returncode] = 1
        m = summarize(lg, samples.get("peer"), idle, samples["upstream"], stats)
        drops1 = listen_drops()
        m["listen_drops"] = drops1 - drops0 if drops0 is not None and drops1 is not None else None
    finally:
        stop(proc)
    if ledger:
        m["ledger_bytes"] = ledger_bytes(ledger)
    return m


# --------------------------------------------------------------------------- reporting

def median_of(runs):
    """Median of each numeric metric over repeats (non-numeric: from the first run)."""
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for k in out:
        vals = [r.get(k) for r in ok if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        if vals:
            out[k] = statistics.median(vals)
    out["repeats"] = len(ok)
    return out


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return "%.*f" % (nd, x)
    return str(x)


def ratio(a, b):
    return "%.2fx" % (a / b) if a is not None and b else "-"


def diff(a, b):
    return "%+.1f" % (a - b) if a is not None and b is not None else "-"


COLUMNS = ("peer | ok/launched | err | TTFT p50 ms | TTFT p99 ms | +TTFT p99 vs direct | gap p99 ms | "
           "+gap p99 vs direct | CPU s/10k ev | CPU us/token | CPU vs goproxy | peak RSS MB | "
           "KB/open stream | KB/stream vs goproxy | cancel p99 ms | peak open | SYN drops | upstream CPU % | loadgen CPU %")


def markdown(results, scen):
    lines = []
    for name, peers in results.items():
        lines += ["", "### %s: %s" % (name, scen[name]["desc"]),
                  "c=%(c)d, tokens=%(tokens)d, delay=%(delay)d ms, ramp=%(ramp).1f s" % scen[name], "",
                  "| " + COLUMNS + " |", "|" + "---|" * (COLUMNS.count("|") + 1)]
        d, g = peers.get("direct", {}), peers.get("goproxy", {})
        for peer, m in peers.items():
            if "failed" in m:
                lines.append("| %s | FAILED: %s |" % (peer, m["failed"].splitlines()[0][:150]))
                continue
            row = [peer, "%d/%d" % (m["ok_streams"], m["launched"]), fmt(m["errors"]),
                   fmt(m["ttft_p50_ms"]), fmt(m["ttft_p99_ms"]),
                   diff(m["ttft_p99_ms"], d.get("ttft_p99_ms")) if peer != "direct" else "",
                   fmt(m["gap_p99_ms"]),
                   diff(m["gap_p99_ms"], d.get("gap_p99_ms")) if peer != "direct" else "",
                   fmt(m.get("cpu_s_per_10k_events"), 3), fmt(m.get("cpu_us_per_token")),
                   ratio(m.get("cpu_us_per_token"), g.get("cpu_us_per_token")) if peer not in ("direct", "goproxy") else "",
                   fmt(m.get("peak_rss_mb")), fmt(m.get("rss_kb_per_stream")),
                   ratio(m.get("rss_kb_per_stream"), g.get("rss_kb_per_stream")) if peer not in ("direct", "goproxy") else "",
                   fmt(m.get("cancel_p99_ms")), fmt(m["peak_open"]), fmt(m.get("listen_drops")),
                   fmt(m.get("upstream_cpu_pct")), fmt(m.get("loadgen_cpu_pct"))]
            lines.append("| " + " | ".join(row) + " |")
        for peer, m in peers.items():
            if m.get("ledger_bytes") == 0:
                lines.append("\nNote: %s was configured with the ledger on, but no ledger file was "
                             "written: its figures are without the ledger." % peer)
            if m.get("error_kinds"):
                kinds = {re.sub(r'Post "[^"]*": |127\.0\.0\.1:\d+(->127\.0\.0\.1:\d+)?', "", k): n
                         for k, n in m["error_kinds"].items()}
                lines.append("\n%s errors: %s" % (peer, json.dumps(kinds)[:400]))
    return "\n".join(lines)


def machine_facts():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    go = subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip() if go_available() else None
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "llmgate", "twisted"],
                           capture_output=True, text=True).stdout.count("\n")
    return {"git_head": head.stdout.strip() or None, "git_dirty_paths": dirty, "nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "go": go,
            "nofile_soft_hard": resource.getrlimit(resource.RLIMIT_NOFILE),
            "mem_total_kb": int(open("/proc/meminfo").readline().split()[1])}


# --------------------------------------------------------------------------- main

def print_report(doc, path):
    mf, a = doc["machine"], doc["args"]
    print("# llmgate benchmark %s (%s, nproc=%s, %s)" % (doc["time"], mf["cpu_model"], mf["nproc"], mf["go"]))
    print("scale=%s repeat=%d keepalive=%s llmgate-backlog=%s llmgate-workers=%s; JSON: %s" % (
        a["scale"], a["repeat"], a["keepalive"], a.get("llmgate_backlog"), a.get("llmgate_workers"),
        os.path.relpath(path, REPO)))
    print(markdown(doc["results"], doc["scenarios"]))


def smoke_check(results):
    """Smoke mode asserts only that numbers were produced (never a timing)."""
    bad = []
    for name, peers in results.items():
        for peer, m in peers.items():
            if "failed" in m or not m.get("events") or m.get("ttft_p50_ms") is None:
                bad.append("%s/%s: %s" % (name, peer, m.get("failed", "no numbers")))
            elif peer != "direct" and m.get("cpu_s_per_10k_events") is None:
                bad.append("%s/%s: no peer CPU" % (name, peer))
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=",".join(ALL_PEERS))
    ap.add_argument("--scenarios", default="S1,S2,S3,S4,S5")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply stream counts (S5: the cap)")
    ap.add_argument("--repeat", type=int, default=1, help="repeats; medians are reported")
    ap.add_argument("--smoke", action="store_true", help="tiny run (5 streams x 5 tokens) for CI")
    ap.add_argument("--keepalive", action="store_true", help="load generator reuses connections")
    ap.add_argument("--llmgate-backlog", type=int, help="listen backlog for llmgate's port "
                    "(Twisted's default is 50; Go's listener uses net.core.somaxconn)")
    ap.add_argument("--llmgate-workers", help="llmgate's --workers (auto or N); default: not passed, "
                    "so llmgate's own default (auto, one worker per CPU)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the Go parts")
    ap.add_argument("--out", help="JSON output path (default bench/out/run-<time>.json)")
    ap.add_argument("--report", metavar="JSON", help="only print the tables of an earlier run's JSON")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            doc = json.load(f)
        print_report(doc, args.report)
        return

    raise_nofile()
    peers = [p for p in args.peers.split(",") if p]
    names = [s for s in args.scenarios.split(",") if s]
    scen = scenarios(args.scale, args.smoke)
    for x in peers:
        if x not in ALL_PEERS:
            ap.error("unknown peer %s" % x)
    for x in names:
        if x not in scen:
            ap.error("unknown scenario %s" % x)

    if not ensure_built(args.rebuild):
        msg = "SKIPPED: `go` not found and bench/bin/ not built; install Debian's golang-go"
        print(msg, file=sys.stderr)
        sys.exit(0 if args.smoke else 2)

    os.makedirs(OUT, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    facts = machine_facts()  # git state at the start; the end state is added below
    workdir = tempfile.mkdtemp(prefix="llmgate-bench-")
    up_port = free_port()
    up = start([os.path.join(BIN, "upstream"), "-addr", "127.0.0.1:%d" % up_port], os.path.join(workdir, "upstream.log"))
    raw = {n: {p: [] for p in peers} for n in names}
    t0 = time.time()
    try:
        wait_port(up_port, 10, up)
        for rep in range(args.repeat):
            for n in names:
                for p in peers:
                    print("[%5.0fs] repeat %d %s %s ..." % (time.time() - t0, rep + 1, n, p), file=sys.stderr, flush=True)
                    raw[n][p].append(run_case(n, scen[n], p, up, up_port, workdir, args.keepalive,
                                                  args.llmgate_backlog, args.llmgate_workers))
                    time.sleep(1 if not args.smoke else 0.1)  # let sockets drain
    finally:
        stop(up)

    results = {n: {p: median_of(raw[n][p]) for p in peers} for n in names}
    end = machine_facts()
    facts.update(git_head_end=end["git_head"], git_dirty_paths_end=end["git_dirty_paths"])
    doc = {"time": stamp, "machine": facts, "args": vars(args), "scenarios": scen,
           "workdir": workdir, "results": results, "raw": raw, "elapsed_s": time.time() - t0}
    path = args.out or os.path.join(OUT, "%s-%s.json" % ("smoke" if args.smoke else "run", stamp))
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print_report(doc, path)
    if args.smoke:
        bad = smoke_check(results)
        if bad:
            print("\nSMOKE FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
            sys.exit(1)
        print("\nsmoke OK (%.1fs)" % (time.time() - t0))


if __name__ == "__main__":
    main()

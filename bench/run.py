#!/usr/bin/env python3
"""Benchmark runner for llmgate (issue 4). Python stdlib only.

Builds the Go parts (bench/bin/), starts the mock upstream, then for every
repeat x scenario x peer: starts the peer fresh, warms it up, measures its idle
RSS, runs the Go load generator through it while sampling /proc for the peer,
the upstream and the load generator, and stops the peer. Writes a JSON file to
bench/out/ and prints markdown tables (medians over repeats) to stdout.

    .venv/bin/python bench/run.py --peers direct,goproxy,llmgate --scenarios S1,S2 --scale 0.5
    .venv/bin/python bench/run.py --smoke      # tiny CI run, asserts only that numbers exist

(from the repository root, with the Python that has llmgate installed; its
twistd is taken from the same bin/ directory.)

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
DEFAULT_PEERS = ("direct", "goproxy", "llmgate", "llmgate-bare")
# llmgate-wN (llmgate --workers N) runs only when named in --peers; w4 is the
# peer that holds S5's 20,000 streams (each worker under the per-process fd limit).
ALL_PEERS = DEFAULT_PEERS + ("llmgate-w2", "llmgate-w4")
WORKERS_PEER = re.compile(r"llmgate-w([1-9][0-9]*)$")
DEFAULT_SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "SUS", "SHORT")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- scenarios

def nofile_hard():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


# --------------------------------------------------------------------------- capacity (S5)

S5_TARGET = 20000
FD_RESERVE = 500     # fds a process keeps besides its streams' sockets (files, pipes, listeners)
PORT_RESERVE = 1000  # ephemeral ports left for everything else on the host
UPSTREAM_SKEW = 1.1  # SO_REUSEPORT hashes connections: a shard may get a little over its share
WORKER_SKEW = 1.5    # llmgate's workers accept from one queue: one may get well over its share


def fd_budget(hard=None):
    """Sockets one process may hold: the hard RLIMIT_NOFILE (per process, and
    the runner raises the soft limit to it) less a reserve."""
    return (nofile_hard() if hard is None else hard) - FD_RESERVE


def ephemeral_ports(path="/proc/sys/net/ipv4/ip_local_port_range"):
    """How many local ports connect() can pick from. Every stream holds one
    towards the peer's port and, through a proxy, one towards the upstream's,
    each to a single address, so this bounds the streams of one run."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split())
        return hi - lo + 1
    except (OSError, ValueError):
        return 28232  # Linux's default 32768-60999


def s5_cap(ports=None):
    """S5's stream count: 20,000, unless the ephemeral ports cannot carry it.
    The file descriptor limit is per process and no longer caps it: the load
    generator and the upstream are split over processes (shard_count), and a
    peer that cannot hold it runs at its own cap (peer_stream_cap)."""
    return min(S5_TARGET, (ephemeral_ports() if ports is None else ports) - PORT_RESERVE)


def shard_count(sockets, budget):
    """Processes needed so that none holds more than `budget` sockets."""
    return max(1, -(-int(sockets) // budget))


def split(n, k):
    """n as k near-equal whole shares, the larger first (sum is n)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def upstream_shards(c, budget):
    """Upstream processes for c streams (one socket each), with room for the
    uneven spread of SO_REUSEPORT."""
    return shard_count(-(-c * UPSTREAM_SKEW // 1), budget)


def peer_serving_processes(name):
    """Processes of a peer that hold the streams' sockets (0 for direct)."""
    if name == "direct":
        return 0
    m = WORKERS_PEER.match(name)
    return int(m.group(1)) if m else 1


def peer_stream_cap(name, budget):
    """The most streams a peer can hold, or None when it holds none (direct).

    A proxy process holds two sockets per stream (client and upstream). With
    --workers N the kernel hands each connection to whichever worker accepts
    first, so one worker may get more than 1/N: allow WORKER_SKEW."""
    n = peer_serving_processes(name)
    if n == 0:
        return None
    if n == 1:
        return budget // 2
    return int(n * budget / 2 / WORKER_SKEW)


def s5_shape(s, c):
    """S5 at c streams: the ramp keeps the scenario's start rate (1,000 streams/s
    unless --s5-rate) and the streams, one token per `delay`, outlive it by 10 s."""
    s["c"] = c
    s["ramp"] = c / s.get("rate_start", 1000.0)
    s["tokens"] = int((s["ramp"] + 10) * 1000 / s["delay"])
    return s


def scenario_for_peer(sc, peer, budget):
    """The scenario a peer runs: S5 at the most streams the peer can hold,
    noted in "capped"; anything else unchanged."""
    cap = peer_stream_cap(peer, budget)
    if not sc.get("stop_on_error") or sc.get("smoke") or cap is None or sc["c"] <= cap:
        return sc
    n = peer_serving_processes(peer)
    why = ("one process holds at most %d sockets, two per stream" % budget if n == 1 else
           "%d workers x %d sockets, two per stream, a worker allowed %.1fx its share"
           % (n, budget, WORKER_SKEW))
    out = s5_shape(dict(sc), cap)
    out["capped"] = "ran at %d of %d streams: %s" % (cap, sc["c"], why)
    return out


def scenarios(scale, smoke, s5_rate=1000.0, s5_delay=1000):
    """Scenario parameters. c = concurrent streams, delay in ms, ramp in s.
    S5's start rate and token delay can be lowered so that the streams all
    open at once on a machine whose CPU cannot start 1,000 a second while
    relaying a token a second on each (capacity and memory, not speed)."""
    s5_c = s5_cap()
    sc = {
        "S1": dict(desc="1,000 streams x 50 tokens x 100 ms (the blog's test)",
                   c=1000, tokens=50, delay=100, ramp=2.0),
        "S2": dict(desc="200 streams x 200 tokens x 10 ms (event throughput)",
                   c=200, tokens=200, delay=10, ramp=1.0),
        "S3": dict(desc="5,000 open streams x 50 tokens x 200 ms (memory per stream)",
                   c=5000, tokens=50, delay=200, ramp=5.0),
        "S4": dict(desc="100 clients abort after 5 tokens (cancellation reaches the upstream)",
                   c=100, tokens=50, delay=100, ramp=1.0, abort_after=5),
        "S5": dict(desc="ramp at %s/s until failure or %d streams (max concurrent streams)"
                   % ("{:,g}".format(s5_rate), s5_c),
                   c=s5_c, tokens=0, delay=s5_delay, ramp=s5_c / s5_rate, stop_on_error=True),
        # Closed loop: every client starts a new stream when its stream ends. The
        # ramp is one stream's length, so the restarts are spread evenly (~200/s).
        "SUS": dict(desc="1,000 streams x 50 tokens x 100 ms held for 30 s (sustained load)",
                    c=1000, tokens=50, delay=100, ramp=5.0, hold=30.0),
        # Open loop: start times are fixed whatever the peer does; c is unused.
        "SHORT": dict(desc="500 requests/s x 5 tokens x 10 ms for 20 s, open loop (short streams)",
                      c=0, tokens=5, delay=10, ramp=0.0, rate=500.0, duration=20.0),
    }
    for s in sc.values():
        if smoke:
            s.update(c=5, tokens=5, delay=10, ramp=0.2, smoke=True)
            if "abort_after" in s:
                s["abort_after"] = 2
            if "hold" in s:
                s["hold"] = 1.0
            if "rate" in s:
                s.update(c=0, ramp=0.0, rate=20.0, duration=1.0)
            continue
        if "rate" in s:  # SHORT: --scale multiplies the arrival rate
            s["rate"] = max(1.0, s["rate"] * scale)
            continue
        s["c"] = max(1, int(round(s["c"] * scale)))
        if s.get("stop_on_error"):  # S5: keep the start rate; streams outlive the ramp by 10 s
            if s5_rate != 1000.0:
                s["rate_start"] = s5_rate
            s5_shape(s, s["c"])
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


# --------------------------------------------------------------------------- upstream

def pct_of(xs, p):
    """The upstream's nearest-rank percentile (0 when empty), as bench/upstream computes it."""
    if not xs:
        return 0
    xs = sorted(xs)
    return xs[int(p * (len(xs) - 1) + 0.5)]


UPSTREAM_COUNTERS = ("started", "completed", "cancelled", "active", "slowed", "failed")


def merge_upstream_stats(parts):
    """One /stats answer from the shards' /stats?raw=1 answers: counters
    summed, the cancel gap percentiles over all shards' gaps."""
    out = {k: sum(p.get(k, 0) for p in parts) for k in UPSTREAM_COUNTERS}
    gaps = [g for p in parts for g in p.get("cancel_gaps_ms") or ()]
    out.update(cancel_gap_ms_p50=pct_of(gaps, 0.5), cancel_gap_ms_p99=pct_of(gaps, 0.99),
               shards=len(parts))
    return out


class Upstream:
    """The Go mock upstream: one process (the default), or `shards` processes
    sharing one port through SO_REUSEPORT, so that none holds more sockets
    than a process may. Each shard counts only its own streams, so each also
    listens on an admin port of its own; stats(), reset() and cancels_urls()
    go to every shard."""

    def __init__(self, workdir, shards=1, extra=()):
        self.workdir, self.shards, self.extra = workdir, shards, list(extra)
        self.procs, self.admin_ports, self.port = [], [], None

    def start(self):
        self.port = free_port()
        exe = os.path.join(BIN, "upstream")
        try:
            if self.shards == 1:
                self.admin_ports = [self.port]
                self.procs = [start([exe, "-addr", "127.0.0.1:%d" % self.port] + self.extra,
                                    os.path.join(self.workdir, "upstream.log"))]
            else:
                self.admin_ports = [free_port() for _ in range(self.shards)]
                self.procs = [start([exe, "-addr", "127.0.0.1:%d" % self.port, "-reuseport",
                                     "-admin", "127.0.0.1:%d" % a] + self.extra,
                                    os.path.join(self.workdir, "upstream-%d.log" % i))
                              for i, a in enumerate(self.admin_ports)]
            for proc, a in zip(self.procs, self.admin_ports):
                wait_port(a, 10, proc)
            wait_port(self.port, 10, self.procs[0])
        except Exception:
            self.stop()
            raise
        return self

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    def alive(self):
        return all(p.poll() is None for p in self.procs)

    def _urls(self, path):
        return ["http://127.0.0.1:%d%s" % (a, path) for a in self.admin_ports]

    def cancels_urls(self):
        return ",".join(self._urls("/cancels"))

    def reset(self):
        for url in self._urls("/reset"):
            http_json(url, data=b"")

    def stats(self):
        if self.shards == 1:
            return http_json(self._urls("/stats")[0])
        return merge_upstream_stats([http_json(u) for u in self._urls("/stats?raw=1")])

    def stop(self):
        for p in self.procs:
            stop(p)


# --------------------------------------------------------------------------- /proc sampling

def _stat_fields(text):
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    return text.rsplit(")", 1)[1].split()


def proc_sample(pid):
    """(rss_kb, peak_rss_kb, cpu_seconds) of one live process, or None.

    CPU includes the reaped children's (cutime, cstime), so a worker that exits
    during a run keeps counting once its parent has waited for it."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = _stat_fields(f.read())
        with open("/proc/%d/status" % pid) as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except (OSError, IndexError):
        return None
    # utime, stime, cutime, cstime: fields 14-17 of proc(5)
    cpu = sum(int(x) for x in fields[11:15]) / CLK_TCK
    kb = lambda k: int(status.get(k, "0 kB").split()[0])
    return kb("VmRSS"), kb("VmHWM"), cpu


def descendants(root, proc="/proc"):
    """root and every live process below it, from the ppid field of proc/*/stat.

    llmgate --workers N is a parent and N children: a peer's CPU and memory is
    the sum over this tree, not the figure of the pid the runner started."""
    children = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "stat")) as f:
                ppid = int(_stat_fields(f.read())[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_sample(pids, sample=proc_sample):
    """(rss_kb, peak_rss_kb, cpu_seconds, processes) summed over pids, or None
    when none of them is alive. peak_rss_kb is the sum of each one's own peak
    (an upper bound of the tree's peak when they peaked at different times)."""
    got = [s for s in (sample(p) for p in pids) if s]
    if not got:
        return None
    return (sum(s[0] for s in got), sum(s[1] for s in got), sum(s[2] for s in got), len(got))


def fd_count(pid, proc="/proc"):
    """Open file descriptors of one process, or None when it is gone."""
    try:
        return len(os.listdir(os.path.join(proc, str(pid), "fd")))
    except OSError:
        return None


class Sampler(threading.Thread):
    """Samples RSS and CPU of named process trees every `interval` seconds.

    Each name is a root pid, or a list of them (shards); their descendants are
    looked up again every `tree_every` samples (a /proc scan costs more than
    reading a few files). For the names in `fds` the open descriptors of each
    process are counted at the same pace, and each one's highest count kept."""

    def __init__(self, pids, interval=0.1, tree_every=10, fds=()):
        super().__init__(daemon=True)
        self.pids, self.interval, self.tree_every = dict(pids), interval, tree_every
        self.samples = {name: [] for name in self.pids}  # name -> [(t, rss_kb, hwm_kb, cpu_s, nproc)]
        self.trees = {}
        self.fds = {name: {} for name in fds}  # name -> {pid: most fds seen}
        self._halt = threading.Event()

    def _tree(self, roots):
        roots = roots if isinstance(roots, (list, tuple)) else [roots]
        return [p for r in roots for p in descendants(r)]

    def add(self, name, pid):
        self.samples.setdefault(name, [])
        self.pids[name] = pid

    def run(self):
        n = 0
        while not self._halt.is_set():
            t = time.time()
            for name, pid in list(self.pids.items()):
                if n % self.tree_every == 0 or name not in self.trees:
                    self.trees[name] = self._tree(pid)
                    if name in self.fds:
                        for p in self.trees[name]:
                            c = fd_count(p)
                            if c is not None:
                                self.fds[name][p] = max(c, self.fds[name].get(p, 0))
                s = tree_sample(self.trees[name])
                if s:
                    self.samples[name].append((t,) + s)
            n += 1
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


class Unavailable(Exception):
    """The peer cannot run with this llmgate (e.g. no --workers option yet)."""


def twistd_path():
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def llmgate_env():
    # The working tree's twisted/plugins/ must be importable from the temp cwd
    # (an editable install maps the llmgate package only).
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


_WORKERS_OPTION = {}


def has_workers_option():
    """Whether the working tree's llmgate has --workers (asked once, from its --help)."""
    if "v" not in _WORKERS_OPTION:
        try:
            r = subprocess.run([twistd_path(), "llmgate", "--help"], capture_output=True,
                               text=True, timeout=60, cwd=tempfile.gettempdir(), env=llmgate_env())
            _WORKERS_OPTION["v"] = "--workers" in r.stdout
        except (OSError, subprocess.TimeoutExpired):
            _WORKERS_OPTION["v"] = False
    return _WORKERS_OPTION["v"]


def known_peer(name):
    return name in ALL_PEERS or WORKERS_PEER.match(name) is not None


def llmgate_workers_args(name, has_workers):
    """Extra llmgate arguments for a peer. llmgate and llmgate-bare stay one
    process (--workers 1 once the option exists, whose default may be one per
    CPU), so their figures compare with the earlier runs; llmgate-wN needs it."""
    m = WORKERS_PEER.match(name)
    if m:
        if not has_workers:
            raise Unavailable("this llmgate has no --workers option")
        return ["--workers", m.group(1)]
    return ["--workers", "1"] if has_workers else []


def start_peer(name, up_port, workdir, backlog=None):
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
    elif name in ("llmgate", "llmgate-bare") or WORKERS_PEER.match(name):
        extra = llmgate_workers_args(name, has_workers_option())
        tmp = tempfile.mkdtemp(prefix=name + "-", dir=workdir)
        conf = llmgate_config(tmp, up_port, bare=name.endswith("bare"))
        ledger = None if name.endswith("bare") else os.path.join(tmp, "usage.db")
        proc = start([twistd_path(), "-n", "--pidfile=", "llmgate", "--config", conf] + extra +
                     ["--port", "tcp:%d:interface=127.0.0.1%s" % (port, ":backlog=%d" % backlog if backlog else "")],
                     log, cwd=tmp, env=llmgate_env())
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

def loadgen_argv(url, sc, up_port, keepalive, cancels=None):
    """The load generator's command line for a scenario, and how long it may run (s).
    `cancels`: the /cancels URL(s) of a sharded upstream (default: up_port's)."""
    dur = sc["tokens"] * sc["delay"] / 1000.0
    argv = [os.path.join(BIN, "loadgen"), "-url", url, "-c", str(sc["c"]),
            "-tokens", str(sc["tokens"]), "-delay-ms", str(sc["delay"]),
            "-ramp", "%.3fs" % sc["ramp"], "-keepalive=%s" % ("true" if keepalive else "false"),
            "-timeout", "%ds" % int(dur * 3 + 30)]
    starting = sc["ramp"]  # how long new streams keep being started
    if sc.get("hold"):
        argv += ["-hold", "%.3fs" % sc["hold"]]
        starting = max(starting, sc["hold"])
    if sc.get("rate"):
        argv += ["-rate", "%g" % sc["rate"], "-duration", "%.3fs" % sc["duration"]]
        starting = sc["duration"]
    if sc.get("abort_after"):
        argv += ["-abort-after", str(sc["abort_after"]),
                 "-cancels", cancels or "http://127.0.0.1:%d/cancels" % up_port]
    if sc.get("stop_on_error"):
        argv += ["-stop-on-error"]
    return argv, starting + dur * 3 + 30


def run_loadgen(url, sc, up_port, keepalive, extra_timeout=60):
    argv, limit = loadgen_argv(url, sc, up_port, keepalive)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    return proc, limit + extra_timeout


def loadgen_shard_argvs(url, sc, up_port, keepalive, budget, samples_dir, cancels=None):
    """The command lines of the load generator processes for a scenario, and
    how long they may run (s). One process holds one socket per stream; when
    the scenario's streams do not fit in one (`budget`), K processes each get
    their share of the streams (or of the open-loop rate) over the same ramp,
    so together they start streams at the scenario's rate, and each writes its
    raw samples for merge_summaries. K = 1 is the single load generator as it
    always ran."""
    k = shard_count(sc["c"], budget) if not sc.get("rate") else 1
    if k == 1:
        argv, limit = loadgen_argv(url, sc, up_port, keepalive, cancels)
        return [argv], limit
    argvs = []
    for i, c in enumerate(split(sc["c"], k)):
        argv, limit = loadgen_argv(url, dict(sc, c=c), up_port, keepalive, cancels)
        argvs.append(argv + ["-shard", str(i), "-samples", os.path.join(samples_dir, "samples-%d.json" % i)])
    return argvs, limit


def round3(x):
    """The load generator's rounding to 0.001 ms."""
    return float(int(x * 1000 + 0.5)) / 1000


def nearest_rank(xs):
    """The load generator's percentile summary ({n, p50, p90, p99, max}) of raw samples."""
    out = {"n": float(len(xs))}
    if not xs:
        return out
    xs = sorted(xs)
    at = lambda p: round3(xs[int(p * (len(xs) - 1) + 0.5)])
    out.update(p50=at(0.5), p90=at(0.9), p99=at(0.99), max=round3(xs[-1]))
    return out


def merge_timelines(timelines):
    """Open streams summed over shards: each shard's timeline is a step
    function sampled at its own ticks; at every tick of any shard the sum of
    each shard's latest value (0 before its first)."""
    ticks = sorted((t, i, n) for i, tl in enumerate(timelines) for t, n in tl)
    cur, out = [0] * len(timelines), []
    for t, i, n in ticks:
        cur[i] = n
        out.append([t, sum(cur)])
    return out


SUMMED = ("concurrency", "launched", "ok_streams", "errors", "events", "tokens_received", "rate")


def merge_summaries(parts, samples):
    """One load generator summary from K shards' summaries and raw samples:
    counts summed, percentiles (nearest rank, as the load generator computes
    them) over all shards' samples, open-stream timelines summed by time, the
    wall time from the first start to the last end.

    peak_open is the highest summed timeline value (sampled every 100 ms) or
    the highest shard's own peak, whichever is more; the sum of the shards'
    peaks, an upper bound, is peak_open_shards_sum."""
    out = dict(parts[0])
    for k in SUMMED:
        if k in out:
            out[k] = sum(p[k] for p in parts)
    kinds = {}
    for p in parts:
        for k, n in p["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + n
    out["error_kinds"] = kinds
    start = min(p["start_unix"] for p in parts)
    end = max(p["start_unix"] + p["wall_s"] for p in parts)
    out.update(start_unix=start, wall_s=round3(end - start),
               ramp_end_unix=max(p["ramp_end_unix"] for p in parts),
               loadgen_cpu_s=round3(sum(p["loadgen_cpu_s"] for p in parts)), shards=len(parts))
    tl = merge_timelines([p.get("open_timeline") or [] for p in parts])
    out["open_timeline"] = tl
    out["peak_open"] = max([n for _, n in tl] + [p["peak_open"] for p in parts])
    out["peak_open_shards_sum"] = sum(p["peak_open"] for p in parts)
    for key in ("ttft_ms", "gap_ms", "total_ms"):
        out[key] = nearest_rank([x for s in samples for x in s.get(key) or ()])
    if any("cancel_ms" in p for p in parts):
        out["cancel_ms"] = nearest_rank([x for s in samples for x in s.get("cancel_ms") or ()])
        out["aborted"] = sum(p.get("aborted", 0) for p in parts)
        out["cancel_not_seen"] = sum(p.get("cancel_not_seen", 0) for p in parts)
    return out


def settle(pid, limit, step=0.2, busy=0.02):
    """Wait (at most `limit` s) until the peer's process tree is idle: less than
    `busy` CPU seconds per `step`. Workers that are still starting up would
    otherwise count in the idle RSS and the run's CPU."""
    deadline = time.monotonic() + limit
    last = tree_sample(descendants(pid))
    while last and time.monotonic() < deadline:
        time.sleep(step)
        cur = tree_sample(descendants(pid))
        if not cur or (cur[2] - last[2] < busy and cur[3] == last[3]):
            return
        last = cur


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
    for t, r, *_ in samples:
        while j + 1 < len(timeline) and timeline[j + 1][0] <= t:
            j += 1
        if timeline[j][0] <= t and timeline[j][1] >= 0.95 * peak:
            rss.append(r)
            opens.append(timeline[j][1])
    if not rss:
        return None, None
    return statistics.median(rss), statistics.median(opens)


def per_second(samples, timeline):
    """[s from the first sample, open streams, peer RSS MB, peer CPU % of one
    core] once a second: how the peer's memory and CPU follow the open streams."""
    out, j, last = [], 0, None
    for t, rss, _, cpu, _ in samples:
        if last is not None and t - last[0] < 1.0:
            continue
        while j + 1 < len(timeline) and timeline[j + 1][0] <= t:
            j += 1
        n = timeline[j][1] if timeline and timeline[j][0] <= t else 0
        pct = 100 * (cpu - last[1]) / (t - last[0]) if last else None
        out.append([round(t - samples[0][0], 1), n, round(rss / 1024, 1), None if pct is None else round(pct)])
        last = (t, cpu)
    return out


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


def summarize(lg, peer_samples, idle_rss, upstream_samples, upstream_stats, window=None):
    """Metrics of one run; `window` is how long streams were being started (s)."""
    wall = lg["wall_s"] or 1e-9
    m = {
        "launched": lg["launched"], "ok_streams": lg["ok_streams"], "errors": lg["errors"],
        "error_kinds": lg["error_kinds"], "events": lg["events"], "tokens": lg["tokens_received"],
        "peak_open": lg["peak_open"], "wall_s": wall,
        "streams_per_s": lg["launched"] / min(window or wall, wall),
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
            cpu_s_per_1k_req=(cpu * 1e3 / lg["launched"]) if cpu is not None and lg["launched"] else None,
            idle_rss_mb=idle_rss / 1024,
            # a single process's own high-water mark counts too; for a tree the sum of
            # the processes' peaks overstates, so only the sampled sums count
            peak_rss_mb=max([s[1] for s in peer_samples] +
                            [peer_samples[-1][2]] * (peer_samples[-1][4] == 1)) / 1024,
            peer_processes=max(s[4] for s in peer_samples),
            top_rss_mb=max(s[1] for s in peer_samples) / 1024,
            plateau_rss_mb=rss_plat / 1024 if rss_plat else None,
            plateau_open=open_plat,
            rss_kb_per_stream=(rss_plat - idle_rss) / open_plat if rss_plat and open_plat else None,
            per_second=per_second(peer_samples, lg.get("open_timeline") or []),
        )
    return m


def communicate_all(procs, timeout):
    """(stdout, stderr) of every process, read at once (threads) so no one
    blocks on a full pipe; None for one still running after `timeout` s,
    which is killed."""
    outs = [None] * len(procs)

    def read(i, p):
        try:
            outs[i] = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
    threads = [threading.Thread(target=read, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def run_shards(argvs, timeout, sampler):
    """Run the load generator process(es); return their merged summary, or
    raise RuntimeError naming the failure."""
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
             for a in argvs]
    sampler.add("loadgen", [p.pid for p in procs])
    outs = communicate_all(procs, timeout)
    if any(o is None for o in outs):
        raise RuntimeError("loadgen timed out after %ss" % timeout)
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError("loadgen exit %s: %s" % (p.returncode, err[-500:].decode()))
    parts = [json.loads(out) for out, _ in outs]
    if len(parts) == 1:
        return parts[0]
    samples = []
    for a in argvs:
        with open(a[a.index("-samples") + 1]) as f:
            samples.append(json.load(f))
        os.unlink(a[a.index("-samples") + 1])
    return merge_summaries(parts, samples)


def run_case(name, sc, peer, upstream, workdir, keepalive, backlog=None, budget=None):
    """One peer through one scenario. Returns a metrics dict (or {'failed': reason}).

    S5 runs at the most streams the peer can hold (scenario_for_peer); the load
    generator is split over processes when one cannot hold its sockets."""
    budget = fd_budget() if budget is None else budget
    sc = scenario_for_peer(sc, peer, budget)
    up_port = upstream.port
    try:
        proc, url, ledger = start_peer(peer, up_port, workdir, backlog)
    except Unavailable as e:
        return {"unavailable": str(e)}
    except Exception as e:  # the peer could not start: record it, go on
        return {"failed": str(e)}
    try:
        warmup(url, up_port, sc.get("smoke"))
        time.sleep(0.05 if sc.get("smoke") else 0.5)
        if proc:
            settle(proc.pid, 1.0 if sc.get("smoke") else 5.0)
        idle = tree_sample(descendants(proc.pid))[0] if proc else None
        upstream.reset()
        drops0 = listen_drops()
        sampler = Sampler({"upstream": upstream.pids} | ({"peer": proc.pid} if proc else {}),
                          fds=("peer",))
        sampler.start()
        argvs, timeout = loadgen_shard_argvs(url, sc, up_port, keepalive, budget, workdir,
                                             upstream.cancels_urls())
        try:
            lg = run_shards(argvs, timeout + 60, sampler)
        except RuntimeError as e:
            return {"failed": str(e)}
        finally:
            samples = sampler.finish()
        stats = upstream.stats()
        if proc is not None and proc.poll() is not None:
            lg["error_kinds"]["peer exited with %s" % proc.returncode] = 1
        if not upstream.alive():
            lg["error_kinds"]["an upstream process exited"] = 1
        m = summarize(lg, samples.get("peer"), idle, samples["upstream"], stats,
                      window=sc.get("hold") or sc.get("duration"))
        drops1 = listen_drops()
        m["listen_drops"] = drops1 - drops0 if drops0 is not None and drops1 is not None else None
        m.update(loadgen_shards=len(argvs), upstream_shards=upstream.shards, c=sc["c"])
        if sc.get("capped"):
            m["capped"] = sc["capped"]
        if sampler.fds.get("peer"):
            # the processes that held streams: the supervisor of --workers holds only listeners
            m["peer_fds_max"] = sorted(sampler.fds["peer"].values(), reverse=True)
    finally:
        stop(proc)
    if ledger:
        m["ledger_bytes"] = ledger_bytes(ledger)
    return m


# --------------------------------------------------------------------------- reporting

def median_of(runs):
    """Median of each numeric metric over repeats (non-numeric: from the first run)."""
    ok = [r for r in runs if "failed" not in r and "unavailable" not in r]
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


# The open-loop short-stream scenario is about CPU per request, not per token.
RATE_COLUMNS = ("peer | ok/launched | err | started/s | TTFT p50 ms | +TTFT p50 vs direct | TTFT p99 ms | "
                "+TTFT p99 vs direct | CPU s/1k req | CPU vs goproxy | peak RSS MB | peak open | "
                "SYN drops | upstream CPU % | loadgen CPU %")


def scenario_line(sc):
    """The parameters of a scenario as the table header states them."""
    if sc.get("rate"):
        return "rate=%g/s for %g s (open loop), tokens=%d, delay=%d ms" % (
            sc["rate"], sc["duration"], sc["tokens"], sc["delay"])
    line = "c=%(c)d, tokens=%(tokens)d, delay=%(delay)d ms, ramp=%(ramp).1f s" % sc
    if sc.get("hold"):
        line += ", held %g s (each client restarts its stream when it ends)" % sc["hold"]
    return line


def rate_row(peer, m, d, g):
    return [peer, "%d/%d" % (m["ok_streams"], m["launched"]), fmt(m["errors"]),
            fmt(m.get("streams_per_s")),
            fmt(m["ttft_p50_ms"]), diff(m["ttft_p50_ms"], d.get("ttft_p50_ms")) if peer != "direct" else "",
            fmt(m["ttft_p99_ms"]), diff(m["ttft_p99_ms"], d.get("ttft_p99_ms")) if peer != "direct" else "",
            fmt(m.get("cpu_s_per_1k_req"), 3),
            ratio(m.get("cpu_s_per_1k_req"), g.get("cpu_s_per_1k_req")) if peer not in ("direct", "goproxy") else "",
            fmt(m.get("peak_rss_mb")), fmt(m["peak_open"]), fmt(m.get("listen_drops")),
            fmt(m.get("upstream_cpu_pct")), fmt(m.get("loadgen_cpu_pct"))]


def markdown(results, scen):
    lines = []
    for name, peers in results.items():
        cols = RATE_COLUMNS if scen[name].get("rate") else COLUMNS
        lines += ["", "### %s: %s" % (name, scen[name]["desc"]), scenario_line(scen[name]), "",
                  "| " + cols + " |", "|" + "---|" * (cols.count("|") + 1)]
        d, g = peers.get("direct", {}), peers.get("goproxy", {})
        for peer, m in peers.items():
            if "failed" in m:
                lines.append("| %s | FAILED: %s |" % (peer, m["failed"].splitlines()[0][:150]))
                continue
            if "unavailable" in m:
                lines.append("| %s | UNAVAILABLE: %s |" % (peer, m["unavailable"]))
                continue
            if scen[name].get("rate"):
                lines.append("| " + " | ".join(rate_row(peer, m, d, g)) + " |")
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
        if scen[name].get("hold"):
            lines.append("\nstreams started per second: " + ", ".join(
                "%s %s" % (p, fmt(m.get("streams_per_s"))) for p, m in peers.items() if "launched" in m))
        multi = ["%s %d" % (p, m["peer_processes"]) for p, m in peers.items() if (m.get("peer_processes") or 1) > 1]
        if multi:
            lines.append("\nprocesses summed (CPU, RSS): " + ", ".join(multi))
        lines += shard_notes(peers)
        for peer, m in peers.items():
            if m.get("ledger_bytes") == 0:
                lines.append("\nNote: %s was configured with the ledger on, but no ledger file was "
                             "written: its figures are without the ledger." % peer)
            if m.get("error_kinds"):
                kinds = {re.sub(r'Post "[^"]*": |127\.0\.0\.1:\d+(->127\.0\.0\.1:\d+)?', "", k): n
                         for k, n in m["error_kinds"].items()}
                lines.append("\n%s errors: %s" % (peer, json.dumps(kinds)[:400]))
    return "\n".join(lines)


def shard_notes(peers):
    """Lines under a table: peers run below the scenario's stream count, the
    load generator and upstream processes when split, each peer's most
    descriptors per process."""
    lines = []
    for p, m in peers.items():
        if m.get("capped"):
            lines.append("\n%s %s" % (p, m["capped"]))
    split_ = ["%s: load generator %d, upstream %d" % (p, m["loadgen_shards"], m["upstream_shards"])
              for p, m in peers.items() if (m.get("loadgen_shards") or 1) > 1 or (m.get("upstream_shards") or 1) > 1]
    if split_:
        lines.append("\nprocesses (SO_REUSEPORT for the upstream): " + "; ".join(split_))
    fds = ["%s %s" % (p, "/".join(str(n) for n in m["peer_fds_max"]))
           for p, m in peers.items() if len(m.get("peer_fds_max") or ()) > 1]
    if fds:
        lines.append("\nmost fds per process of the peer: " + "; ".join(fds))
    return lines


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
    print("scale=%s repeat=%d keepalive=%s llmgate-backlog=%s; JSON: %s" % (
        a["scale"], a["repeat"], a["keepalive"], a.get("llmgate_backlog"), os.path.relpath(path, REPO)))
    print(markdown(doc["results"], doc["scenarios"]))


def save(doc, path):
    """Write a run's JSON document."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def smoke_verdict(bad, t0):
    """End a smoke run: exit 1 listing what went wrong, else say OK."""
    if bad:
        print("\nSMOKE FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        sys.exit(1)
    print("\nsmoke OK (%.1fs)" % (time.time() - t0))


def smoke_check(results):
    """Smoke mode asserts only that numbers were produced (never a timing)."""
    bad = []
    for name, peers in results.items():
        for peer, m in peers.items():
            if "unavailable" in m:  # reported in the table; not a failure of the harness
                continue
            if "failed" in m or not m.get("events") or m.get("ttft_p50_ms") is None:
                bad.append("%s/%s: %s" % (name, peer, m.get("failed", "no numbers")))
            elif peer != "direct" and m.get("cpu_s_per_10k_events") is None:
                bad.append("%s/%s: no peer CPU" % (name, peer))
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                    help="comma-separated, from %s or llmgate-wN (llmgate --workers N; only when named)"
                    % ",".join(ALL_PEERS))
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS))
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply stream counts (S5: the cap; SHORT: the arrival rate)")
    ap.add_argument("--repeat", type=int, default=1, help="repeats; medians are reported")
    ap.add_argument("--smoke", action="store_true", help="tiny run (5 streams x 5 tokens) for CI")
    ap.add_argument("--keepalive", action="store_true", help="load generator reuses connections")
    ap.add_argument("--llmgate-backlog", type=int, help="listen backlog for llmgate's port "
                    "(Twisted's default is 50; Go's listener uses net.core.somaxconn)")
    ap.add_argument("--fd-budget", type=int, help="sockets one process may hold (default: the hard "
                    "RLIMIT_NOFILE less %d); the load generator and upstream are split over processes, "
                    "and S5 capped per peer, by it; lower it to try the split at a small scale" % FD_RESERVE)
    ap.add_argument("--s5-rate", type=float, default=1000.0, help="S5: streams started per second")
    ap.add_argument("--s5-delay-ms", type=int, default=1000, help="S5: ms between a stream's tokens")
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
    scen = scenarios(args.scale, args.smoke, args.s5_rate, args.s5_delay_ms)
    for x in peers:
        if not known_peer(x):
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
    budget = args.fd_budget or fd_budget()
    upstreams = {}  # shard count -> Upstream; one process unless a scenario needs more

    def upstream_for(sc):
        k = upstream_shards(sc["c"], budget)
        if k not in upstreams:
            upstreams[k] = Upstream(workdir if k == 1 else tempfile.mkdtemp(prefix="up%d-" % k, dir=workdir),
                                    shards=k).start()
        return upstreams[k]
    raw = {n: {p: [] for p in peers} for n in names}
    t0 = time.time()
    try:
        for rep in range(args.repeat):
            for n in names:
                up = upstream_for(scen[n])
                for p in peers:
                    print("[%5.0fs] repeat %d %s %s ..." % (time.time() - t0, rep + 1, n, p), file=sys.stderr, flush=True)
                    raw[n][p].append(run_case(n, scen[n], p, up, workdir, args.keepalive,
                                              args.llmgate_backlog, budget))
                    time.sleep(1 if not args.smoke else 0.1)  # let sockets drain
    finally:
        for up in upstreams.values():
            up.stop()

    results = {n: {p: median_of(raw[n][p]) for p in peers} for n in names}
    end = machine_facts()
    facts.update(git_head_end=end["git_head"], git_dirty_paths_end=end["git_dirty_paths"])
    doc = {"time": stamp, "machine": facts, "args": vars(args), "scenarios": scen,
           "workdir": workdir, "results": results, "raw": raw, "elapsed_s": time.time() - t0}
    path = args.out or os.path.join(OUT, "%s-%s.json" % ("smoke" if args.smoke else "run", stamp))
    save(doc, path)
    print_report(doc, path)
    if args.smoke:
        smoke_verdict(smoke_check(results), t0)


if __name__ == "__main__":
    main()

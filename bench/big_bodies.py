"""
Big bodies from clients that hang up, against a real gateway.

Starts C{twistd -n llmgate-mock} and C{twistd -n llmgate} in front of it,
each its own process on 127.0.0.1, then: N clients each send a ~30 MB chat request and close the
connection as soon as the last byte is out, for R rounds, while one probe
client keeps opening small streams and timing their first body byte.
Prints the gateway's RSS (before, peak, after settling) and the probe's
time to first byte (before, during, after).

Standard library and the repo only; all traffic to 127.0.0.1; bounded in
clients, rounds and time.

    python bench/big_bodies.py [--src DIR] [--clients 20] [--mb 30] [--rounds 2]

C{--src} runs another checkout of llmgate (e.g. an older commit unpacked
with C{git archive}), to compare.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class Daemon:
    """C{twistd -n PLUGIN ARGS} with C{src} first on the path, stopped by pid."""

    def __init__(self, src: str, workdir: str, plugin: str, args: list[str], listening: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        env["BENCH_UPSTREAM_KEY"] = "sk-bench"
        cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", plugin, *args]
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.port = 0
        got = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                m = re.search(listening, line)
                if m and not got.is_set():
                    self.port = int(m.group(1))
                    got.set()

        threading.Thread(target=read, daemon=True).start()
        if not got.wait(30):
            self.stop()
            raise SystemExit(f"{plugin} did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(src: str, workers: int = 1) -> list[Daemon]:
    """
    Two mock providers and a gateway in front of them, each its own
    process: the probe's model is served by a mock of its own, so that its
    first-byte times measure the gateway, not a mock busy parsing the big
    bodies relayed to the other.
    """
    workdir = tempfile.mkdtemp(prefix="llmgate-bench-")
    procs: list[Daemon] = []
    try:
        for _ in range(2):
            procs.append(Daemon(src, workdir, "llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], r"Site starting on (\d+)"))
        conf = os.path.join(workdir, "llmgate.toml")
        with open(conf, "w") as f:
            for name, mock, default in (("bulk", procs[0], "true"), ("probe", procs[1], "false")):
                f.write(
                    f"[providers.{name}]\n"
                    'kind = "openai"\n'
                    f'base_url = "http://127.0.0.1:{mock.port}/v1"\n'
                    'api_key_env = "BENCH_UPSTREAM_KEY"\n'
                    f"default = {default}\n"
                )
            f.write('[models."probe-model"]\nprovider = "probe"\nupstream_model = "gpt-4o-mini"\n')
        # One gateway process (its RSS is what is read); 0 for a checkout
        # from before --workers existed.
        extra = ["--workers", str(workers)] if workers else []
        procs.append(Daemon(src, workdir, "llmgate", ["--config", conf, *extra, "--port", "tcp:0:interface=127.0.0.1"], r"GatewaySite starting on (\d+)"))
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


class Probe(threading.Thread):
    """Small streams one after another; (start, ttft or None) for each."""

    BODY = json.dumps({"model": "probe-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.results: list[tuple[float, float | None]] = []
        self.halt = threading.Event()

    def once(self) -> float | None:
        t0 = time.monotonic()
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            c.request("POST", "/v1/chat/completions", self.BODY, {"content-type": "application/json"})
            r = c.getresponse()
            first = r.read(1)
            ttft = time.monotonic() - t0
            r.read()
            c.close()
            return ttft if (r.status == 200 and first) else None
        except OSError:
            return None

    def run(self) -> None:
        while not self.halt.is_set():
            start = time.monotonic()
            self.results.append((start, self.once()))
            self.halt.wait(0.05)


def hang_up_client(port: int, payload: bytes, errors: list[str]) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=120)
        s.sendall(head)
        s.sendall(payload)
        s.close()  # hang up without reading the answer
    except OSError as e:
        errors.append(repr(e))


def summary(values: list[float]) -> str:
    if not values:
        return "n=0"
    v = sorted(values)
    p95 = v[min(len(v) - 1, int(len(v) * 0.95))]
    return f"n={len(v)} p50={statistics.median(v) * 1000:.0f} ms p95={p95 * 1000:.0f} ms max={v[-1] * 1000:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=HERE, help="checkout of llmgate to run (default: this one)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--mb", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="gateway --workers (0: omit, for checkouts without it)")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds to wait after the attack before measuring again")
    a = ap.parse_args()
    if not (1 <= a.clients <= 100 and 0 < a.mb <= 32 and 1 <= a.rounds <= 10 and 0 <= a.settle <= 120):
        raise SystemExit("bounds: clients 1..100, mb <= 32, rounds 1..10, settle <= 120")

    procs = start(a.src, a.workers)
    gw = procs[-1]
    try:
        pid = gw.proc.pid
        content = "x" * int(a.mb * 1024 * 1024 - 200)
        payload = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": content}]}).encode()
        del content
        probe = Probe(gw.port)
        for _ in range(5):
            probe.once()  # warm up
        rss_before = rss_mib(pid)
        probe.start()
        time.sleep(2.0)
        peak = [rss_before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                try:
                    peak[0] = max(peak[0], rss_mib(pid))
                except OSError:
                    return
                sampling.wait(0.1)

        threading.Thread(target=sample, daemon=True).start()
        attack_start = time.monotonic()
        errors: list[str] = []
        for _ in range(a.rounds):
            threads = [threading.Thread(target=hang_up_client, args=(gw.port, payload, errors)) for _ in range(a.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        attack_end = time.monotonic()
        timeline = []
        while time.monotonic() < attack_end + a.settle:
            timeline.append(f"{time.monotonic() - attack_end:.0f}s:{rss_mib(pid):.0f}")
            time.sleep(min(2.5, max(0.0, attack_end + a.settle - time.monotonic())))
        settled = time.monotonic()
        rss_after = rss_mib(pid)
        time.sleep(2.0)
        probe.halt.set()
        probe.join(70)
        sampling.set()

        def window(lo: float, hi: float) -> list[tuple[float, float | None]]:
            return [(s, t) for s, t in probe.results if lo <= s < hi]

        before = window(0, attack_start)
        during = window(attack_start, attack_end + a.settle)
        after = window(settled, float("inf"))
        print(f"gateway src: {a.src}")
        print(f"attack: {a.clients} clients x {a.rounds} rounds x {len(payload) / 1e6:.1f} MB, hang up after sending; "
              f"sent in {attack_end - attack_start:.1f} s; client errors: {len(errors)}")
        print(f"RSS MiB: before {rss_before:.0f}, peak {peak[0]:.0f}, {a.settle:.0f} s after {rss_after:.0f}")
        print(f"RSS MiB after the attack: {' '.join(timeline)}")
        for name, rows in (("before", before), ("during+settle", during), ("after", after)):
            ok = [t for _, t in rows if t is not None]
            print(f"probe TTFT {name}: {summary(ok)}, failed {sum(1 for _, t in rows if t is None)}")
        worst = max(((t, s - attack_start) for s, t in during if t is not None), default=None)
        if worst:
            print(f"worst probe TTFT {worst[0] * 1000:.0f} ms, started {worst[1]:.1f} s into the attack")
        outcomes: dict[str, int] = {}
        for line in gw.lines:
            m = re.search(r"status=(\d+) outcome=(\w+)", line)
            if m and "/v1/chat/completions" in line:
                outcomes[f"{m.group(1)}/{m.group(2)}"] = outcomes.get(f"{m.group(1)}/{m.group(2)}", 0) + 1
        print(f"gateway records (status/outcome: count): {outcomes}")
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()

# -*- test-case-name: tests.e2e.test_workers -*-
"""
End to end: C{twistd -n llmgate --workers 2} with real processes. Both
workers serve; one killed with SIGKILL mid-stream loses only its own
streams (marked interrupted by the supervisor, which starts a
replacement) while the other keeps relaying; SIGTERM drains and stops
everything; a port in use ends the supervisor with one line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from tests.e2e.procs import Daemon, gateway_config
from tests.e2e.test_kill import GATEWAY_KEY, _open_stream, _wait_for_event


def _complete(port: int, key: str = GATEWAY_KEY) -> int:
    """One non-streamed chat completion; its status."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps({"model": "public-name", "messages": []}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def _complete_keyless(port: int) -> int:
    """One non-streamed chat completion to a keyless (loopback) gateway."""
    req = urllib.request.Request(
        f"http://localhost:{port}/v1/chat/completions",
        data=json.dumps({"model": "gpt-4o", "messages": []}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=20) as r:
        r.read()
        return r.status


def _finite_stream(port: int, tokens: int, delay_ms: int) -> socket.socket:
    body = json.dumps({"model": "public-name", "stream": True, "messages": []}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + GATEWAY_KEY.encode() + b"\r\nConnection: close\r\n"
        b"x-mock-tokens: %d\r\nx-mock-delay-ms: %d\r\n" % (tokens, delay_ms)
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    return s


def _owners(ledger: str) -> dict[str, tuple[str, str]]:
    """request_id -> (outcome, owner) of every row."""
    conn = sqlite3.connect(ledger, timeout=10)
    try:
        return {rid: (outcome, owner) for rid, outcome, owner in conn.execute("SELECT request_id, outcome, owner FROM usage")}
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _wait(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class WorkersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmgate-e2e-")

    def test_kill_one_worker_mid_stream(self) -> None:
        """
        Requests are served by both workers. SIGKILL on one while streams
        relay: the other's streams keep relaying and new requests are
        served, the supervisor marks exactly the killed worker's requests
        interrupted (not the live one's) and starts a replacement; every
        request has exactly one row; /metrics sums both workers; SIGTERM
        drains and the supervisor exits as a single process does.
        """
        mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], self.dir)
        self.addCleanup(mock.stop)
        ledger = os.path.join(self.dir, "usage.db")
        conf = os.path.join(self.dir, "llmgate.toml")
        mport = _free_port()
        with open(conf, "w") as f:
            f.write(gateway_config(
                mock.port,
                f'[ledger]\npath = "{ledger}"\n[keys.team-e2e]\napi_key_env = "E2E_GW_KEY"\n'
                f'[metrics]\nport = "tcp:{mport}:interface=127.0.0.1"\n',
            ))
        env = {"E2E_UPSTREAM_KEY": "k", "E2E_GW_KEY": GATEWAY_KEY}
        gw = Daemon(
            "llmgate", ["--config", conf, "--workers", "2", "--port", "tcp:0:interface=127.0.0.1"], self.dir, env=env
        )
        self.addCleanup(gw.stop)
        pids = {}
        for i in (0, 1):
            m = gw.wait_for(rf"worker {i} \(pid (\d+)\) is serving")
            pids[m.group(1)] = i

        # Streams until both workers relay some (the kernel picks who accepts).
        socks = []
        for _ in range(60):
            s = _open_stream(gw.port)
            self.addCleanup(s.close)
            _wait_for_event(s)
            socks.append(s)
            rows = _wait(lambda: _owners(ledger) if len(_owners(ledger)) == len(socks) else None, "open rows")
            if len({owner for _, owner in rows.values()}) == 2 and len(socks) >= 4:
                break
        rows = _owners(ledger)
        self.assertEqual({owner for _, owner in rows.values()}, set(pids))
        self.assertEqual({outcome for outcome, _ in rows.values()}, {"open"})
        quick_before = [_complete(gw.port) for _ in range(10)]
        self.assertEqual(quick_before, [200] * 10)
        # A request that ended less than a batch interval before a SIGKILL
        # may have no row (the ledger's documented bound): let them land.
        _wait(
            lambda: sum(1 for o, _ in _owners(ledger).values() if o == "completed") == 10,
            "the quick requests' records",
        )

        # Which socket belongs to which worker: the open rows in order of ts.
        conn = sqlite3.connect(ledger)
        opened = list(conn.execute("SELECT request_id, owner FROM usage WHERE outcome = 'open' ORDER BY ts, rowid"))
        conn.close()
        stream_owner = [o for _, o in opened]
        self.assertEqual(len(stream_owner), len(socks))
        victim = stream_owner[0]
        survivors = [s for s, o in zip(socks, stream_owner) if o != victim]
        self.assertTrue(survivors)

        os.kill(int(victim), signal.SIGKILL)
        gw.wait_for(rf"worker {pids[victim]} \(pid {victim}\) exited \(signal 9\)")
        gw.wait_for(rf"requests in flight on worker pid {victim} are marked interrupted")
        new = gw.wait_for(rf"worker {pids[victim]} started \(pid (?!{victim}\))(\d+)\)").group(1)
        gw.wait_for(rf"worker {pids[victim]} \(pid {new}\) is serving")

        # The survivor's streams still relay.
        for s in survivors:
            s.settimeout(10)
            self.assertIn(b"data:", s.recv(65536))
        quick_after = [_complete(gw.port) for _ in range(10)]
        self.assertEqual(quick_after, [200] * 10)

        rows = _owners(ledger)
        victims = [rid for rid, o in opened if o == victim]
        live = [rid for rid, o in opened if o != victim]
        self.assertEqual({rows[r][0] for r in victims}, {"interrupted"})
        self.assertEqual({rows[r][0] for r in live}, {"open"})
        self.assertEqual(len(live), len(survivors))

        # /metrics: the sum over the workers, the dead one's counters kept.
        def completed() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
                text = r.read().decode()
            m = re.search(
                r'llmgate_requests_total\{key="team-e2e",outcome="completed",provider="mock",route="/v1/chat/completions",status="200"\} (\S+)', text
            )
            return float(m.group(1)) if m else 0.0

        # Counted as each request's record is made, just after its response.
        _wait(lambda: completed() == 20.0, "20 completed requests in /metrics")

        for s in survivors:
            s.close()
        _wait(
            lambda: all(_owners(ledger)[r][0] != "open" for r in live), "the cancelled streams' final records"
        )
        # SIGTERM while a stream relays: the worker drains it to its end.
        draining = _finite_stream(gw.port, tokens=30, delay_ms=50)
        self.addCleanup(draining.close)
        _wait_for_event(draining)
        os.kill(gw.pid, signal.SIGTERM)
        rest = b""
        while True:
            chunk = draining.recv(65536)
            if not chunk:
                break
            rest += chunk
        self.assertIn(b"data: [DONE]", rest)
        self.assertEqual(gw.proc.wait(30), -signal.SIGTERM)
        self.assertEqual(gw.stop(), -signal.SIGTERM)
        self.assertIn("stopping 2 workers", gw.output())
        self.assertNotIn("Traceback", gw.output())

        final = read_records(ledger)
        ids = [r["request_id"] for r in final]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(len(final), len(socks) + 21)
        outcomes = sorted(r["outcome"] for r in final)
        self.assertEqual(outcomes.count("completed"), 21)
        self.assertEqual(outcomes.count("interrupted"), len(victims))
        self.assertEqual(outcomes.count("client_cancelled"), len(survivors))
        self.assertFalse(any(p for p in pids if os.path.exists(f"/proc/{p}") and _alive(int(p))))
        self.assertNotIn(GATEWAY_KEY, gw.output())

    def test_gc_metrics_summed(self) -> None:
        """
        --workers 2: the collector's pause histogram and freed-objects
        counter are on the supervisor's /metrics, the sum of both workers'
        (each worker's own multiprocess file holds its young collections,
        and the served count is at least the two added).
        """
        import shutil

        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        conf = os.path.join(self.dir, "llmgate.toml")
        mport = _free_port()
        with open(conf, "w") as f:
            f.write(gateway_config(
                _free_port(), f'[ledger]\nenabled = false\n[metrics]\nport = "tcp:{mport}:interface=127.0.0.1"\n'
            ))
        gw = Daemon(
            "llmgate", ["--config", conf, "--workers", "2", "--port", "tcp:0:interface=127.0.0.1"], self.dir,
            env={"E2E_UPSTREAM_KEY": "k"},
        )
        self.addCleanup(gw.stop)
        pids = [gw.wait_for(rf"worker {i} \(pid (\d+)\) is serving").group(1) for i in (0, 1)]
        with open(f"/proc/{pids[0]}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        path = env[b"PROMETHEUS_MULTIPROC_DIR"].decode()

        def young(text: str) -> float:
            m = re.search(r'^llmgate_gc_pause_seconds_count\{generation="0"\} (\S+)$', text, re.M)
            return float(m.group(1)) if m else 0.0

        def own(pid: str) -> float:
            """One worker's count, from its own files only."""
            alone = tempfile.mkdtemp(dir=self.dir)
            for name in os.listdir(path):
                if name.endswith(f"_{pid}.db"):
                    shutil.copyfile(os.path.join(path, name), os.path.join(alone, name))
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=alone)
            return young(generate_latest(registry).decode())

        def both() -> Any:
            counts = [own(p) for p in pids]
            return counts if all(counts) else None

        # Pushed once a second; young collections run every 25 ms.
        counts = _wait(both, "both workers' young collections in their files")
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            text = r.read().decode()
        self.assertGreaterEqual(young(text), sum(counts))
        self.assertRegex(text, r'llmgate_gc_pause_seconds_bucket\{generation="0",le="\+Inf"\} \d')
        self.assertRegex(text, r'llmgate_gc_collected_objects_total\{generation="0"\} \d')
        self.assertRegex(text, r"# TYPE llmgate_gc_pause_seconds histogram")

    def test_sighup_reloads_every_worker(self) -> None:
        """
        SIGHUP to the supervisor reaches every worker: each re-reads the
        file (and logs it), and a gateway key added by the edit is
        accepted whichever worker takes the request.
        """
        mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], self.dir)
        self.addCleanup(mock.stop)
        conf = os.path.join(self.dir, "llmgate.toml")
        base = gateway_config(mock.port, f'[ledger]\nenabled = false\n[keys.team-e2e]\napi_key_env = "E2E_GW_KEY"\n')
        with open(conf, "w") as f:
            f.write(base)
        env = {"E2E_UPSTREAM_KEY": "k", "E2E_GW_KEY": GATEWAY_KEY, "E2E_GW_KEY2": "gw-second-key"}
        gw = Daemon(
            "llmgate", ["--config", conf, "--workers", "2", "--port", "tcp:0:interface=127.0.0.1"], self.dir, env=env
        )
        self.addCleanup(gw.stop)
        for i in (0, 1):
            gw.wait_for(rf"worker {i} \(pid \d+\) is serving")
        self.assertEqual(_complete(gw.port, key="gw-second-key"), 401)
        with open(conf, "w") as f:
            f.write(base + '[keys.team-two]\napi_key_env = "E2E_GW_KEY2"\n')
        os.kill(gw.pid, signal.SIGHUP)
        for i in (0, 1):
            gw.wait_for(rf"\[worker-{i} llmgate.reload#info\] config reloaded from")
        self.assertEqual([_complete(gw.port, key="gw-second-key") for _ in range(8)], [200] * 8)
        self.assertNotIn("Traceback", gw.output())

    def test_systemd_socket_shared_by_workers(self) -> None:
        """
        A socket passed by systemd (socket activation) is adopted by every
        worker and served; after the gateway stops, the socket (still held by
        "systemd", here the test) keeps accepting into its queue, and a
        gateway started again serves what queued.
        """
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.addCleanup(sock.close)
        port = sock.getsockname()[1]

        def start() -> Daemon:
            gw = Daemon(
                "llmgate",
                ["--demo", "--workers", "2", "--port", "systemd:domain=INET:index=0"],
                self.dir,
                systemd_fd=sock.fileno(),
            )
            self.addCleanup(gw.stop)
            for i in (0, 1):
                gw.wait_for(rf"worker {i} \(pid \d+\) is serving")
            return gw

        gw = start()
        self.assertEqual(gw.port, port)
        for _ in range(8):
            self.assertEqual(_complete_keyless(port), 200)
        adopted = set(re.findall(rf"\[worker-(\d) -\] GatewaySite starting on {port}", gw.output()))
        self.assertEqual(adopted, {"0", "1"})
        self.assertEqual(gw.stop(), -signal.SIGTERM)

        # Between runs the socket stays open: a client connects and waits.
        early = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(early.close)
        start()
        body = json.dumps({"model": "gpt-4o", "messages": []}).encode()
        early.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        early.settimeout(20)
        self.assertTrue(early.recv(65536).startswith(b"HTTP/1.1 200"))

    def test_workers_stop_when_supervisor_killed(self) -> None:
        """
        SIGKILL on the supervisor: its workers get SIGTERM from the kernel
        (parent-death signal) and exit, instead of serving on unsupervised.
        """
        gw = Daemon("llmgate", ["--demo", "--workers", "2", "--port", "tcp:0:interface=127.0.0.1"], self.dir)
        self.addCleanup(gw.stop)
        pids = [int(gw.wait_for(rf"worker {i} \(pid (\d+)\) is serving").group(1)) for i in (0, 1)]
        os.kill(gw.pid, signal.SIGKILL)
        self.assertEqual(gw.proc.wait(10), -signal.SIGKILL)
        _wait(lambda: not any(_alive(p) for p in pids), "the workers to exit")
        gw.wait_for("worker 0: signal 15, draining")

    def test_port_in_use_exits_1(self) -> None:
        """
        With workers too, a --port already bound ends twistd with status 1
        and one line naming the endpoint, before any worker starts.
        """
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        d = Daemon(
            "llmgate", ["--demo", "--workers", "2", "--port", f"tcp:{port}:interface=127.0.0.1"], self.dir, wait=False
        )
        self.addCleanup(d.stop)
        self.assertEqual(d.proc.wait(30), 1)
        d.stop()
        out = d.output()
        self.assertIn(f"cannot listen on tcp:{port}:interface=127.0.0.1:backlog=4096 (--port): Address already in use", out)
        self.assertNotIn("worker 0 started", out)
        self.assertNotIn("Traceback", out)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False

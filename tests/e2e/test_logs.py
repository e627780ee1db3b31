"""
End to end: the access line and C{--log-format json} of a real twistd
process, alone and under C{--workers 2}, with request ids from an SDK.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from typing import Any

import openai
from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.procs import Daemon


def _access(gw: Daemon, client_id: str, timeout: float = 20.0) -> dict[str, Any]:
    """The JSON access object of the request sent with C{client_id}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in gw.output().splitlines():
            if client_id in line and '"msg":"access"' in line:
                return json.loads(line)
        time.sleep(0.05)
    raise AssertionError("no access line for " + client_id + ":\n" + gw.output())


class JSONLogTests(SynchronousTestCase):
    def run_json(self, workers: str) -> None:
        tmp = tempfile.mkdtemp()
        gw = Daemon("llmgate", ["--demo", "--port", "tcp:0:interface=127.0.0.1", "--log-format", "json", "--workers", workers], tmp)
        self.addCleanup(gw.stop)
        client = openai.OpenAI(base_url=gw.url("/v1"), api_key="none", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_headers={"X-Request-Id": f"e2e-json-{workers}"},
        )
        self.assertEqual(raw.headers["x-request-id"], f"e2e-json-{workers}")
        list(raw.parse())
        rec = _access(gw, f"e2e-json-{workers}")
        self.assertEqual(rec["method"], "POST")
        self.assertEqual(rec["route"], "/v1/chat/completions")
        self.assertEqual(rec["client"], "127.0.0.1")
        self.assertEqual(rec["key"], "anonymous")
        self.assertEqual(rec["model"], "gpt-4o-mini")
        self.assertEqual(rec["provider"], "mock-openai")
        self.assertEqual((rec["status"], rec["outcome"], rec["stream"]), (200, "completed", True))
        self.assertGreater(rec["input_tokens"], 0)
        self.assertGreater(rec["output_tokens"], 0)
        self.assertGreater(rec["cost_usd"], 0)
        self.assertGreaterEqual(rec["duration_ms"], rec["ttft_ms"])
        self.assertRegex(rec["request_id"], "^[0-9a-f]{32}$")
        self.assertTrue(rec["upstream_id"])
        if workers != "1":
            self.assertIn("worker", rec)
        [startup] = [json.loads(l)["startup"] for l in gw.output().splitlines() if '"startup":' in l]
        self.assertEqual(startup["listening"][0]["address"], f"127.0.0.1:{gw.port}")
        self.assertEqual((startup["workers"], startup["demo"]), (int(workers), True))
        gw.stop()
        # Every line of the process tree, the start-up and shutdown
        # included, is one JSON object.
        for line in gw.output().splitlines():
            if line.strip():
                obj = json.loads(line)
                self.assertIn("time", obj, line)
                self.assertIn("msg", obj, line)

    def test_json_lines(self) -> None:
        """--log-format json: every line is a JSON object; the access object has the request's fields."""
        self.run_json("1")

    def test_json_lines_workers(self) -> None:
        """--log-format json under --workers 2: the workers' lines are JSON objects too."""
        self.run_json("2")

    def test_text_access_line(self) -> None:
        """The text access line names the client, tokens, cost and the ids."""
        tmp = tempfile.mkdtemp()
        gw = Daemon("llmgate", ["--demo", "--port", "tcp:0:interface=127.0.0.1"], tmp)
        self.addCleanup(gw.stop)
        client = openai.OpenAI(base_url=gw.url("/v1"), api_key="none", max_retries=0)
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Request-Id": "e2e-text-1"},
        )
        m = gw.wait_for(r"POST /v1/chat/completions client=127\.0\.0\.1 key=anonymous model=gpt-4o-mini .* "
                        r"in=\d+ out=\d+ cost=0\.\d+ ttft_ms=[\d.]+ ms=[\d.]+ .*id=[0-9a-f]{32} client_id=e2e-text-1 upstream_id=\S+")
        self.assertTrue(m)

    def test_startup_block(self) -> None:
        """Start-up logs one block: version, demo, workers, providers, bound address, ledger, metrics."""
        from llmgate import __version__

        tmp = tempfile.mkdtemp()
        gw = Daemon("llmgate", ["--demo", "--port", "0", "--workers", "2"], tmp)
        self.addCleanup(gw.stop)
        gw.wait_for("metrics: ")
        out = gw.output()
        block = out[out.index(f"llmgate {__version__} running (demo"):]
        for want in ("workers: 2 worker processes", "mock-openai: openai at http://127.0.0.1:",
                     f"listening: 127.0.0.1:{gw.port} (tcp:0:interface=127.0.0.1",
                     "a bare port (0) listens on 127.0.0.1 only", f"ledger: {tmp}/llmgate-usage.db", "metrics: off"):
            self.assertIn(want, block)

    def test_json_lines_daemonized_workers(self) -> None:
        """
        A daemonized twistd (--logfile) under --workers 2: the supervisor
        relays its workers' JSON lines into its log file as they are, one
        object per line.
        """
        import os
        import signal

        log, pid, port = _daemonized(["--workers", "2", "--log-format", "json"])

        def stop() -> None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)

        self.addCleanup(stop)

        def text() -> str:
            with open(log) as f:
                return f.read()

        deadline = time.monotonic() + 30
        while text().count("is serving") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Request-Id": "daemon-1"}
        )
        deadline = time.monotonic() + 20
        while '"client_request_id":"daemon-1"' not in text() and time.monotonic() < deadline:
            time.sleep(0.1)
        stop()
        objs = [json.loads(line) for line in text().splitlines() if line.strip()]
        [access] = [o for o in objs if o.get("client_request_id") == "daemon-1"]
        self.assertEqual((access["msg"], access["status"], access["model"]), ("access", 200, "gpt-4o-mini"))
        self.assertIn("worker", access)
        self.assertIn("startup", [k for o in objs for k in o])


def _daemonized(extra: list[str]) -> tuple[str, int, int]:
    """
    Start a daemonized C{twistd llmgate --demo} (C{--logfile}, C{--pidfile})
    on a free loopback port with C{extra} options; its log path, pid and port.
    """
    import os
    import socket
    import subprocess
    import sys

    tmp = tempfile.mkdtemp()
    log, pidfile = os.path.join(tmp, "gw.log"), os.path.join(tmp, "gw.pid")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", f"--logfile={log}",
         f"--pidfile={pidfile}", "llmgate", "--demo", "--port", f"tcp:{port}:interface=127.0.0.1", *extra],
        cwd=tmp, check=True, timeout=60,
    )
    with open(pidfile) as f:
        return log, int(f.read()), port


def _post(port: int, n: int, prefix: str) -> None:
    """n chat requests, one after another, with ids prefix-0 .. prefix-(n-1)."""
    import urllib.request

    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    for i in range(n):
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=body, method="POST",
            headers={"Content-Type": "application/json", "X-Request-Id": f"{prefix}-{i}"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()


class BufferedAccessLogTests(SynchronousTestCase):
    """Access lines are buffered briefly: none may be lost or reordered at a stop."""

    N = 30

    def stopped_at_once(self, args: list[str]) -> list[str]:
        """The log lines of a gateway stopped (SIGTERM) right after its last answer."""
        gw = Daemon("llmgate", ["--demo", "--port", "tcp:0:interface=127.0.0.1", *args], tempfile.mkdtemp())
        self.addCleanup(gw.stop)
        if "2" in args:
            deadline = time.monotonic() + 30
            while gw.output().count("is serving") < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
        _post(gw.port, self.N, "stop")
        gw.stop()
        return gw.output().splitlines()

    def assert_all_in_order(self, ids: list[str], ordered: bool = True) -> None:
        want = [f"stop-{i}" for i in range(self.N)]
        self.assertEqual(ids if ordered else sorted(ids, key=lambda s: int(s[5:])), want)

    def test_text_lines_kept_at_stop(self) -> None:
        """Text format: every request's access line is written, once and in order, by a stop right after."""
        lines = [l for l in self.stopped_at_once([]) if "[llmgate.access#info] POST" in l]
        self.assertRegex(lines[0], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[llmgate\.access#info\] POST /v1/chat/completions ")
        self.assert_all_in_order([l.split(" client_id=")[1].split()[0] for l in lines])

    def test_json_lines_kept_at_stop(self) -> None:
        """JSON format: every request's access object is written, once and in order, by a stop right after."""
        objs = [json.loads(l) for l in self.stopped_at_once(["--log-format", "json"]) if l.strip()]
        self.assert_all_in_order([o["client_request_id"] for o in objs if o.get("msg") == "access"])

    def test_worker_lines_kept_at_stop(self) -> None:
        """Under --workers 2 every access line (tagged worker-N) is written by a stop right after."""
        lines = [l for l in self.stopped_at_once(["--workers", "2"]) if "llmgate.access#info] POST" in l]
        self.assertTrue(all(re.search(r" \[worker-[01] llmgate\.access#info\] POST ", l) for l in lines), lines[:3])
        # Two processes write their own lines: each in order, all there.
        self.assert_all_in_order([l.split(" client_id=")[1].split()[0] for l in lines], ordered=False)

    def test_daemonized_text_logfile(self) -> None:
        """
        A daemonized twistd (--logfile, text format) writes the access lines
        to its file in twistd's format, all of them by the time it stops.
        """
        import os
        import signal

        log, pid, port = _daemonized(["--workers", "1"])

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        def kill() -> None:
            if not gone():
                os.kill(pid, signal.SIGKILL)

        self.addCleanup(kill)
        deadline = time.monotonic() + 30
        while True:
            try:
                _post(port, 1, "warm")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        _post(port, self.N, "stop")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertTrue(gone())
        with open(log) as f:
            lines = [l for l in f.read().splitlines() if "[llmgate.access#info] POST" in l]
        self.assertRegex(lines[-1], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[llmgate\.access#info\] POST ")
        self.assert_all_in_order([l.split(" client_id=")[1].split()[0] for l in lines if "client_id=stop-" in l])

"""
End to end: the status page on the admin listener, loaded by a real
headless Chromium after real traffic through a real twistd gateway in
front of the mock provider.

Under C{--workers 2}, the supervisor's page of the workers' summed
metrics, in the same browser.

Chromium is required (CI installs Debian's C{chromium}); without it these
tests fail with a message saying so, they do not skip.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmgate import cli
from tests.e2e.procs import Daemon, gateway_config

# $1000 per million tokens: a few mock requests cost cents.
PRICES = '[prices."gpt-4o-mini"]\ninput = 1000.0\noutput = 1000.0\n'


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(
        "chromium is not installed: the status page is tested in a real headless browser. "
        "Install it (Debian: apt-get install -y chromium; .ci/run does this)."
    )


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _post(port: int, body: dict[str, Any], key: str, fault: str = "") -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    if fault:
        headers["x-mock-fault"] = fault
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post_local(port: int, body: dict[str, Any], fault: str = "") -> tuple[int, bytes]:
    """A keyless gateway answers loopback Host names only."""
    headers = {"Content-Type": "application/json", "Host": "localhost"}
    if fault:
        headers["x-mock-fault"] = fault
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _browser(*args: str) -> subprocess.CompletedProcess[str]:
    home = tempfile.mkdtemp(prefix="llmgate-chromium-")
    try:
        return subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={home}", "--no-first-run", *args],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": home},
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _text(dom: str, element_id: str) -> str:
    """The text of the element with id C{element_id} (tags stripped)."""
    m = re.search(rf'<(\w+)[^>]*\bid="?{element_id}"?[^>]*>(.*?)</\1>', dom, re.S)
    assert m, f"no #{element_id} in the page:\n{dom}"
    return re.sub(r"<[^>]+>", " ", m.group(2))


class StatusPageTests(SynchronousTestCase):
    def test_page_after_real_traffic(self) -> None:
        """
        After three completed streams and an upstream 500, the page that
        Chromium renders shows the provider's request and error counts,
        TTFT percentiles in ms, the error row (route, model, provider,
        status 500) and the budgeted key's spend against its budget, and
        no secret; the screenshot is a real PNG of some size.
        """
        _chromium()
        d = tempfile.mkdtemp(prefix="llmgate-e2e-status-")
        self.addCleanup(shutil.rmtree, d, True)
        keyfile = os.path.join(d, "llmgate-keys.json")
        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(io.StringIO()):
            self.assertEqual(
                cli.main(["keys", "--file", keyfile, "create", "team-a", "--budget", "5", "--period", "day"]), 0
            )
        secret = out.getvalue().strip()
        mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], d)
        self.addCleanup(mock.stop)
        mport = _free_port()
        conf = os.path.join(d, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(gateway_config(
                mock.port,
                PRICES + f'[ledger]\npath = "{d}/usage.db"\n[metrics]\nport = "tcp:{mport}:interface=127.0.0.1"\n',
            ))
        gw = Daemon(
            "llmgate", ["--config", conf, "--port", "tcp:0:interface=127.0.0.1"], d,
            env={"E2E_UPSTREAM_KEY": "sk-upstream-secret-e2e"},
        )
        self.addCleanup(gw.stop)
        gw.wait_for(r"\[metrics\] port|starting on %d" % mport)

        stream = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        # A budgeted key waits for the spend to be loaded from the ledger.
        deadline = time.monotonic() + 20
        probes = 1
        while _post(gw.port, {**stream, "stream": False}, secret)[0] == 503:
            self.assertLess(time.monotonic(), deadline, "the spend was never loaded")
            probes += 1
            time.sleep(0.1)
        for _ in range(3):
            status, body = _post(gw.port, stream, secret)
            self.assertEqual(status, 200)
            self.assertIn(b"[DONE]", body)
        status, _ = _post(gw.port, stream, secret, fault="status-500")
        self.assertGreaterEqual(status, 500)
        url = f"http://127.0.0.1:{mport}/status"
        # Records are made just after each response: wait for the fourth.
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(url, timeout=10) as r:
                raw = r.read().decode()
            if "<tr class=error>" in raw:
                break
            if time.monotonic() > deadline:
                self.fail(f"no error row in time:\n{raw}")
            time.sleep(0.1)

        done = _browser("--dump-dom", url)
        self.assertEqual(done.returncode, 0, done.stderr)
        dom = done.stdout
        self.assertIn("<title>llmgate status</title>", dom)
        # The provider row: one error among the requests.
        row = re.search(r'<tr data-provider="mock">(.*?)</tr>', dom, re.S)
        self.assertIsNotNone(row, dom)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
        self.assertEqual(cells[0], "mock")
        # Three streams, the 500 and the probe that was served (a probe
        # refused at admission never reached a provider: row "-").
        self.assertEqual(int(cells[1]), 5)
        if probes > 1:
            self.assertIn('data-provider="-"', dom)
        self.assertEqual(int(cells[2]), 1)
        # TTFT: samples and three percentiles in ms.
        ttft = _text(dom, "ttft")
        nums = re.findall(r"(\d+(?:\.\d+)?) ms", ttft)
        self.assertEqual(len(nums), 3, ttft)
        # Samples: the three completed streams (not the error, nor the
        # non-streamed probes).
        self.assertEqual(int(re.search(r"\b(\d+)\b", ttft).group(1)), 3)
        # The error row.
        errors = re.findall(r'<tr class="error">(.*?)</tr>', dom, re.S)
        self.assertEqual(len(errors), 1, dom)
        ecells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", errors[0], re.S)]
        self.assertEqual(ecells[1:5], ["/v1/chat/completions", "gpt-4o-mini", "mock", "500"])
        self.assertEqual(ecells[5], "upstream_error")
        # Spend per key against budget.
        spend = _text(dom, "spend")
        self.assertIn("team-a", spend)
        self.assertIn("$5.00", spend)
        self.assertIn("day", spend)
        self.assertNotIn("sk-upstream-secret-e2e", dom)
        self.assertNotIn(secret, dom)

        self.assert_screenshot(url, d, "single")

    def test_supervisor_page_under_workers(self) -> None:
        """
        Under C{--workers 2} the supervisor's page, loaded by Chromium,
        shows the requests of both workers summed: completed and
        upstream_error counts, the provider's requests and errors, TTFT
        percentiles, and says what it leaves out.
        """
        _chromium()
        d = tempfile.mkdtemp(prefix="llmgate-e2e-status-")
        self.addCleanup(shutil.rmtree, d, True)
        mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], d)
        self.addCleanup(mock.stop)
        mport = _free_port()
        conf = os.path.join(d, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(gateway_config(
                mock.port, f'[ledger]\nenabled = false\n[metrics]\nport = "tcp:{mport}:interface=127.0.0.1"\n'
            ))
        gw = Daemon(
            "llmgate", ["--config", conf, "--workers", "2", "--port", "tcp:0:interface=127.0.0.1"], d,
            env={"E2E_UPSTREAM_KEY": "sk-upstream-secret-e2e"},
        )
        self.addCleanup(gw.stop)
        for i in (0, 1):
            gw.wait_for(rf"worker {i} \(pid \d+\) is serving")
        stream = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(6):
            self.assertEqual(_post_local(gw.port, stream)[0], 200)
        self.assertGreaterEqual(_post_local(gw.port, stream, fault="status-500")[0], 500)

        url = f"http://127.0.0.1:{mport}/status"
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(url, timeout=10) as r:
                raw = r.read().decode()
            if re.search(r'data-outcome="upstream_error"><td class=l>upstream_error</td><td class=err>1<', raw) and \
                    re.search(r'data-outcome="completed"><td class=l>completed</td><td>6<', raw):
                break
            self.assertLess(time.monotonic(), deadline, f"the workers' requests never showed:\n{raw}")
            time.sleep(0.2)

        done = _browser("--dump-dom", url)
        self.assertEqual(done.returncode, 0, done.stderr)
        dom = done.stdout
        self.assertIn("2 worker processes", dom)
        self.assertRegex(dom, r'<tr data-outcome="completed"><td class="l">completed</td><td>6</td></tr>')
        self.assertRegex(dom, r'<tr data-outcome="upstream_error"><td class="l">upstream_error</td><td class="err">1</td></tr>')
        row = re.search(r'<tr data-provider="mock">(.*?)</tr>', dom, re.S)
        self.assertIsNotNone(row, dom)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
        self.assertEqual(cells[:3], ["mock", "7", "1"])
        ttft = _text(dom, "ttft")
        self.assertEqual(len(re.findall(r"\d+(?:\.\d+)? ms", ttft)), 3, ttft)
        # llmgate_ttft_seconds counts every stream's first relayed byte:
        # the six completed and the 500's error body.
        self.assertEqual(int(re.search(r"\b(\d+)\b", ttft).group(1)), 7)
        self.assertIn("--workers 1", dom)
        self.assertNotIn("sk-upstream-secret-e2e", dom)
        self.assert_screenshot(url, d, "workers")

    def assert_screenshot(self, url: str, d: str, name: str) -> None:
        """A screenshot of C{url} is a PNG of some size (kept if LLMGATE_KEEP_SCREENSHOT names a path)."""
        png = os.path.join(d, "status.png")
        shot = _browser(f"--screenshot={png}", "--window-size=1100,1400", url)
        self.assertEqual(shot.returncode, 0, shot.stderr)
        with open(png, "rb") as f:
            data = f.read()
        self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(len(data), 20_000)
        keep = os.environ.get("LLMGATE_KEEP_SCREENSHOT")
        if keep:
            shutil.copy(png, f"{keep}.{name}.png")

    def test_chromium_required(self) -> None:
        """The browser is found (CI installs it); a missing one fails this test, never skips it."""
        self.assertTrue(os.access(_chromium(), os.X_OK))

"""
End to end, the daemon's life cycle with real twistd processes: SIGHUP
reloads the config file with a stream in flight, and a port that cannot be
bound ends the process with status 1 and one line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile

import openai
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from llmgate.mock.provider import mock_text
from tests.e2e.procs import Daemon


def _config(mock_port: int, ledger: str, models: dict[str, str]) -> str:
    text = (
        "[providers.mock]\n"
        'kind = "openai"\n'
        f'base_url = "http://127.0.0.1:{mock_port}/v1"\n'
        'api_key_env = "E2E_UPSTREAM_KEY"\n'
        f'[ledger]\npath = "{ledger}"\n'
    )
    for name, upstream in models.items():
        text += f'[models."{name}"]\nprovider = "mock"\nupstream_model = "{upstream}"\n'
    return text


class LifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmgate-e2e-")
        self.conf = os.path.join(self.dir, "llmgate.toml")

    def daemon(self, plugin: str, *args: str, wait: bool = True) -> Daemon:
        d = Daemon(plugin, list(args), self.dir, env={"E2E_UPSTREAM_KEY": "k"}, wait=wait)
        self.addCleanup(d.stop)
        return d

    def write(self, text: str) -> None:
        # Replaced in one rename, as editors and config management do.
        tmp = self.conf + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.conf)

    def test_sighup_reloads_with_a_stream_in_flight(self) -> None:
        """
        SIGHUP with a changed file: the stream in flight finishes byte-exact
        on the route it started on and is recorded; the new route works and
        the removed one is gone. An invalid file is logged with its reason
        and the daemon keeps serving on the last good config.
        """
        mock = self.daemon("llmgate-mock", "--port", "tcp:0:interface=127.0.0.1")
        ledger = os.path.join(self.dir, "usage.db")
        self.write(_config(mock.port, ledger, {"old-route": "up-old"}))
        gw = self.daemon("llmgate", "--config", self.conf, "--port", "tcp:0:interface=127.0.0.1")
        client = openai.OpenAI(base_url=gw.url("/v1"), api_key="c", max_retries=0)
        with self.assertRaises(openai.NotFoundError):
            client.chat.completions.create(model="new-route", messages=[])

        stream = client.chat.completions.create(
            model="old-route", messages=[], stream=True,
            extra_headers={"x-mock-tokens": "20", "x-mock-delay-ms": "50"},
        )
        text = ""
        for i, chunk in enumerate(stream):
            if i == 2:
                self.write(_config(mock.port, ledger, {"new-route": "up-new"}))
                os.kill(gw.pid, signal.SIGHUP)
                gw.wait_for("config reloaded from")
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        self.assertEqual(text, mock_text(20))
        self.assertEqual(
            client.chat.completions.create(model="new-route", messages=[]).choices[0].message.content,
            mock_text(16),
        )
        with self.assertRaises(openai.NotFoundError):
            client.chat.completions.create(model="old-route", messages=[])

        self.write('[timeouts]\nidle = "soon"\n')
        os.kill(gw.pid, signal.SIGHUP)
        gw.wait_for("rejected, keeping the running config: timeouts.idle")
        self.assertEqual(
            client.chat.completions.create(model="new-route", messages=[]).choices[0].message.content,
            mock_text(16),
        )
        self.assertIsNone(gw.proc.poll())
        self.assertEqual(gw.stop(), -signal.SIGTERM)
        recs = read_records(ledger)
        got = sorted((r["model"], r["upstream_model"], r["outcome"], r["output_tokens"]) for r in recs)
        self.assertEqual(
            got,
            sorted([
                ("new-route", "", "rejected", None),
                ("old-route", "up-old", "completed", 20),
                ("new-route", "up-new", "completed", 16),
                ("old-route", "", "rejected", None),
                ("new-route", "up-new", "completed", 16),
            ]),
        )

    def test_sighup_without_config_file(self) -> None:
        """With --demo a SIGHUP is logged as nothing to reload; the daemon serves on."""
        gw = self.daemon("llmgate", "--demo", "--port", "tcp:0:interface=127.0.0.1")
        os.kill(gw.pid, signal.SIGHUP)
        gw.wait_for("nothing to reload")
        client = openai.OpenAI(base_url=gw.url("/v1"), api_key="c", max_retries=0)
        self.assertEqual(client.chat.completions.create(model="m", messages=[]).choices[0].message.content, mock_text(16))

    def busy_port(self) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        self.addCleanup(s.close)
        return s.getsockname()[1]

    def assert_one_line_exit(self, d: Daemon, desc: str, setting: str) -> None:
        self.assertEqual(d.proc.wait(30), 1)
        d.stop()
        out = d.output()
        lines = [line for line in out.splitlines() if "cannot listen" in line]
        self.assertEqual(len(lines), 1, out)
        self.assertIn(f"cannot listen on {desc} ({setting}): Address already in use", lines[0])
        self.assertNotIn("Traceback", out)

    def test_gateway_port_in_use_exits_1(self) -> None:
        """
        A --port already bound on 127.0.0.1 ends twistd with status 1 and
        one line naming the endpoint and the reason.
        """
        port = self.busy_port()
        desc = f"tcp:{port}:interface=127.0.0.1"
        d = self.daemon("llmgate", "--demo", "--port", desc, wait=False)
        self.assert_one_line_exit(d, desc + ":backlog=4096", "--port")

    def test_port_in_use_when_daemonizing_exits_1(self) -> None:
        """
        Without -n, twistd's waiting parent reports the bind failure and
        exits 1 (instead of waiting for a start-up report forever).
        """
        port = self.busy_port()
        cmd = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            f"--pidfile={self.dir}/twistd.pid", f"--logfile={self.dir}/twistd.log",
            "llmgate", "--workers", "1", "--demo", "--port", f"tcp:{port}:interface=127.0.0.1",
        ]
        r = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 1)
        self.assertIn("Address already in use", r.stderr)
        with open(f"{self.dir}/twistd.log") as f:
            self.assertIn(f"cannot listen on tcp:{port}:interface=127.0.0.1:backlog=4096 (--port)", f.read())

    def test_metrics_port_in_use_exits_1(self) -> None:
        """A [metrics] port already bound ends twistd the same way."""
        port = self.busy_port()
        self.write(f'[providers.p]\nkind = "openai"\n[metrics]\nport = {port}\n[ledger]\nenabled = false\n')
        d = self.daemon("llmgate", "--config", self.conf, "--port", "tcp:0:interface=127.0.0.1", wait=False)
        self.assert_one_line_exit(d, f"tcp:{port}:interface=127.0.0.1", "[metrics] port")

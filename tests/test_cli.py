"""The llmgate console script."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from llmgate import cli


class CheckConfigTests(SynchronousTestCase):
    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_good_config(self) -> None:
        """A valid file is reported OK with what it holds."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[providers.p]\nkind = "openai"\ndefault = true\n')
        code, out, _ = self.run_cli("check-config", path)
        self.assertEqual(code, 0)
        self.assertIn("1 providers", out)

    def test_bad_config(self) -> None:
        """An invalid file exits 1 with one line naming the setting."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[timeouts]\nidle = "soon"\n')
        code, _, err = self.run_cli("check-config", path)
        self.assertEqual(code, 1)
        self.assertIn("timeouts.idle", err)
        self.assertEqual(err.count("\n"), 1)

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_settings_the_daemon_would_die_on(self) -> None:
        """
        check-config refuses what the daemon cannot start with, one line
        each, naming the setting: a price without output, a negative price,
        a bad [metrics] port endpoint.
        """
        for text, setting in [
            ('[prices.m]\ninput = 1\n', "prices.m.output"),
            ('[prices.m]\ninput = -1\noutput = 1\n', "prices.m.input"),
            ('[metrics]\nport = "tcp:abc"\n', "metrics.port"),
        ]:
            code, out, err = self.run_cli("check-config", self.write(text))
            self.assertEqual((code, out), (1, ""), text)
            self.assertIn(setting, err)
            self.assertEqual(err.count("\n"), 1)

    def test_port_values(self) -> None:
        """
        --port values are checked as the daemon reads them: a bad one is an
        error naming --port, good ones are listed as the daemon will listen.
        """
        path = self.write('[providers.p]\nkind = "openai"\n')
        code, _, err = self.run_cli("check-config", path, "--port", "tcp:abc")
        self.assertEqual(code, 1)
        self.assertIn("--port: invalid endpoint 'tcp:abc'", err)
        code, out, _ = self.run_cli("check-config", path, "--port", "8081", "-p", "systemd:domain=INET:name=llmgate")
        self.assertEqual(code, 0)
        self.assertIn("tcp:8081:interface=127.0.0.1:backlog=4096, systemd:domain=INET:name=llmgate", out)

    def test_systemd_metrics_socket(self) -> None:
        """
        A [metrics] port on a systemd socket passes check-config (run
        outside systemd, it checks the syntax only) but is refused there
        when malformed.
        """
        ok = self.write('[metrics]\nport = "systemd:domain=INET:name=llmgate-metrics"\n')
        code, out, err = self.run_cli("check-config", ok)
        self.assertEqual(code, 0, err)
        self.assertIn("metrics on systemd:domain=INET:name=llmgate-metrics", out)
        bad = self.write('[metrics]\nport = "systemd:domain=INET"\n')
        code, _, err = self.run_cli("check-config", bad)
        self.assertEqual(code, 1)
        self.assertIn("metrics.port", err)

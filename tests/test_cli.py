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

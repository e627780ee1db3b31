# -*- test-case-name: tests.test_systemd_unit -*-
"""
The shipped systemd units: C{systemd-analyze verify} accepts them and
C{systemd-analyze security --offline=true} rates the service 2.5 or lower
(it rated the unit before hardening 8.3, "EXPOSED").

These need systemd-analyze; CI does not install systemd, so without the
binary they are skipped with that reason (and only then).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

UNITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "systemd")
MAX_EXPOSURE = 2.5


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        raise SkipTest("systemd-analyze is not installed (systemd is not part of the test dependencies)")
    return exe


def _unit_text(name: str) -> str:
    with open(os.path.join(UNITS, name)) as f:
        return f.read()


class UnitTests(SynchronousTestCase):
    def _copies(self) -> str:
        """
        The units in a temporary directory, with ExecStart's
        /opt/llmgate/venv/bin/twistd replaced by this venv's twistd:
        verify refuses a unit whose command does not exist.
        """
        d = self.mktemp()
        os.makedirs(d)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.assertTrue(os.access(twistd, os.X_OK), twistd)
        service = _unit_text("llmgate.service")
        self.assertIn("/opt/llmgate/venv/bin/twistd", service)
        with open(os.path.join(d, "llmgate.service"), "w") as f:
            f.write(service.replace("/opt/llmgate/venv/bin/twistd", twistd))
        with open(os.path.join(d, "llmgate.socket"), "w") as f:
            f.write(_unit_text("llmgate.socket"))
        return d

    def test_verify(self) -> None:
        """systemd-analyze verify reports nothing for llmgate.service and llmgate.socket."""
        exe = _analyze()
        d = self._copies()
        r = subprocess.run(
            [exe, "verify", os.path.join(d, "llmgate.service"), os.path.join(d, "llmgate.socket")],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(r.stderr.strip(), "", r.stderr)

    def test_security_score(self) -> None:
        """systemd-analyze security --offline=true rates llmgate.service at most 2.5."""
        exe = _analyze()
        r = subprocess.run(
            [exe, "security", "--offline=true", os.path.join(UNITS, "llmgate.service")],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"Overall exposure level for llmgate\.service: (\d+(?:\.\d+)?)", r.stdout)
        self.assertIsNotNone(m, r.stdout + r.stderr)
        assert m is not None
        score = float(m.group(1))
        failing = [ln for ln in r.stdout.splitlines() if ln.startswith("✗")]
        self.assertLessEqual(score, MAX_EXPOSURE, "exposure {} > {}; not set:\n{}".format(score, MAX_EXPOSURE, "\n".join(failing)))

    def test_socket_activation_kept(self) -> None:
        """
        The hardened service still takes its listening socket from
        llmgate.socket (the systemd: endpoint named like the socket's
        FileDescriptorName), is Type=notify, and does not filter AF_INET,
        AF_INET6 or AF_UNIX (providers, clients, the journal, sd_notify).
        """
        service = _unit_text("llmgate.service")
        socket_unit = _unit_text("llmgate.socket")
        name = re.search(r"^FileDescriptorName=(\S+)", socket_unit, re.M)
        assert name is not None
        self.assertIn(f"--port systemd:domain=INET:name={name.group(1)}", service)
        self.assertRegex(service, r"(?m)^Requires=llmgate\.socket$")
        self.assertRegex(service, r"(?m)^Type=notify$")
        families = re.search(r"(?m)^RestrictAddressFamilies=(.*)$", service)
        assert families is not None
        self.assertEqual(set(families.group(1).split()), {"AF_INET", "AF_INET6", "AF_UNIX"})

# -*- test-case-name: tests.e2e.test_mdwe -*-
"""
End to end: the gateway works without writable-and-executable memory, as
the unit's C{MemoryDenyWriteExecute=yes} enforces.  The kernel's own
switch for it (C{prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)}, Linux 6.3+,
inherited by children) is set before twistd starts, and a streamed
request through C{--workers 2} must relay and be counted (tiktoken's
encodings built, OpenSSL and SQLite loaded).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from twisted.trial.unittest import SkipTest, SynchronousTestCase

PR_SET_MDWE = 65
PR_GET_MDWE = 66

_SCRIPT = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: errno %d" % ctypes.get_errno())
assert libc.prctl(66, 0, 0, 0, 0) == 1
sys.argv = ["twistd"] + sys.argv[1:]
from twisted.scripts.twistd import run
run()
"""


def _mdwe_supported() -> bool:
    """Whether this kernel has PR_SET_MDWE (asked in a throwaway child)."""
    r = subprocess.run(
        [sys.executable, "-c", "import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl(66,0,0,0,0) < 0)"],
        timeout=30,
    )
    return r.returncode == 0


class MemoryDenyWriteExecuteTests(SynchronousTestCase):
    def test_serves_under_mdwe(self) -> None:
        """Under PR_MDWE_REFUSE_EXEC_GAIN, twistd llmgate --demo --workers 2 streams a completion and counts it."""
        if not _mdwe_supported():
            raise SkipTest("this kernel has no PR_SET_MDWE (Linux 6.3+)")
        cwd = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, cwd, True)
        proc = subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, "-n", "--pidfile=", "llmgate", "--demo", "--workers", "2",
             "--port", "tcp:0:interface=127.0.0.1"],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        )

        def stop() -> None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(30)

        self.addCleanup(stop)
        assert proc.stdout is not None
        port = serving = 0
        lines = []
        deadline = time.monotonic() + 60
        while (not port or serving < 2) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "GatewaySite starting on" in line and not port:
                port = int(line.rsplit(" ", 1)[1])
            if "is serving" in line:
                serving += 1
        self.assertTrue(port and serving == 2, "".join(lines))
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"model": "gpt-4o-mini", "stream": True,
                             "messages": [{"role": "user", "content": "hello"}]}).encode(),
            headers={"Content-Type": "application/json", "x-mock-tokens": "12"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read().decode()
        self.assertTrue(body.rstrip().endswith("data: [DONE]"), body)
        chunks = [json.loads(l[6:]) for l in body.splitlines() if l.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        self.assertEqual(len(text.split()), 12)
        stop()
        rest = proc.stdout.read()
        self.assertNotIn("Traceback", "".join(lines) + rest)

# -*- test-case-name: tests.e2e.test_notify -*-
"""
End to end: a real C{twistd -n llmgate} under C{$NOTIFY_SOCKET} (as
systemd's C{Type=notify} starts it) tells the socket the test reads:
C{READY=1} only once its port accepts, C{RELOADING=1} then C{READY=1} on
SIGHUP, C{WATCHDOG=1} when C{$WATCHDOG_USEC} is set, C{STOPPING=1} on
SIGTERM -- from the supervisor under C{--workers 2}, after both workers
serve.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.procs import Daemon


class _NotifySocket:
    """The test's stand-in for systemd's notify socket."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.dir = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(self.sock.close)
        self.sock.bind(self.path)
        self.seen: list[str] = []

    def next(self, first_line: str, timeout: float = 30.0, skip: tuple[str, ...] = ("WATCHDOG=1",)) -> str:
        """The next message whose first line is not in C{skip}; it must start with C{first_line}."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {first_line} within {timeout}s; got {self.seen}")
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.seen.append(msg)
            head = msg.splitlines()[0]
            if head in skip:
                continue
            if head != first_line:
                raise AssertionError(f"expected {first_line}, got {msg!r}; seen {self.seen}")
            return msg


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


class NotifyTests(SynchronousTestCase):
    def check(self, workers: str) -> None:
        ns = _NotifySocket(self)
        cwd = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, cwd, True)
        d = Daemon(
            "llmgate",
            ["--demo", "--port", "tcp:0:interface=127.0.0.1", "--workers", workers],
            cwd,
            env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "400000"},
            wait=False,
        )
        self.addCleanup(d.stop)
        ready = ns.next("READY=1")
        # READY=1 comes after the port is bound: a connection to it (the
        # port read from the log, which the pipe may deliver a little
        # later) is accepted at once.
        port = int(d.wait_for(r"GatewaySite starting on (\d+)", timeout=10).group(1))
        self.assertTrue(_accepts(port))
        self.assertIn("STATUS=serving", ready.splitlines())
        if workers != "1":
            # Both workers had said they serve (logged before READY=1; the
            # pipe may bring the lines a little later).
            for i in range(int(workers)):
                d.wait_for(rf"worker {i} \(pid \d+\) is serving", timeout=10)
        # Watchdog: every 0.2 s (half of 400 ms).
        before = len([m for m in ns.seen if m == "WATCHDOG=1"])
        deadline = time.monotonic() + 10
        while len([m for m in ns.seen if m == "WATCHDOG=1"]) < before + 2 and time.monotonic() < deadline:
            ns.sock.settimeout(1)
            try:
                ns.seen.append(ns.sock.recv(4096).decode())
            except socket.timeout:
                pass
        self.assertGreaterEqual(len([m for m in ns.seen if m == "WATCHDOG=1"]), before + 2)
        os.kill(d.pid, signal.SIGHUP)
        reloading = ns.next("RELOADING=1")
        usec = [ln for ln in reloading.splitlines() if ln.startswith("MONOTONIC_USEC=")]
        self.assertEqual(len(usec), 1)
        # CLOCK_MONOTONIC is system-wide: the daemon's reading is close to ours.
        self.assertLess(abs(int(usec[0].split("=")[1]) / 1e6 - time.monotonic()), 30)
        ns.next("READY=1")
        os.kill(d.pid, signal.SIGTERM)
        ns.next("STOPPING=1")
        # twistd re-raises the SIGTERM once drained: systemd counts that as a clean stop.
        self.assertIn(d.proc.wait(30), (0, -signal.SIGTERM))
        # The workers never spoke to the socket: only the main process's messages.
        heads = [m.splitlines()[0] for m in ns.seen if m != "WATCHDOG=1"]
        self.assertEqual(heads, ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"])

    def test_single_process(self) -> None:
        """One process: READY=1 once the port accepts, RELOADING/READY on SIGHUP, WATCHDOG=1, STOPPING=1 on SIGTERM."""
        self.check("1")

    def test_workers(self) -> None:
        """--workers 2: the supervisor says READY=1 once both workers serve; workers send nothing."""
        self.check("2")

    def test_socket_activated_workers(self) -> None:
        """
        As systemd starts the unit: the socket passed at fd 3 (llmgate.socket),
        NOTIFY_SOCKET set, --workers 2: READY=1 arrives once both workers
        serve, and a request sent right after it is answered.
        """
        import urllib.request

        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(64)
        self.addCleanup(listening.close)
        port = listening.getsockname()[1]
        ns = _NotifySocket(self)
        cwd = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, cwd, True)
        d = Daemon(
            "llmgate",
            ["--demo", "--workers", "2", "--port", "systemd:domain=INET:index=0"],
            cwd,
            env={"NOTIFY_SOCKET": ns.path},
            wait=False,
            systemd_fd=listening.fileno(),
        )
        self.addCleanup(d.stop)
        ns.next("READY=1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            self.assertEqual(r.status, 200)
        for i in (0, 1):
            d.wait_for(rf"worker {i} \(pid \d+\) is serving", timeout=10)
        os.kill(d.pid, signal.SIGTERM)
        ns.next("STOPPING=1")
        self.assertIn(d.proc.wait(30), (0, -signal.SIGTERM))

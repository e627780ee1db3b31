"""
Tests for L{llmgate.ops.notify}: sd_notify datagrams on a real AF_UNIX
socket in a temporary directory, read back in order.
"""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from llmgate.ops.notify import Notifier, SystemdNotify


class _Receiver:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, test: TestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(self.sock.close)
        if abstract:
            name = f"llmgate-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            d = tempfile.mkdtemp()
            self.address = os.path.join(d, "notify")
            self.sock.bind(self.address)
            test.addCleanup(os.rmdir, d)
            test.addCleanup(os.unlink, self.address)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


class NotifierTests(TestCase):
    def test_messages_in_order(self) -> None:
        """READY, RELOADING with MONOTONIC_USEC, READY, WATCHDOG, STOPPING arrive in order, one datagram each."""
        rx = _Receiver(self)
        n = Notifier(rx.address, monotonic=lambda: 12.5)
        self.addCleanup(n.close)
        n.ready()
        n.reloading()
        n.ready()
        n.watchdog()
        n.stopping()
        msgs = rx.messages()
        self.assertEqual([m.splitlines()[0] for m in msgs], ["READY=1", "RELOADING=1", "READY=1", "WATCHDOG=1", "STOPPING=1"])
        self.assertIn("MONOTONIC_USEC=12500000", msgs[1].splitlines())

    def test_abstract_namespace(self) -> None:
        """An address starting with @ is in the abstract namespace."""
        rx = _Receiver(self, abstract=True)
        n = Notifier(rx.address)
        self.addCleanup(n.close)
        self.assertTrue(n.ready())
        self.assertEqual(rx.messages()[0].splitlines()[0], "READY=1")

    def test_unset_is_noop(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
        n = Notifier.from_environ({})
        self.assertFalse(n.enabled)
        self.assertFalse(n.ready())
        self.assertFalse(n.stopping())

    def test_send_failure_does_not_raise(self) -> None:
        """A socket that does not exist is logged once, never raised."""
        n = Notifier(os.path.join(tempfile.mkdtemp(), "nobody"))
        self.addCleanup(n.close)
        self.assertFalse(n.ready())
        self.assertFalse(n.ready())
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_watchdog_pid(self) -> None:
        """WATCHDOG_USEC counts only for the process WATCHDOG_PID names (or when unset)."""
        env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000"}
        self.assertEqual(Notifier.from_environ(env, pid=10).watchdog_usec, 4000000)
        self.assertEqual(Notifier.from_environ({**env, "WATCHDOG_PID": "10"}, pid=10).watchdog_usec, 4000000)
        self.assertIsNone(Notifier.from_environ({**env, "WATCHDOG_PID": "11"}, pid=10).watchdog_usec)
        self.assertIsNone(Notifier.from_environ({"NOTIFY_SOCKET": "/x"}, pid=10).watchdog_usec)


class SystemdNotifyTests(TestCase):
    def test_ready_watchdog_stopping(self) -> None:
        """READY=1 at start, WATCHDOG=1 every half of WATCHDOG_USEC, STOPPING=1 at stop."""
        rx = _Receiver(self)
        n = Notifier(rx.address, watchdog_usec=4_000_000)
        self.addCleanup(n.close)
        clock = Clock()
        svc = SystemdNotify(n, clock)
        svc.startService()
        self.addCleanup(svc.stop_watchdog)
        clock.advance(1.9)
        first = [m.splitlines()[0] for m in rx.messages()]
        self.assertEqual(first, ["READY=1", "WATCHDOG=1"])
        clock.advance(0.1)
        clock.advance(2.0)
        self.assertEqual([m.splitlines()[0] for m in rx.messages()], ["WATCHDOG=1", "WATCHDOG=1"])
        svc.stopService()
        self.assertEqual([m.splitlines()[0] for m in rx.messages()], ["STOPPING=1"])

    def test_supervisor_waits(self) -> None:
        """ready_at_start=False (the --workers supervisor) sends no READY=1 at start, and no watchdog without WatchdogSec."""
        rx = _Receiver(self)
        n = Notifier(rx.address)
        self.addCleanup(n.close)
        clock = Clock()
        SystemdNotify(n, clock, ready_at_start=False).startService()
        clock.advance(100)
        self.assertEqual(rx.messages(), [])

"""Listeners that end the process when they cannot bind."""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from llmgate.service import Listener


class FakeEndpoint:
    def __init__(self, result: Any) -> None:
        self.result = result
        self.factories: list[Any] = []

    def listen(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        return self.result


class FakePort:
    stopped = False

    def stopListening(self) -> None:
        self.stopped = True


def in_use() -> CannotListenError:
    return CannotListenError("127.0.0.1", 8080, socket.error(errno.EADDRINUSE, "Address already in use"))


class ListenerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.reactor = MemoryReactorClock()
        self.exits: list[int] = []

    def listener(self, result: Any, setting: str = "--port") -> Listener:
        return Listener(setting, "tcp:8080:interface=127.0.0.1", FakeEndpoint(result), object(), self.reactor, exit=self.exits.append)

    def critical(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("log_level") is not None and e["log_level"].name == "critical"]

    def test_port_in_use_at_start_exits_1(self) -> None:
        """
        A bind failure at start raises SystemExit(1) before the reactor
        runs, after one log line naming the setting, the endpoint and the
        OS's reason.
        """
        lst = self.listener(fail(in_use()), "[metrics] port")
        with self.assertRaises(SystemExit) as e:
            lst.privilegedStartService()
        self.assertEqual(e.exception.code, 1)
        # Also an Exception: a daemonizing twistd reports those to its parent.
        self.assertIsInstance(e.exception, Exception)
        self.assertEqual(
            str(e.exception), "Address already in use: tcp:8080:interface=127.0.0.1 ([metrics] port)"
        )
        [line] = self.critical()
        self.assertEqual(
            line, "cannot listen on tcp:8080:interface=127.0.0.1 ([metrics] port): Address already in use"
        )

    def test_late_failure_stops_the_process_non_zero(self) -> None:
        """
        A listen that fails after start-up stops the reactor and exits 1
        once it has shut down (so the ledger still flushes).
        """
        d: Deferred[Any] = Deferred()
        lst = self.listener(d)
        lst.privilegedStartService()
        lst.startService()
        self.assertFalse(self.reactor.hasStopped)
        d.errback(OSError(errno.EACCES, "Permission denied"))
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(len(self.critical()), 1)
        self.assertIn("Permission denied", self.critical()[0])
        self.assertEqual(self.exits, [])
        [(f, args, kw)] = self.reactor.triggers["after"]["shutdown"]
        f(*args, **kw)
        self.assertEqual(self.exits, [1])

    def test_listening_and_stopping(self) -> None:
        """A listener that binds logs nothing and stops listening on stop."""
        port = FakePort()
        lst = self.listener(succeed(port))
        lst.privilegedStartService()
        lst.startService()
        lst.stopService()
        self.assertTrue(port.stopped)
        self.assertEqual(self.critical(), [])

    def test_stop_while_pending_is_quiet(self) -> None:
        """Stopping before a pending listen completes is no failure."""
        lst = self.listener(Deferred())
        lst.privilegedStartService()
        lst.startService()
        lst.stopService()
        self.assertEqual(self.critical(), [])
        self.assertFalse(self.reactor.hasStopped)

# -*- test-case-name: tests.test_service,tests.ops.test_drain -*-
"""
Services of the daemon's tree: a MultiService that stops its children one
after another, and listeners that end the process when they cannot bind.

Twisted's MultiService stops every child at once; the gateway needs an
order: listeners first, then the drain of streams in flight, then the
upstream pool, and the usage ledger last, so that records of the drained
streams still reach the file.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger(namespace="llmgate.service")


class OrderedMultiService(MultiService):
    """Stops children in reverse order of addition, each after the last."""

    def stopService(self) -> Deferred[Any]:
        self.running = 0
        d: Deferred[Any] = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(lambda _, c=child: maybeDeferred(c.stopService))
            d.addErrback(self._log_failure)
        return d

    @staticmethod
    def _log_failure(failure: Any) -> None:
        _log.failure("error while stopping", failure)


class ListenFailed(SystemExit, Exception):
    """
    A listener could not bind at start; the process exits with status 1.

    A L{SystemExit}, so C{twistd -n} exits 1 without a traceback (the log
    line says why); also an L{Exception}, so a daemonizing C{twistd} passes
    it to its parent, which waits for the daemon's start-up report, prints
    it, and exits 1 (a bare SystemExit leaves that parent waiting forever).
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Listener(StreamServerEndpointService):
    """
    Listens on one endpoint; a port that cannot be bound ends the process.

    Twisted's own service logs a listen failure and carries on, so a
    daemon whose port is taken keeps running while listening on nothing:
    systemd sees it active and C{Restart=} never fires. Here the failure
    is one log line naming the setting, the endpoint and the reason, and
    the process exits with status 1 (L{ListenFailed}).

    @param setting: the setting the endpoint came from, for the log line
        (C{--port}, C{[metrics] port}).
    @param desc: the endpoint string, for the log line.
    @param reactor: stopped when the failure comes after start-up.
    @param exit: called with 1 after the reactor has shut down, for such a
        late failure (no stock endpoint fails late; this is a safety net).
    """

    def __init__(
        self,
        setting: str,
        desc: str,
        endpoint: Any,
        factory: Any,
        reactor: Any,
        exit: Callable[[int], Any] = os._exit,
    ) -> None:
        super().__init__(endpoint, factory)
        self.setting = setting
        self.desc = desc
        self._reactor = reactor
        self._exit = exit

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._waitingForPort = self.endpoint.listen(self.factory)
        self._waitingForPort.addCallback(self._bound)
        now: list[Failure] = []
        self._starting = True
        self._waitingForPort.addErrback(self._cannot_listen, now)
        self._starting = False
        if now:
            # twistd has not run the reactor yet: leave before it does.
            raise ListenFailed(f"{_reason(now[0].value)}: {self.desc} ({self.setting})")

    # The listening port once bound (for the start-up block's addresses).
    port: Any = None

    def _bound(self, port: Any) -> Any:
        self.port = port
        return port

    def _cannot_listen(self, failure: Failure, now: list[Failure]) -> None:
        if failure.check(CancelledError):
            return None
        _log.critical(
            "cannot listen on {desc} ({setting}): {reason}",
            desc=self.desc,
            setting=self.setting,
            reason=_reason(failure.value),
        )
        if self._starting:
            now.append(failure)
        else:
            self._reactor.addSystemEventTrigger("after", "shutdown", self._exit, 1)
            self._reactor.stop()
        return None


def _reason(error: BaseException) -> str:
    """The OS's words for a bind error, not Twisted's wrapper around them."""
    if isinstance(error, CannotListenError) and error.socketError is not None:
        inner = error.socketError
        return getattr(inner, "strerror", None) or str(inner)
    return getattr(error, "strerror", None) or str(error) or type(error).__name__

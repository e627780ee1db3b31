# -*- test-case-name: tests.ops.test_drain -*-
"""
A MultiService that stops its children one after another.

Twisted's MultiService stops every child at once; the gateway needs an
order: listeners first, then the drain of streams in flight, then the
upstream pool, and the usage ledger last, so that records of the drained
streams still reach the file.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred, succeed


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
        from twisted.logger import Logger

        Logger(namespace="llmgate.service").failure("error while stopping", failure)

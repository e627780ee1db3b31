# -*- test-case-name: tests.ops.test_drain -*-
"""
Graceful stop: on SIGTERM the listeners close first, then streams in
flight get a grace period to finish; whatever is still running after it is
cut with an error the client can see, and recorded, before the ledger's
final flush.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger(namespace="llmgate.ops.drain")

_POLL = 0.05


class Drain(Service):
    """
    @param resource: the L{GatewayResource} whose C{active} relays to wait for.
    @param grace: seconds streams may take to finish once the stop began.
    """

    def __init__(self, resource: Any, clock: Any, grace: float, hard: float = 5.0) -> None:
        self.resource = resource
        self.clock = clock
        self.grace = grace
        self.hard = hard

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()
        res = self.resource
        res.draining = True
        if not res.active:
            return res.accounting.idle()
        log.info("draining {n} requests for up to {grace}s", n=len(res.active), grace=self.grace)
        done: Deferred[None] = Deferred()
        start = self.clock.seconds()
        cut = [False]

        def poll() -> None:
            if not res.active:
                done.callback(None)
                return
            waited = self.clock.seconds() - start
            if not cut[0] and waited >= self.grace:
                cut[0] = True
                log.warn("cutting {n} requests still running at shutdown", n=len(res.active))
                for relay in list(res.active):
                    relay.abort("the gateway is shutting down")
            if waited >= self.grace + self.hard:
                log.error("{n} requests did not end at shutdown", n=len(res.active))
                done.callback(None)
                return
            self.clock.callLater(_POLL, poll)

        poll()
        # Then wait for the records still being counted (estimates run in
        # threads), so that the ledger, stopped next, gets every one.
        done.addCallback(lambda _: res.accounting.idle())
        return done

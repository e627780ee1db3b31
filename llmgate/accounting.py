# -*- test-case-name: tests.test_accounting -*-
"""
Accounting: a counter per request on the relay path, and, when the request
ends, one access-log line and one usage record.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.logger import Logger

from llmgate.relay import Exchange

log = Logger(namespace="llmgate.access")


class Accounting:
    """
    Sink of finished exchanges.

    @param ledger: where usage records go (or L{None}).
    """

    def __init__(self, clock: Any, ledger: Any = None, enabled: bool = True) -> None:
        self.clock = clock
        self.ledger = ledger
        self.enabled = enabled
        self.finished_count = 0

    def counter(self, exchange: Exchange, strip_usage: bool) -> Optional[Any]:
        return None

    def finished(self, ex: Exchange) -> None:
        self.finished_count += 1
        ttft = ex.ttft
        log.info(
            "{method} {route} model={model} provider={provider} key={key} "
            "status={status} outcome={outcome}{phase} stream={stream} "
            "ttft_ms={ttft} ms={ms:.1f} bytes_out={bytes_out}",
            method="POST",
            route=ex.endpoint.path.decode(),
            model=ex.model,
            provider=ex.provider.name,
            key=ex.key_name,
            status=ex.status,
            outcome=ex.outcome,
            phase=f"/{ex.phase}" if ex.phase else "",
            stream=int(ex.streamed),
            ttft="-" if ttft is None else f"{ttft * 1000:.1f}",
            ms=ex.duration * 1000,
            bytes_out=ex.bytes_out,
        )

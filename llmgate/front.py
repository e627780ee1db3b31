# -*- test-case-name: tests.test_front -*-
"""
The client-facing HTTP side: a Request that caps the body it will accept
and keeps it in memory, and the Site that builds it.

twisted.web reads the whole body before rendering and spools bodies over
100 kB to a temporary file (synchronous disk I/O on the reactor thread); we
keep bodies in memory, bounded by the cap, and refuse an oversized body from
its Content-Length before reading it, or as soon as a chunked body passes
the cap.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.web import server

from llmgate import dialects


class GatewayRequest(server.Request):
    """A request whose body is held in memory up to C{maxBody} bytes."""

    maxBody = 32 * 1024 * 1024
    _received = 0
    _rejected = False

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > self.maxBody:
            self._reject()

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self.maxBody:
            self._reject()
            return
        self.content.write(data)

    def _reject(self) -> None:
        """
        Answer 413 before reading the body, then close: reading on would
        make us pay for the bytes we refuse.
        """
        self._rejected = True
        self.content = BytesIO()
        path = getattr(self.channel, "_path", b"") or b""
        kind = dialects.kind_for_path(path.split(b"?", 1)[0])
        body = dialects.error_body(
            kind,
            413,
            f"request body is larger than the limit of {self.maxBody} bytes",
            code="request_too_large",
        )
        self.channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        self.channel.loseConnection()
        site = getattr(self.channel, "site", None)
        accounting = getattr(getattr(site, "resource", None), "accounting", None)
        if accounting is not None:
            accounting.rejected(path.split(b"?", 1)[0].decode("latin-1"), 413)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        super().requestReceived(command, path, version)


class GatewaySite(server.Site):
    """
    The Site for the gateway: bodies capped, no tracebacks to clients, and
    no Combined Log lines (the gateway writes its own access log).
    """

    displayTracebacks = False

    def __init__(self, resource: Any, reactor: Any, max_body: int) -> None:
        limit = max_body

        class _Request(GatewayRequest):
            maxBody = limit

        super().__init__(resource, requestFactory=_Request, reactor=reactor)

    def log(self, request: Any) -> None:
        pass

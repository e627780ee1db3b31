# -*- test-case-name: tests.mock.test_provider -*-
"""
C{twistd llmgate-mock}: run L{llmgate.mock.provider.MockProvider} as its own daemon.

This is the only mock module that may touch the global reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from twisted.web.server import Site

from llmgate.mock.provider import MockProvider


class Options(usage.Options):
    """Command-line options; C{--port} takes an endpoint string or a bare port number."""

    optParameters = [
        ["port", "p", "tcp:9000:interface=127.0.0.1",
         "Endpoint to listen on (a bare number N means tcp:N:interface=127.0.0.1)."],
        ["seed", None, "0", "Seed for the random fixture slicing.", int],
        ["fault", None, None,
         "The x-mock-fault of every request that sends none (e.g. status-500): a failing provider."],
        ["ttft-ms", None, None,
         "The x-mock-ttft-ms of every request that sends none: a provider slow to start.", float],
    ]

    def postOptions(self) -> None:
        port = str(self["port"]).strip()
        if port.isdigit():
            port = f"tcp:{port}:interface=127.0.0.1"
        self["port"] = port
        from llmgate.mock.provider import _FAULTS

        if self["fault"] is not None and self["fault"] not in _FAULTS:
            raise usage.UsageError(f"--fault: one of {', '.join(_FAULTS)}")


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """One HTTP listener serving a fresh L{MockProvider}."""
    if reactor is None:
        from twisted.internet import reactor
    mock = MockProvider(reactor, seed=options["seed"], fault=options["fault"], ttft_ms=options["ttft-ms"])
    service = MultiService()
    endpoint = serverFromString(reactor, options["port"])
    listener = StreamServerEndpointService(endpoint, Site(mock.resource, reactor=reactor))
    listener.setName("mock-http")
    listener.setServiceParent(service)
    return service

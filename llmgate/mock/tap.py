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
        ["slow-fraction", None, 0.0, "Fraction of requests (seeded draw) whose first piece waits --slow-ttft.", float],
        ["slow-ttft", None, 2.0, "Seconds a --slow-fraction request waits before its first piece.", float],
        ["fail-fraction", None, 0.0, "Fraction of requests (seeded draw) answered --fail-status at once.", float],
        ["fail-status", None, 503, "Status of the --fail-fraction requests.", int],
    ]

    def postOptions(self) -> None:
        port = str(self["port"]).strip()
        if port.isdigit():
            port = f"tcp:{port}:interface=127.0.0.1"
        self["port"] = port
        from llmgate.mock.provider import _FAULTS

        if self["fault"] is not None and self["fault"] not in _FAULTS:
            raise usage.UsageError(f"--fault: one of {', '.join(_FAULTS)}")
        self["fractions"] = _fractions(self)


def _fractions(options: Options) -> Any:
    """The seeded slow/fail fractions of C{--slow-*}/C{--fail-*}; bad values are a usage error."""
    from llmgate.mock.provider import Fractions

    try:
        return Fractions(options["seed"], options["slow-fraction"], options["slow-ttft"],
                         options["fail-fraction"], options["fail-status"])
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """One HTTP listener serving a fresh L{MockProvider}."""
    if reactor is None:
        from twisted.internet import reactor
    mock = MockProvider(reactor, seed=options["seed"], fault=options["fault"], ttft_ms=options["ttft-ms"],
                        fractions=options.get("fractions"))
    service = MultiService()
    endpoint = serverFromString(reactor, options["port"])
    listener = StreamServerEndpointService(endpoint, Site(mock.resource, reactor=reactor))
    listener.setName("mock-http")
    listener.setServiceParent(service)
    return service

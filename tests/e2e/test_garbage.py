"""
Over real loopback sockets, requests of every outcome leave no cyclic
garbage in the gateway: the gateway's real service tree (L{llmgate.tap.build}:
Site, relay, treq pool, accounting, ledger) runs in this process on the
trial reactor, in front of a real mock provider process, and raw-socket
clients drive it. Only the gateway's objects are in this process, so what
C{gc.collect()} frees afterwards is what the gateway left in cycles.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections import Counter
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from llmgate import config as configmod
from llmgate import tap
from llmgate.service import Listener
from tests.e2e.procs import Daemon, gateway_config

GW_KEY = "gw-e2e-garbage-key"
CHAT = {"model": "public-name", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
PLAIN = {"model": "public-name", "messages": [{"role": "user", "content": "hi"}]}


class _Client(Protocol):
    """
    Sends one request; reads the answer to its end (or, with C{leave},
    aborts the connection after C{leave} seconds or at the first body
    byte, whichever the scenario asks), then closes.
    """

    def __init__(self, request: bytes, done: Deferred[bytes], leave: Optional[str], delay: float) -> None:
        self.request = request
        self.done = done
        self.leave = leave
        self.delay = delay
        self.data = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)
        if self.leave == "later":
            reactor.callLater(self.delay, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if self.leave == "body" and sep and body:
            self.transport.abortConnection()
        elif sep and (body.endswith(b"0\r\n\r\n") or b"content-length" in head.lower() and self._whole(head, body)):
            self.transport.loseConnection()

    def _whole(self, head: bytes, body: bytes) -> bool:
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                return len(body) >= int(line.split(b":")[1])
        return False

    def connectionLost(self, reason: Any) -> None:
        # Twisted's connector and client transport refer to each other: cut
        # that (the connector does not use it from here on), so that the
        # garbage found is the gateway's, not this client's.
        self.transport.connector.transport = None
        done, self.done = self.done, None
        if done is not None:
            done.callback(self.data)


class _Factory(ClientFactory):
    def __init__(self, request: bytes, leave: Optional[str], delay: float) -> None:
        self.args = (request, leave, delay)
        self.done: Deferred[bytes] = Deferred()

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Client(*self.args[:1], self.done, *self.args[1:])

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.done.errback(reason)


def _http(path: str, body: bytes, key: str = GW_KEY, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def _scenarios() -> list[tuple[str, bytes, Optional[str], float]]:
    """(name, request bytes, how the client leaves, after how long)."""
    chat, plain = json.dumps(CHAT).encode(), json.dumps(PLAIN).encode()
    slow = "x-mock-tokens: 400\r\nx-mock-delay-ms: 5\r\n"
    return [
        ("completed stream", _http("/v1/chat/completions", chat), None, 0),
        ("completed json", _http("/v1/chat/completions", plain), None, 0),
        ("client gone mid-stream", _http("/v1/chat/completions", chat, extra=slow), "body", 0),
        ("client gone waiting for headers", _http("/v1/chat/completions", chat, extra="x-mock-fault: stall-headers\r\n"), "later", 0.3),
        ("upstream 500", _http("/v1/chat/completions", chat, extra="x-mock-fault: status-500\r\n"), None, 0),
        ("upstream 429", _http("/v1/chat/completions", plain, extra="x-mock-fault: status-429\r\n"), None, 0),
        ("upstream reset mid-stream", _http("/v1/chat/completions", chat, extra="x-mock-fault: reset-mid\r\n"), None, 0),
        ("upstream headers timeout", _http("/v1/chat/completions", chat, extra="x-mock-fault: stall-headers\r\n"), None, 0),
        ("upstream idle timeout", _http("/v1/chat/completions", chat, extra="x-mock-fault: stall-mid\r\n"), None, 0),
        ("upstream unreachable", _http("/v1/chat/completions", json.dumps({**CHAT, "model": "nowhere"}).encode()), None, 0),
        ("401", _http("/v1/chat/completions", chat, key="wrong"), None, 0),
        ("400", _http("/v1/chat/completions", b"{not json"), None, 0),
        ("404 model", _http("/v1/chat/completions", json.dumps({**CHAT, "model": "nope"}).encode()), None, 0),
        ("404 route", _http("/v1/nowhere", chat), None, 0),
        ("413", _http("/v1/chat/completions", b'{"x":"' + b"y" * 5000 + b'"}'), None, 0),
    ]


class LoopbackGarbageTests(TestCase):
    """The whole gateway over real sockets."""

    timeout = 60

    def setUp(self) -> Any:
        self.dir = tempfile.mkdtemp(prefix="llmgate-gc-")
        self.mock = Daemon("llmgate-mock", ["--port", "tcp:0:interface=127.0.0.1"], self.dir)
        self.addCleanup(self.mock.stop)
        extra = (
            f'[keys.team]\napi_key_env = "GC_GW_KEY"\n'
            f'[ledger]\npath = "{os.path.join(self.dir, "usage.db")}"\n'
            "[timeouts]\nheaders = 1\nidle = 1\n"
            "[server]\nmax_body_bytes = 4096\n"
            "[providers.dead]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n"
            "api_key_env = \"E2E_UPSTREAM_KEY\"\n"
            '[models."nowhere"]\nprovider = "dead"\n'
        )
        conf = os.path.join(self.dir, "llmgate.toml")
        with open(conf, "w") as f:
            f.write(gateway_config(self.mock.port, extra))
        cfg = configmod.load(conf, {"E2E_UPSTREAM_KEY": "sk-upstream", "GC_GW_KEY": GW_KEY})
        self.tree = tap.build(cfg, reactor, ["tcp:0:interface=127.0.0.1"])
        self.tree.startService()
        self.addCleanup(self.tree.stopService)
        [listener] = [s for s in self.tree if isinstance(s, Listener)]
        self.accounting = listener.factory.resource.accounting

        def listening(port: Any) -> Any:
            self.port = port.getHost().port
            return port

        return listener._waitingForPort.addCallback(listening)

    def batch(self) -> Deferred[Any]:
        """Every scenario at once; fires when each client is done and every record is made."""
        ds = []
        for _, request, leave, delay in _scenarios():
            f = _Factory(request, leave, delay)
            reactor.connectTCP("127.0.0.1", self.port, f)
            ds.append(f.done)
        d = DeferredList(ds, consumeErrors=True)
        # Let the gateway see every close, the watchdog fire, and the
        # ledger write its batch.
        d.addCallback(lambda _: deferLater(reactor, 2.5, lambda: None))
        d.addCallback(lambda _: self.accounting.idle())
        d.addCallback(lambda _: deferLater(reactor, 0.5, lambda: None))
        return d

    @inlineCallbacks
    def test_no_cyclic_garbage(self) -> Any:
        """
        After a batch of requests of every outcome (a warm-up batch first,
        for caches built on first use), the collector finds nothing of the
        gateway's to free.
        """
        yield self.batch()
        gc.collect()
        gc.disable()
        try:
            yield self.batch()
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            found = Counter(type(o).__qualname__ for o in _ours(gc.garbage))
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
            gc.enable()
        self.flushLoggedErrors()
        self.assertEqual(found, Counter(), f"cyclic garbage: {dict(found.most_common(40))}")


def _twisteds_own(o: Any) -> bool:
    """
    The roots of the cycles Twisted itself makes and the gateway cannot
    break from outside: a failed outgoing connection attempt (the client
    transport's C{doWrite} bound to itself, the connector and the endpoint's
    wrapping factory referring to each other).
    """
    name = type(o).__qualname__
    if name == "Client":
        return getattr(getattr(o, "doWrite", None), "__func__", None) is getattr(type(o), "doConnect", 0)
    return name == "_WrappingFactory"


def _ours(garbage: list[Any]) -> list[Any]:
    """The garbage that is not held only by Twisted's own cycles."""
    ids = {id(o) for o in garbage}
    excused: set[int] = set()
    todo = [o for o in garbage if _twisteds_own(o)]
    while todo:
        o = todo.pop()
        if id(o) in excused:
            continue
        excused.add(id(o))
        todo.extend(r for r in gc.get_referents(o) if id(r) in ids and id(r) not in excused)
    return [o for o in garbage if id(o) not in excused]

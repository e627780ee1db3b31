# -*- test-case-name: tests.policy.test_resp -*-
"""
A small Redis client: RESP2 over one TCP connection, for the shared limit
state (L{llmgate.policy.redis}).

Why our own and not a library: the gateway needs four commands (EVALSHA,
EVAL, SCRIPT LOAD, PING), a deadline on every call and a reconnect with
backoff; that is a hundred lines here, with no new dependency to keep.

Every call has a deadline (C{timeout}): past it the call fails with
L{RedisTimeout} and never hangs.  Replies come back in request order, so a
late reply to a call that already timed out is read and dropped.  Without
a connection a call fails at once (L{RedisUnavailable}) while the client
reconnects in the background, its delay doubling from C{0.05} s up to
C{2} s: callers apply their own policy (fail open or closed) instead of
queueing behind a dead server.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional

from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

_log = Logger(namespace="llmgate.policy.redis")


class RedisError(Exception):
    """An error reply from the server (C{-ERR ...}, C{-NOSCRIPT ...})."""


class RedisUnavailable(Exception):
    """No connection to the server."""


class RedisTimeout(Exception):
    """The server did not answer within the call's deadline."""


class ProtocolError(Exception):
    """Bytes that are not RESP2."""


def encode(args: tuple[Any, ...]) -> bytes:
    """A command as a RESP array of bulk strings (ints, floats and str encoded as text)."""
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a if isinstance(a, bytes) else (a if isinstance(a, str) else repr(a) if isinstance(a, float) else str(a)).encode()
        out.append(b"$%d\r\n" % len(b))
        out.append(b)
        out.append(b"\r\n")
    return b"".join(out)


class _Incomplete(Exception):
    pass


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One reply from C{buf} at C{pos}: (value, next position), or L{_Incomplete}."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete()
    kind, line = buf[pos:pos + 1], buf[pos + 1:end]
    pos = end + 2
    if kind == b"+":
        return line, pos
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), pos
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _Incomplete()
        return buf[pos:pos + n], pos + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            v, pos = _parse(buf, pos)
            items.append(v)
        return items, pos
    raise ProtocolError(f"unexpected reply type {kind!r}")


class RESPProtocol(Protocol):
    """
    Pipelined RESP2 calls on one connection: C{call(*args)} sends a command
    and returns a Deferred fired with its reply, in order.
    """

    def __init__(self, clock: Any, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._buf = b""
        # (deferred, deadline call) per call in flight, oldest first.
        self._pending: deque[tuple[defer.Deferred[Any], Any]] = deque()
        self.on_lost: Optional[Callable[[], None]] = None

    def call(self, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        timer = self.clock.callLater(self.timeout, self._expired, d)
        self._pending.append((d, timer))
        self.transport.write(encode(args))
        return d

    def _expired(self, d: defer.Deferred[Any]) -> None:
        # The late reply is still read (and dropped): the slot stays.
        if not d.called:
                d.errback(RedisTimeout(f"no reply from redis within {self.timeout:g}s"))

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        pos = 0
        try:
            while pos < len(self._buf):
                try:
                    value, pos = _parse(self._buf, pos)
                except _Incomplete:
                    break
                self._reply(value)
        except (ProtocolError, ValueError) as e:
            _log.error("redis: bad reply ({e}); dropping the connection", e=e)
            self._buf = b""
            self.transport.abortConnection()
            return
        self._buf = self._buf[pos:]

    def _reply(self, value: Any) -> None:
        if not self._pending:
            raise ProtocolError("a reply to no call")
        d, timer = self._pending.popleft()
        if d.called:
            return
        timer.cancel()
        if isinstance(value, RedisError):
            d.errback(value)
        else:
            d.callback(value)

    def connectionLost(self, reason: Any = None) -> None:
        pending, self._pending = self._pending, deque()
        for d, timer in pending:
            if not d.called:
                timer.cancel()
                d.errback(RedisUnavailable("connection to redis lost"))
        if self.on_lost is not None:
            cb, self.on_lost = self.on_lost, None
            cb()


class RedisClient:
    """
    One connection to C{host:port} (database C{db}), kept open: connected
    by L{start}, reconnected with backoff when lost, closed by L{stop}.
    """

    MIN_DELAY = 0.05
    MAX_DELAY = 2.0

    def __init__(self, reactor: Any, host: str, port: int, db: int = 0, timeout: float = 0.05,
                 password: Optional[str] = None) -> None:
        self.reactor = reactor
        self.host, self.port, self.db = host, port, db
        self.timeout = timeout
        self.password = password
        self.proto: Optional[RESPProtocol] = None
        self._connecting: Optional[defer.Deferred[Any]] = None
        self._retry: Any = None
        self._delay = self.MIN_DELAY
        self._running = False
        self.connects = 0
        # Called with no argument after every (re)connection (scripts are reloaded lazily).
        self.on_connect: Optional[Callable[[], None]] = None

    def start(self) -> None:
        self._running = True
        self._connect()

    def stop(self) -> None:
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self.proto is not None:
            self.proto.on_lost = None
            self.proto.transport.loseConnection()
            self.proto = None

    @property
    def connected(self) -> bool:
        return self.proto is not None

    def call(self, *args: Any) -> defer.Deferred[Any]:
        """Send one command; fails at once without a connection."""
        if self.proto is None:
            return defer.fail(RedisUnavailable(f"not connected to redis at {self.host}:{self.port}"))
        return self.proto.call(*args)

    def _connect(self) -> None:
        self._retry = None
        if not self._running or self.proto is not None or self._connecting is not None:
            return
        ep = endpoints.TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=max(1, int(self.timeout * 20)))
        proto = RESPProtocol(self.reactor, self.timeout)
        d = endpoints.connectProtocol(ep, proto)
        self._connecting = d
        d.addCallback(self._handshake)
        d.addCallbacks(self._ready, self._failed)

    def _handshake(self, proto: RESPProtocol) -> defer.Deferred[Any]:
        calls = []
        if self.password:
            calls.append(proto.call("AUTH", self.password))
        if self.db:
            calls.append(proto.call("SELECT", self.db))
        calls.append(proto.call("PING"))
        d = defer.gatherResults(calls, consumeErrors=True)

        def fail(f: Any) -> Any:
            proto.transport.abortConnection()
            return f.value.subFailure if isinstance(f.value, defer.FirstError) else f

        d.addCallbacks(lambda _: proto, fail)
        return d

    def _ready(self, proto: RESPProtocol) -> None:
        self._connecting = None
        if not self._running:
            proto.transport.loseConnection()
            return
        self.proto = proto
        self._delay = self.MIN_DELAY
        self.connects += 1
        proto.on_lost = self._lost
        _log.info("redis: connected to {host}:{port}", host=self.host, port=self.port)
        if self.on_connect is not None:
            self.on_connect()

    def _failed(self, f: Any) -> None:
        self._connecting = None
        if f.check(defer.CancelledError):
            return
        if self._running:
            self._schedule()

    def _lost(self) -> None:
        self.proto = None
        if self._running:
            _log.warn("redis: connection to {host}:{port} lost; reconnecting", host=self.host, port=self.port)
            self._schedule()

    def _schedule(self) -> None:
        if self._retry is None:
            self._retry = self.reactor.callLater(self._delay, self._connect)
            self._delay = min(self.MAX_DELAY, self._delay * 2)


__all__ = ["RedisClient", "RESPProtocol", "RedisError", "RedisUnavailable", "RedisTimeout", "encode"]

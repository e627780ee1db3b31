# -*- test-case-name: tests.ops.test_notify -*-
"""
sd_notify: tell systemd (C{Type=notify}) when the gateway is ready,
reloading, stopping, and alive.

With C{Type=simple} systemd calls the service started as soon as the
process exists, before a port is bound or the tiktoken encodings are
built: units ordered after it, and C{systemctl start}, go ahead too early,
and a start that then fails is reported as a crash later instead of a
failed start.  With C{Type=notify} systemd waits for C{READY=1}, which the
gateway sends once every listener is bound (the moment its start-up block
is logged) -- or, under C{--workers}, once every worker serves.

The protocol is one datagram of C{KEY=VALUE} lines to the AF_UNIX socket
named in C{$NOTIFY_SOCKET} (a path, or C{@name} for the abstract
namespace).  No library is needed for it.  Without C{$NOTIFY_SOCKET} (not
under systemd) every call does nothing.  A send that fails is logged once
and never raises: systemd missing a message is no reason to stop serving.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Mapping, Optional

from twisted.application.service import Service
from twisted.logger import Logger

from llmgate.ops.periodic import Periodic

_log = Logger(namespace="llmgate.ops.notify")


def _address(value: str) -> str:
    """C{$NOTIFY_SOCKET} as a socket address: C{@name} is abstract."""
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


class Notifier:
    """
    Sends sd_notify messages to one socket.

    @param address: C{$NOTIFY_SOCKET}'s value, or L{None}: then nothing is
        sent.
    @param monotonic: the CLOCK_MONOTONIC reading in seconds, for the
        C{MONOTONIC_USEC} that systemd 253+ wants beside C{RELOADING=1}.
    @param watchdog_usec: C{$WATCHDOG_USEC}, or L{None} when the unit has
        no C{WatchdogSec}.
    """

    def __init__(
        self,
        address: Optional[str],
        monotonic: Callable[[], float] = time.monotonic,
        watchdog_usec: Optional[int] = None,
    ) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._monotonic = monotonic
        self._sock: Optional[socket.socket] = None
        self._warned = False

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] = os.environ, pid: Optional[int] = None, **kw: Any
    ) -> "Notifier":
        """
        The notifier systemd asked for in C{environ}.  C{$WATCHDOG_USEC}
        counts only if C{$WATCHDOG_PID} is unset or this process's pid.
        """
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog: Optional[int] = None
        wpid = environ.get("WATCHDOG_PID")
        mine = pid if pid is not None else os.getpid()
        if not wpid or wpid == str(mine):
            try:
                watchdog = int(environ.get("WATCHDOG_USEC", "")) or None
            except ValueError:
                watchdog = None
        return cls(address, watchdog_usec=watchdog, **kw)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send C{lines} as one message; whether it was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A datagram to a local socket never waits; if systemd's
                # queue is full, drop it rather than block the reactor.
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode("utf-8"), _address(self.address))
            return True
        except OSError as e:
            if not self._warned:
                self._warned = True
                _log.warn("sd_notify to {address} failed: {error}", address=self.address, error=str(e))
            return False

    def ready(self) -> bool:
        return self.send("READY=1", "STATUS=serving")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=draining")

    def reloading(self) -> bool:
        usec = int(self._monotonic() * 1_000_000)
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SystemdNotify(Service):
    """
    In the service tree: C{READY=1} when started (add it after the
    listeners: they bind before any service starts, and C{makeService}
    has built the encodings by then), C{STOPPING=1} when the stop begins
    (add it last: children stop in reverse order, so this is before the
    listeners close and the drain), and C{WATCHDOG=1} every half of
    C{$WATCHDOG_USEC} from start until the process exits -- the drain
    included, so a long drain is not taken for a hang.

    @param ready_at_start: L{False} for the C{--workers} supervisor, which
        sends C{READY=1} once every worker serves instead.
    """

    def __init__(self, notifier: Notifier, clock: Any, ready_at_start: bool = True) -> None:
        self.notifier = notifier
        self._clock = clock
        self._ready_at_start = ready_at_start
        self._beat: Optional[Periodic] = None

    def startService(self) -> None:
        super().startService()
        if self._ready_at_start:
            self.notifier.ready()
        usec = self.notifier.watchdog_usec
        if self.notifier.enabled and usec:
            # Not a child service: the beat goes on through the drain.
            self._beat = Periodic(self._clock, usec / 2_000_000, self.notifier.watchdog, now=True)
            self._beat.start_timer()

    def stopService(self) -> None:
        super().stopService()
        self.notifier.stopping()

    def stop_watchdog(self) -> None:
        """Stops the C{WATCHDOG=1} beat (the reactor's end stops it too)."""
        if self._beat is not None:
            self._beat.stop_timer()
        self._beat = None

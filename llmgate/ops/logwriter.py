# -*- test-case-name: tests.ops.test_logwriter -*-
"""
The process's log observer, with the access log off the critical path.

Every request ends with one access line (L{llmgate.accounting.recorder}).
Through twistd's own C{textFileLogObserver} each line cost a PEP 3101
format of the event, a timestamp with its time zone worked out again, and
a C{write} plus C{flush} (a system call) -- about 7% of the reactor
thread's CPU on short streams.  L{LogWriter} writes the same text:

  - an access event's line is already built; the timestamp is formatted
    once per second (L{TimePrefix}: the format has no finer field);
  - access lines are kept in order in a buffer and written together, in
    one C{write} and C{flush}, at most L{FLUSH_DELAY} seconds later (or
    when L{MAX_LINES} are waiting);
  - any other event first writes the waiting access lines, so the file
    keeps the order in which things were logged;
  - at reactor shutdown (after the services stopped) the buffer is
    written and the writer writes through from then on: no line is lost
    at a clean stop.  A process killed outright (SIGKILL) may lose the
    last L{FLUSH_DELAY} seconds of access lines; its ledger rows are
    marked interrupted anyway.

Only the reactor thread touches the buffer (access events are logged
there); an event from another thread is written at once, as twistd's
observer would (so it may come before access lines logged up to
L{FLUSH_DELAY} earlier).  No lock: a signal handler that logs (a worker's
SIGTERM handler does) runs on the reactor thread, and would deadlock on a
lock its own thread holds.  Without a reactor (L{LogWriter.attach} not
called) every event is written at once, as before.

The text is exactly twistd's (C{formatEventAsClassicLogText}):
C{<time> [<namespace>#<level>] <line>}, with a worker's C{worker-N }
before the system when the supervisor runs workers.  The JSON format
(C{--log-format json}) goes through the same writer, one object a line.
"""

from __future__ import annotations

import math
import threading
from typing import IO, Any, Callable, Optional

from twisted.logger import ILogObserver, formatEventAsClassicLogText, formatTime, timeFormatRFC3339
from twisted.python.compat import ioType
from zope.interface import implementer

ACCESS_NAMESPACE = "llmgate.access"
# How long an access line may wait in the buffer: lines of a busy second
# share a write; a quiet gateway's line still shows up at once to a reader.
FLUSH_DELAY = 0.05
# Lines waiting at most (bounded memory whatever the request rate).
MAX_LINES = 512


class TimePrefix:
    """
    twistd's timestamp (C{formatTime} with its format), formatted once per
    second: the format (RFC 3339 to the second) has nothing finer, and
    formatting works out the local time zone every time.
    """

    __slots__ = ("_format", "_second", "_text")

    def __init__(self, time_format: Optional[str] = timeFormatRFC3339) -> None:
        self._format = time_format
        self._second: Optional[int] = None
        self._text = "-"

    def __call__(self, when: Optional[float]) -> str:
        if self._format is None or when is None:
            return "-"
        second = math.floor(when)
        if second != self._second:
            self._text = formatTime(when, self._format)
            self._second = second
        return self._text


class TextFormat:
    """
    twistd's classic text line for an event; for an access event, built
    from its ready line without twisted.logger's formatter.

    @param system_prefix: put before each event's system (C{worker-N}).
    """

    def __init__(self, time_format: Optional[str] = timeFormatRFC3339, system_prefix: Optional[str] = None) -> None:
        self._time = TimePrefix(time_format)
        self._prefix = system_prefix

    def _system(self, event: dict[str, Any]) -> str:
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            return f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return str(system)

    def access(self, event: dict[str, Any]) -> Optional[str]:
        """The line of an access event; None if it is not one (use L{other})."""
        line = event.get("line")
        if event.get("log_format") != "{line}" or type(line) is not str or not line or "log_failure" in event:
            return None
        system = self._system(event)
        if self._prefix is not None:
            system = f"{self._prefix} {system}"
        if "\n" in line:
            line = line.replace("\n", "\n\t")
        return f"{self._time(event.get('log_time'))} [{system}] {line}\n"

    def other(self, event: dict[str, Any]) -> Optional[str]:
        """Any event, as twistd's C{textFileLogObserver} writes it."""
        if self._prefix is not None:
            event = {**event, "log_system": f"{self._prefix} {self._system(event)}"}
        return formatEventAsClassicLogText(event, formatTime=self._time)


@implementer(ILogObserver)
class LogWriter:
    """
    An C{ILogObserver} writing to C{out}; access lines buffered (see the
    module's docstring).

    @param out: a file (text, or binary: then UTF-8).
    @param access: C{access(event)} -> the access event's text, or None to
        write it through C{other}.
    @param other: C{other(event)} -> any event's text (None: nothing).
    """

    def __init__(
        self,
        out: IO[Any],
        other: Callable[[dict[str, Any]], Optional[str]],
        access: Optional[Callable[[dict[str, Any]], Optional[str]]] = None,
        delay: float = FLUSH_DELAY,
        max_lines: int = MAX_LINES,
    ) -> None:
        self._out = out
        self._encode = ioType(out) is not str
        self._other = other
        self._access = access or other
        self._delay = delay
        self._max = max_lines
        self._lines: list[str] = []
        self._reactor: Any = None
        self._thread: Optional[int] = None
        self._scheduled = False

    def attach(self, reactor: Any) -> None:
        """
        Buffer access lines from now on, written by C{reactor}'s timer, and
        write them all when C{reactor} shuts down.  Call on the reactor's
        thread.
        """
        self._reactor = reactor
        self._thread = threading.get_ident()
        reactor.addSystemEventTrigger("after", "shutdown", self.stop)

    def stop(self) -> None:
        """Write what waits, and write every line at once from now on."""
        self._reactor = None
        self._thread = None
        self.flush()

    def __call__(self, event: dict[str, Any]) -> None:
        thread = self._thread
        if thread is not None and threading.get_ident() == thread:
            if event.get("log_namespace") == ACCESS_NAMESPACE:
                text = self._access(event)
                if text:
                    self._lines.append(text)
                    if len(self._lines) >= self._max:
                        self.flush()
                    elif not self._scheduled:
                        self._scheduled = True
                        self._reactor.callLater(self._delay, self._timer)
                    return
            text = self._other(event)
            if self._lines:
                # The swap has no call in it, so a signal handler that logs
                # cannot run between its halves (no line written twice).
                waiting, self._lines = self._lines, []
                if text:
                    waiting.append(text)
                text = "".join(waiting)
        else:
            # Another thread (or no reactor): write at once; the buffer is
            # the reactor thread's alone.
            text = self._other(event)
        if text:
            self._write(text)

    def _timer(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write the waiting access lines (one write, one flush); on the reactor thread."""
        if self._lines:
            waiting, self._lines = self._lines, []
            self._write("".join(waiting))

    def _write(self, text: str) -> None:
        self._out.write(text.encode("utf-8") if self._encode else text)
        self._out.flush()

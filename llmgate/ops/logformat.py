# -*- test-case-name: tests.ops.test_logformat -*-
"""
C{--log-format json}: one JSON object per log line, for log shippers.

An access event (L{llmgate.accounting.recorder}) becomes an object whose
keys are its fields (C{method}, C{client}, C{key}, C{model},
C{served_model}, C{status}, C{outcome}, tokens, C{cost_usd}, C{ttft_ms},
C{duration_ms}, the request ids); every other event has its formatted
text under C{msg}.  Every object has C{time} (ISO 8601, UTC), C{level},
C{ns} (the logger's namespace) and, in a worker, C{worker}.

A worker's lines reach the supervisor's log already as JSON objects; the
supervisor writes them as they are (L{RAW}), so there is still one object
per line.  Twisted's own C{jsonFileLogObserver} is not used: it writes
every key of the event (logger objects, format strings) with a record
separator, which line-oriented shippers do not expect.

Both formats are written by L{llmgate.ops.logwriter.LogWriter}, which
buffers access lines off the critical path; under C{twistd} the text
format is also ours (L{twistd_observer}), with twistd's exact lines.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Callable, Optional

from twisted.logger import formatEvent, timeFormatRFC3339
from twisted.python import logfile

from llmgate.ops.logwriter import LogWriter, TextFormat

FORMATS = ("text", "json")
# An event carrying an already-encoded JSON object line (a worker's).
RAW = "llmgate_json"


def _default(value: Any) -> str:
    return repr(value)


def to_json(event: dict[str, Any], worker: Optional[int] = None) -> str:
    """The one-line JSON form of a twisted.logger event."""
    raw = event.get(RAW)
    if isinstance(raw, str):
        return raw
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), timezone.utc).isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else "info",
        "ns": event.get("log_namespace", "-"),
    }
    if worker is not None:
        out["worker"] = worker
    access = event.get("access")
    if isinstance(access, dict):
        out["msg"] = "access"
        out.update(access)
    else:
        out["msg"] = formatEvent(event)
        startup = event.get("startup")
        if isinstance(startup, dict):
            out["startup"] = startup
        failure = event.get("log_failure")
        if failure is not None:
            try:
                out["traceback"] = failure.getTraceback()
            except Exception:
                out["traceback"] = repr(failure)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"), default=_default)


def json_line(worker: Optional[int] = None) -> Callable[[dict[str, Any]], str]:
    """C{json_line(worker)(event)}: the event's JSON object and a newline."""

    def line(event: dict[str, Any]) -> str:
        try:
            return to_json(event, worker) + "\n"
        except Exception as e:  # never lose the line to a bad field
            return json.dumps({"level": "error", "ns": "llmgate.logformat", "msg": f"unloggable event: {e!r}"}) + "\n"

    return line


def json_observer(out: IO[str], worker: Optional[int] = None) -> LogWriter:
    """An C{ILogObserver} writing one JSON object per line to C{out}."""
    return LogWriter(out, json_line(worker))


def text_observer(out: IO[Any], time_format: Optional[str] = timeFormatRFC3339,
                  system_prefix: Optional[str] = None) -> LogWriter:
    """An C{ILogObserver} writing twistd's text lines to C{out}."""
    fmt = TextFormat(time_format, system_prefix)
    return LogWriter(out, fmt.other, fmt.access)


# Where twistd would log (its --logfile, --nodaemon, --syslog) and in
# which format, noted by the plugin's options (twistd's --logger factory
# takes no arguments), and the reactor whose timer writes the access lines
# (noted by the plugin's makeService, which runs before the factory).
_target: dict[str, Any] = {}


def use_for_twistd(server_options: Any, log_format: str = "json") -> None:
    """
    Make C{twistd} log through L{twistd_observer}: set its C{--logger}
    (the plugin's C{postOptions} runs before twistd's own, which imports
    the factory by name), keeping twistd's choice of file.  A C{--logger}
    given on the command line is kept.
    """
    if server_options.get("logger"):
        return
    _target["logfile"] = server_options.get("logfile")
    _target["nodaemon"] = bool(server_options.get("nodaemon"))
    _target["syslog"] = bool(server_options.get("syslog"))
    _target["format"] = log_format
    server_options["logger"] = "llmgate.ops.logformat.twistd_observer"


def use_reactor(reactor: Any) -> None:
    """The reactor the twistd observer buffers access lines with."""
    _target["reactor"] = reactor


def _rotate_on_usr1(logfile_: Any) -> None:
    # What twistd does for a log file: SIGUSR1 rotates it (unless the
    # signal is handled already).
    import signal

    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: Any) -> None:
        reactor = _target.get("reactor")
        if reactor is not None:
            reactor.callFromThread(logfile_.rotate)
        else:
            logfile_.rotate()

    signal.signal(signal.SIGUSR1, rotate)


def twistd_observer() -> Optional[LogWriter]:
    """
    The twistd C{--logger} factory: text (twistd's own lines) or JSON lines
    where twistd would write them.  L{None} (twistd's own observer) for
    C{--syslog} in text format.
    """
    text = _target.get("format", "json") == "text"
    if text and (_target.get("syslog") or (_target.get("logfile") == "-" and not _target.get("nodaemon"))):
        return None  # twistd's own: syslog, or its refusal of a daemon's stdout
    name = _target.get("logfile")
    if name == "-" or (not name and _target.get("nodaemon")):
        out: IO[Any] = sys.stdout
    else:
        out = logfile.LogFile.fromFullPath(name or "twistd.log")  # type: ignore[assignment]
        if text:
            _rotate_on_usr1(out)
    observer = text_observer(out) if text else json_observer(out)
    reactor = _target.get("reactor")
    if reactor is not None:
        observer.attach(reactor)
    return observer

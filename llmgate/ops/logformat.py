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
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Callable, Optional

from twisted.logger import formatEvent
from twisted.python import logfile

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


def json_observer(out: IO[str], worker: Optional[int] = None) -> Callable[[dict[str, Any]], None]:
    """An C{ILogObserver} writing one JSON object per line to C{out}."""
    from twisted.logger import ILogObserver
    from zope.interface import provider

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        try:
            line = to_json(event, worker)
        except Exception as e:  # never lose the line to a bad field
            line = json.dumps({"level": "error", "ns": "llmgate.logformat", "msg": f"unloggable event: {e!r}"})
        out.write(line + "\n")
        out.flush()

    return observe


# Where twistd would log (its --logfile and --nodaemon), noted by the
# plugin's options: twistd's --logger factory takes no arguments.
_target: dict[str, Any] = {}


def use_for_twistd(server_options: Any) -> None:
    """
    Make C{twistd} log JSON: set its C{--logger} to L{twistd_observer}
    (the plugin's C{postOptions} runs before twistd's own, which imports
    the factory by name), keeping twistd's choice of file.
    """
    if server_options.get("logger"):
        return
    _target["logfile"] = server_options.get("logfile")
    _target["nodaemon"] = bool(server_options.get("nodaemon"))
    server_options["logger"] = "llmgate.ops.logformat.twistd_observer"


def twistd_observer() -> Callable[[dict[str, Any]], None]:
    """The twistd C{--logger} factory: JSON lines where twistd would write text."""
    name = _target.get("logfile")
    if name == "-" or (not name and _target.get("nodaemon")):
        out: IO[str] = sys.stdout
    else:
        out = logfile.LogFile.fromFullPath(name or "twistd.log")  # type: ignore[assignment]
    return json_observer(out)

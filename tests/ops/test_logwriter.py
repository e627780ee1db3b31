# -*- test-case-name: tests.ops.test_logwriter -*-
"""The log writer: twistd's exact lines, access lines buffered off the critical path."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatTime, textFileLogObserver
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.recorder import _log_access
from llmgate.ops import logformat, logwriter
from llmgate.ops.logformat import json_observer, text_observer, to_json
from llmgate.ops.logwriter import FLUSH_DELAY, LogWriter, TimePrefix
from tests.accounting.test_ledger import makeRecord


class CountingFile(io.StringIO):
    """A text file counting its write and flush calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)

    def flush(self) -> None:
        self.flushes += 1


def access_events(n: int, t0: float = 1_700_000_000.25) -> list[dict[str, Any]]:
    """n access events as the recorder logs them (ids 0..n-1), a second apart."""
    with capturedLogs() as events:
        for i in range(n):
            _log_access("POST", "127.0.0.1", makeRecord(i, client_request_id="c\nx" if i == 1 else None))
    for i, e in enumerate(events):
        e["log_time"] = t0 + i * 0.6
    return list(events)


def twistd_text(events: list[dict[str, Any]], **kw: Any) -> str:
    """What twistd's own textFileLogObserver writes for events."""
    out = io.StringIO()
    observer = textFileLogObserver(out, **kw)
    for e in events:
        observer(e)
    return out.getvalue()


def other_event(t: float = 1_700_000_003.0) -> dict[str, Any]:
    return {"log_time": t, "log_level": LogLevel.warn, "log_namespace": "llmgate.x",
            "log_format": "slow {n}", "n": 3}


class FormatTests(SynchronousTestCase):
    def test_text_identical_to_twistd(self) -> None:
        """Access and other events are written exactly as twistd's textFileLogObserver writes them."""
        events = access_events(3) + [other_event()]
        out = io.StringIO()
        writer = text_observer(out)
        for e in events:
            writer(e)
        self.assertEqual(out.getvalue(), twistd_text(events))
        self.assertIn("[llmgate.access#info] POST /", out.getvalue())

    def test_worker_prefix_identical(self) -> None:
        """A worker's lines carry `worker-N` before the system, as the old tagging observer wrote them."""
        events = access_events(2) + [other_event(), {**other_event(), "log_system": "GatewaySite"}]
        tagged = [{**e, "log_system": "worker-2 " + (e.get("log_system") or
                                                      f"{e['log_namespace']}#{e['log_level'].name}")}
                  for e in events]
        for kw, twistd_kw in (({}, {}), ({"time_format": None}, {"timeFormat": None})):
            out = io.StringIO()
            writer = text_observer(out, system_prefix="worker-2", **kw)
            for e in events:
                writer(e)
            self.assertEqual(out.getvalue(), twistd_text(tagged, **twistd_kw))
        self.assertIn("- [worker-2 llmgate.access#info] POST", out.getvalue())

    def test_json_lines(self) -> None:
        """In JSON format every event is one to_json object per line, access ones too."""
        events = access_events(2) + [other_event()]
        out = io.StringIO()
        writer = json_observer(out, worker=1)
        for e in events:
            writer(e)
        lines = out.getvalue().split("\n")
        self.assertEqual(lines, [to_json(e, 1) for e in events] + [""])
        self.assertEqual(json.loads(lines[0])["msg"], "access")

    def test_time_prefix_once_per_second(self) -> None:
        """The timestamp is twistd's, formatted once per whole second, not per line."""
        calls = []

        def counting(when: float, fmt: Any) -> str:
            calls.append(when)
            return formatTime(when, fmt)

        self.patch(logwriter, "formatTime", counting)
        prefix = TimePrefix()
        t = 1_700_000_000.0
        self.assertEqual([prefix(t + 0.1), prefix(t + 0.9), prefix(t + 1.0), prefix(t + 1.5)],
                         [formatTime(t), formatTime(t), formatTime(t + 1), formatTime(t + 1)])
        self.assertEqual(len(calls), 2)
        self.assertEqual(TimePrefix(None)(t), "-")
        self.assertEqual(prefix(None), "-")


class BufferTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = CountingFile()
        self.reactor = MemoryReactorClock()
        self.writer = text_observer(self.out)
        self.writer.attach(self.reactor)

    def test_access_lines_written_together_later(self) -> None:
        """Access lines wait up to FLUSH_DELAY and are written in one write and one flush."""
        events = access_events(5)
        for e in events:
            self.writer(e)
        self.assertEqual(self.out.getvalue(), "")
        self.reactor.advance(FLUSH_DELAY)
        self.assertEqual(self.out.getvalue(), twistd_text(events))
        self.assertEqual((self.out.writes, self.out.flushes), (1, 1))

    def test_other_event_keeps_order(self) -> None:
        """Another event writes the waiting access lines first, at once: the file keeps the logging order."""
        events = access_events(2) + [other_event()] + access_events(1)
        for e in events:
            self.writer(e)
        self.assertEqual(self.out.getvalue(), twistd_text(events[:3]))
        self.reactor.advance(FLUSH_DELAY)
        self.assertEqual(self.out.getvalue(), twistd_text(events))

    def test_flushed_at_shutdown(self) -> None:
        """At reactor shutdown waiting lines are written; later access lines are written at once."""
        events = access_events(3)
        self.writer(events[0])
        self.writer(events[1])
        self.assertEqual(self.out.getvalue(), "")
        [(stop, args, kw)] = self.reactor.triggers["after"]["shutdown"]
        stop(*args, **kw)
        self.assertEqual(self.out.getvalue(), twistd_text(events[:2]))
        self.writer(events[2])
        self.assertEqual(self.out.getvalue(), twistd_text(events))

    def test_buffer_bounded(self) -> None:
        """At most MAX_LINES wait: the next one writes them without waiting for the timer."""
        writer = LogWriter(self.out, lambda e: "o\n", lambda e: e["line"] + "\n", max_lines=3)
        writer.attach(self.reactor)
        for i in range(3):
            self.assertEqual(self.out.getvalue(), "")
            writer({"log_namespace": "llmgate.access", "line": f"l{i}"})
        self.assertEqual(self.out.getvalue(), "l0\nl1\nl2\n")
        self.assertEqual(self.out.writes, 1)

    def test_other_thread_writes_at_once(self) -> None:
        """An access event logged from another thread than the reactor's is written at once."""
        events = access_events(1)
        t = threading.Thread(target=self.writer, args=(events[0],))
        t.start()
        t.join()
        self.assertEqual(self.out.getvalue(), twistd_text(events))

    def test_unattached_writes_through(self) -> None:
        """Without a reactor every line is written at once, as twistd's observer does."""
        out = CountingFile()
        writer = text_observer(out)
        events = access_events(2)
        for e in events:
            writer(e)
        self.assertEqual(out.getvalue(), twistd_text(events))
        self.assertEqual(out.writes, 2)

    def test_binary_file(self) -> None:
        """A binary file (twistd's LogFile) gets UTF-8."""
        out = io.BytesIO()
        writer = text_observer(out)
        events = access_events(1)
        writer(events[0])
        self.assertEqual(out.getvalue(), twistd_text(events).encode("utf-8"))


class TwistdTests(SynchronousTestCase):
    def test_twistd_text_logger(self) -> None:
        """twistd llmgate (text format) logs through our writer, buffering on the reactor makeService noted."""
        self.addCleanup(logformat._target.clear)
        opts = ServerOptions()
        opts.parseOptions(["-n", "llmgate", "--demo", "--workers", "1"])
        self.assertIs(opts["logger"], logformat.twistd_observer)
        out = io.StringIO()
        self.patch(logformat.sys, "stdout", out)
        reactor = MemoryReactorClock()
        logformat.use_reactor(reactor)
        observer = opts["logger"]()
        events = access_events(2)
        for e in events:
            observer(e)
        self.assertEqual(out.getvalue(), "")
        reactor.advance(FLUSH_DELAY)
        self.assertEqual(out.getvalue(), twistd_text(events))

    def test_twistd_syslog_left_to_twistd(self) -> None:
        """With --syslog the text format is twistd's own observer (the factory defers to it)."""
        self.addCleanup(logformat._target.clear)
        opts = ServerOptions()
        opts.parseOptions(["--syslog", "llmgate", "--demo", "--workers", "1"])
        self.assertIsNone(opts["logger"]())


class ReentryTests(SynchronousTestCase):
    def test_log_call_during_a_write(self) -> None:
        """
        An event logged while the writer is writing (a signal handler's, on
        the reactor thread) is written too, after what was being written:
        the writer never blocks on itself.
        """
        events = access_events(2)
        late = other_event()
        done: list[str] = []

        class ReenteringFile(io.StringIO):
            entered = False

            def write(self, s: str) -> int:
                n = super().write(s)
                if not self.entered:
                    self.entered = True
                    writer(late)
                return n

        out = ReenteringFile()
        writer = text_observer(out)

        def run() -> None:
            reactor = MemoryReactorClock()
            writer.attach(reactor)
            for e in events:
                writer(e)
            reactor.advance(FLUSH_DELAY)
            done.append(out.getvalue())

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(10)
        self.assertEqual(done, [twistd_text(events + [late])])

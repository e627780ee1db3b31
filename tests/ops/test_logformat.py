# -*- test-case-name: tests.ops.test_logformat -*-
"""--log-format json: one JSON object per line."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.logger import LogLevel, Logger, capturedLogs
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops import logformat
from llmgate.ops.logformat import RAW, json_observer, to_json


class ToJSONTests(SynchronousTestCase):
    def test_access_fields_are_keys(self) -> None:
        """An access event's fields are the object's keys, with time, level and namespace."""
        event = {"log_time": 0.0, "log_level": LogLevel.info, "log_namespace": "llmgate.access",
                 "log_format": "{line}", "line": "text", "access": {"status": 200, "key": "team-a", "cost_usd": 0.5}}
        obj = json.loads(to_json(event, worker=3))
        self.assertEqual(obj, {"time": "1970-01-01T00:00:00.000+00:00", "level": "info", "ns": "llmgate.access",
                               "worker": 3, "msg": "access", "status": 200, "key": "team-a", "cost_usd": 0.5})

    def test_other_events_text_and_traceback(self) -> None:
        """Other events carry their formatted text, and a failure its traceback, on one line."""
        try:
            1 / 0
        except ZeroDivisionError:
            f = Failure()
        event = {"log_time": 1.0, "log_level": LogLevel.error, "log_namespace": "x",
                 "log_format": "boom {n}", "n": 7, "log_failure": f}
        line = to_json(event)
        self.assertNotIn("\n", line)
        obj = json.loads(line)
        self.assertEqual((obj["msg"], obj["level"]), ("boom 7", "error"))
        self.assertIn("ZeroDivisionError", obj["traceback"])

    def test_raw_passthrough(self) -> None:
        """A worker's JSON line relayed by the supervisor is written as it is."""
        out = io.StringIO()
        json_observer(out)({"log_time": 1.0, RAW: '{"a":1}', "log_format": "{line}", "line": '{"a":1}'})
        self.assertEqual(out.getvalue(), '{"a":1}\n')

    def test_worker_relay_keeps_json(self) -> None:
        """The supervisor's relay of a worker's JSON line marks it raw (no double encoding)."""
        from llmgate.workers import _WorkerProtocol

        proto = _WorkerProtocol.__new__(_WorkerProtocol)
        with capturedLogs() as events:
            proto._relay(b'{"msg":"access","status":200}')
            proto._relay(b"a text line")
        self.assertEqual(to_json(events[0]), '{"msg":"access","status":200}')
        self.assertEqual(json.loads(to_json(events[1]))["msg"], "a text line")

    def test_unserializable_field(self) -> None:
        """A field JSON cannot encode is written as its repr, not dropped."""
        event = {"log_time": 1.0, "log_namespace": "x", "access": {"odd": object()}}
        self.assertIn("object object", json.loads(to_json(event))["odd"])


class OptionsTests(SynchronousTestCase):
    def test_twistd_logger_set(self) -> None:
        """twistd llmgate --log-format json makes twistd's --logger the JSON observer."""
        from twisted.scripts.twistd import ServerOptions

        self.addCleanup(logformat._target.clear)
        opts = ServerOptions()
        opts.parseOptions(["-n", "llmgate", "--demo", "--workers", "1", "--log-format", "json"])
        self.assertIs(opts["logger"], logformat.twistd_observer)
        out = io.StringIO()
        self.patch(logformat.sys, "stdout", out)
        observer = opts["logger"]()
        Logger(namespace="t", observer=observer).info("hello {x}", x=1)
        self.assertEqual(json.loads(out.getvalue())["msg"], "hello 1")

    def test_bad_format_refused(self) -> None:
        """--log-format other than text or json is a usage error."""
        from llmgate.tap import Options

        self.assertRaises(usage.UsageError, Options().parseOptions, ["--demo", "--log-format", "xml"])

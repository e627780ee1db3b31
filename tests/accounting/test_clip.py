"""
Strings from clients are capped before they reach the ledger or the log:
L{llmgate.accounting.clip} and its use by the recorder.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.clip import clip
from tests.api.test_resource import gateway
from tests.fakes import FakeResponse, make_config

LONG = "m" * 100_000


class ClipTests(SynchronousTestCase):
    def test_short_untouched(self) -> None:
        """Values up to 256 characters are kept as they are."""
        self.assertEqual(clip("gpt-4o"), "gpt-4o")
        self.assertEqual(clip("x" * 256), "x" * 256)

    def test_long_cut_with_marker(self) -> None:
        """Longer values keep their first 256 characters and say how many were cut."""
        self.assertEqual(clip("x" * 300), "x" * 256 + "...[44 more chars]")


class RecordTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lines: list[str] = []

        def observe(event: Any) -> None:
            if event.get("log_namespace") == "llmgate.access":
                self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def assertClipped(self, value: str) -> None:
        self.assertLessEqual(len(value), 300)
        self.assertTrue(value.endswith(" more chars]"), value[-40:])

    def test_unknown_model_refused(self) -> None:
        """A refused request's model name is capped in its record and log line."""
        gw, ledger = gateway()
        gw.resource.config = make_config(providers={"oai": {"kind": "openai", "base_url": "http://up.test/v1"}})
        gw.post("/v1/chat/completions", {"model": LONG})
        [rec] = ledger.records
        self.assertEqual(rec.status, 404)
        self.assertClipped(rec.model)
        self.assertTrue(self.lines and all(len(line) < 1000 for line in self.lines))

    def test_passed_through_model(self) -> None:
        """A long model name a default provider was asked for is capped in the record (both names) and the access line."""
        gw, ledger = gateway()
        gw.post("/v1/chat/completions", {"model": LONG})
        self.assertEqual(len(gw.http.calls), 1)
        r = FakeResponse(404, {b"content-type": [b"application/json"]})
        gw.http.calls[0]["deferred"].callback(r)
        r.send(b'{"error": {}}')
        r.end()
        [rec] = ledger.records
        self.assertClipped(rec.model)
        self.assertClipped(rec.upstream_model)
        self.assertTrue(self.lines and all(len(line) < 1000 for line in self.lines))

    def test_long_path(self) -> None:
        """An unknown path is capped in its record."""
        gw, ledger = gateway()
        gw.post("/v1/" + "p" * 5000, {"model": "m"})
        [rec] = ledger.records
        self.assertClipped(rec.route)

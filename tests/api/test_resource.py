"""
Tests for the body handling of L{llmgate.api.resource.GatewayResource}:
strict parsing, and big bodies parsed on a bounded executor.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmgate.ops.executors import BoundedExecutor
from tests.fakes import Gateway, parse_response
from tests.ops.test_executors import HandPool, ImmediateReactor


class ListLedger:
    """Keeps the usage records it is given."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def record(self, rec: Any) -> None:
        self.records.append(rec)


def gateway() -> tuple[Gateway, ListLedger]:
    gw = Gateway()
    ledger = ListLedger()
    gw.accounting.ledger = ledger
    return gw, ledger


def big_chat(model: str = "gpt-4o", size: int = 200_000) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * size}]}).encode()


class DuplicateKeyTests(SynchronousTestCase):
    def refused(self, gw: Gateway, ledger: ListLedger, transport: Any) -> tuple[int, dict[str, Any]]:
        status, _, body, _ = parse_response(transport.value())
        self.assertEqual(gw.http.calls, [], "upstream must not be contacted")
        self.assertEqual([(r.status, r.outcome) for r in ledger.records], [(400, "rejected")])
        return status, json.loads(body)

    def test_duplicate_model_openai(self) -> None:
        """
        A body naming the model twice is a 400 in OpenAI's shape: routed by
        one and served by the other, it would dodge the allow-list and the
        price.
        """
        gw, ledger = gateway()
        raw = b'{"model": "gpt-4o-mini", "messages": [], "model": "gpt-4o"}'
        _, t = gw.post("/v1/chat/completions", None, raw=raw)
        status, doc = self.refused(gw, ledger, t)
        self.assertEqual((status, doc["error"]["type"], doc["error"]["param"]), (400, "invalid_request_error", "model"))
        self.assertIn('duplicate key "model"', doc["error"]["message"])

    def test_escaped_duplicate_model_anthropic(self) -> None:
        """The same, spelled with a \\u escape, on an Anthropic route: 400 in Anthropic's shape."""
        gw, ledger = gateway()
        raw = b'{"model": "claude-x", "max_tokens": 5, "messages": [], "mod\\u0065l": "claude-y"}'
        _, t = gw.post("/v1/messages", None, raw=raw)
        status, doc = self.refused(gw, ledger, t)
        self.assertEqual((status, doc["type"], doc["error"]["type"]), (400, "error", "invalid_request_error"))

    def test_duplicate_stream_and_options(self) -> None:
        """C{stream} and C{stream_options} given twice are refused too."""
        for raw in (
            b'{"model": "gpt-4o", "stream": false, "stream": true}',
            b'{"model": "gpt-4o", "stream": true, "stream_options": {}, "stream_options": {"include_usage": false}}',
        ):
            gw, ledger = gateway()
            _, t = gw.post("/v1/chat/completions", None, raw=raw)
            self.assertEqual(self.refused(gw, ledger, t)[0], 400)

    def test_duplicate_in_a_big_body(self) -> None:
        """A repeated key in a body parsed on a thread is refused the same way."""
        gw, ledger = gateway()
        pool = HandPool()
        gw.resource._parse_in_thread = BoundedExecutor(ImmediateReactor(), "parse", 1, pool=pool).submit
        raw = big_chat()[:-1] + b', "model": "other"}'
        _, t = gw.post("/v1/chat/completions", None, raw=raw)
        self.assertEqual(len(pool.jobs), 1)
        pool.run_one()
        self.assertEqual(self.refused(gw, ledger, t)[0], 400)


class DepthTests(SynchronousTestCase):
    def test_too_deep_is_400(self) -> None:
        """A body nested past the cap is a 400, though json.loads would take it."""
        gw, ledger = gateway()
        raw = b'{"model": "gpt-4o", "x": ' + b"[" * 200 + b"]" * 200 + b"}"
        json.loads(raw)
        _, t = gw.post("/v1/chat/completions", None, raw=raw)
        status, _, body, _ = parse_response(t.value())
        self.assertEqual(status, 400)
        self.assertIn("nested deeper", json.loads(body)["error"]["message"])
        self.assertEqual(gw.http.calls, [])

    def test_recursion_limit_on_the_thread_path(self) -> None:
        """100000 nested brackets in a body parsed on a thread: 400, nothing logged."""
        gw, ledger = gateway()
        pool = HandPool()
        gw.resource._parse_in_thread = BoundedExecutor(ImmediateReactor(), "parse", 1, pool=pool).submit
        _, t = gw.post("/v1/messages", None, raw=b'{"model": "claude-x", "x": ' + b"[" * 100000)
        pool.run_one()
        status, _, body, _ = parse_response(t.value())
        self.assertEqual((status, json.loads(body)["type"]), (400, "error"))
        self.assertEqual(self.flushLoggedErrors(), [])


class ExecutorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw, self.ledger = gateway()
        self.pool = HandPool()
        self.executor = BoundedExecutor(ImmediateReactor(), "parse", 1, max_jobs=2, pool=self.pool)
        self.gw.resource._parse_in_thread = self.executor.submit

    def test_big_body_parsed_on_the_executor(self) -> None:
        """A body over the inline limit is parsed by the executor, then relayed."""
        self.gw.post("/v1/chat/completions", None, raw=big_chat())
        self.assertEqual(self.gw.http.calls, [])
        self.pool.run_one()
        self.assertEqual(len(self.gw.http.calls), 1)

    def test_small_body_inline(self) -> None:
        """A small body never waits for a thread."""
        self.gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": []})
        self.assertEqual((len(self.gw.http.calls), self.pool.jobs), (1, []))

    def test_client_gone_while_queued(self) -> None:
        """
        A client that hangs up while its body waits for a thread takes the
        job out of the queue: it is never parsed, and recorded once as
        client_cancelled.
        """
        self.gw.post("/v1/chat/completions", None, raw=big_chat())  # busy
        channel, _ = self.gw.post("/v1/chat/completions", None, raw=big_chat())
        self.assertEqual((self.executor.jobs, len(self.pool.jobs)), (2, 1))
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.executor.jobs, 1)
        self.pool.run_one()
        self.assertEqual(self.pool.jobs, [])
        self.assertEqual(len(self.gw.http.calls), 1)
        self.assertEqual([(r.status, r.outcome) for r in self.ledger.records], [(0, "client_cancelled")])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_gone_while_parsing(self) -> None:
        """A client gone while its body is parsed is recorded once, not relayed."""
        channel, _ = self.gw.post("/v1/chat/completions", None, raw=big_chat())
        channel.connectionLost(Failure(ConnectionDone()))
        self.pool.run_one()
        self.assertEqual(self.gw.http.calls, [])
        self.assertEqual([r.outcome for r in self.ledger.records], ["client_cancelled"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_request_buffer_dropped(self) -> None:
        """The request object lets go of the body once it is handed to the parse."""
        channel, _ = self.gw.post("/v1/chat/completions", None, raw=big_chat())
        self.assertIsNone(channel.requests[0].content)

    def test_full_queue_is_503_in_dialect(self) -> None:
        """
        Past the queue bound a big body is refused with 503 and Retry-After,
        in the route's dialect, and recorded as rejected.
        """
        self.gw.post("/v1/chat/completions", None, raw=big_chat())
        self.gw.post("/v1/chat/completions", None, raw=big_chat())
        _, t = self.gw.post("/v1/chat/completions", None, raw=big_chat())
        status, headers, body, _ = parse_response(t.value())
        self.assertEqual((status, headers[b"retry-after"]), (503, [b"1"]))
        self.assertEqual(json.loads(body)["error"]["type"], "server_error")
        big_msg = json.dumps({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
        _, t = self.gw.post("/v1/messages", None, raw=big_msg)
        status, headers, body, _ = parse_response(t.value())
        self.assertEqual((status, json.loads(body)["error"]["type"]), (503, "overloaded_error"))
        self.assertEqual([(r.status, r.outcome) for r in self.ledger.records], [(503, "rejected")] * 2)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_big_body_done_reported(self) -> None:
        """When a request with a big body is over, its size is reported (to trim the heap)."""
        freed: list[int] = []
        self.gw.resource._on_big_body_done = freed.append
        raw = big_chat()
        channel, _ = self.gw.post("/v1/chat/completions", None, raw=raw)
        self.gw.post("/v1/chat/completions", {"model": "gpt-4o"})
        self.assertEqual(freed, [])
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(freed, [len(raw)])


class SmallBodyTests(SynchronousTestCase):
    """A small body is parsed and relayed (or refused) in the render call, without a Deferred chain."""

    def deferreds_from_render(self, post: Any) -> list[str]:
        """The functions of llmgate.api.resource under which a Deferred was made during C{post()}."""
        import sys

        from twisted.internet import defer

        made: list[str] = []
        real_init = defer.Deferred.__init__

        def init(d: Any, *a: Any, **kw: Any) -> None:
            f = sys._getframe(1)
            for _ in range(3):
                if f is None:
                    break
                if f.f_code.co_filename.endswith("api/resource.py"):
                    made.append(f.f_code.co_name)
                    break
                f = f.f_back
            real_init(d, *a, **kw)

        self.patch(defer.Deferred, "__init__", init)
        post()
        return made

    def test_relayed_without_a_deferred(self) -> None:
        """A stream's small body goes upstream with no Deferred made by the resource's render."""
        gw = Gateway()
        made = self.deferreds_from_render(
            lambda: gw.post("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": []})
        )
        self.assertEqual(len(gw.http.calls), 1)
        self.assertNotIn("_render_relay", made)

    def test_refused_without_a_deferred(self) -> None:
        """A small body that is not JSON is answered 400 in the dialect at once, with no Deferred."""
        gw = Gateway()
        box: list[Any] = []
        made = self.deferreds_from_render(lambda: box.append(gw.post("/v1/messages", None, raw=b"{nope")))
        gw.clock.advance(0)
        status, _, body, _ = parse_response(box[0][1].value())
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body)["type"], "error")
        self.assertNotIn("_render_relay", made)
        self.assertEqual(gw.http.calls, [])

    def test_failing_refusal_is_logged(self) -> None:
        """If answering a refused body fails, the failure is logged, not raised into twisted.web."""
        from twisted.logger import capturedLogs

        gw = Gateway()

        def broken(*a: Any) -> None:
            raise RuntimeError("answer failed")

        self.patch(gw.resource, "_relay_failed", broken)
        with capturedLogs() as events:
            gw.post("/v1/messages", None, raw=b"{nope")
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)
        self.flushLoggedErrors(RuntimeError)

# -*- test-case-name: tests.policy.test_cutoff -*-
"""
L{BudgetCutoff}: a key with C{cut_at_budget} has its streams ended, with
an in-dialect error event and no C{[DONE]}, once its settled spend plus
the estimated cost of its streams in flight passes its budget.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llmgate.policy.cutoff import BudgetCutoff
from llmgate.policy.keys import KeyRecord, _record, digest
from tests.fakes import SSE_HEADERS, FakeResponse, parse_response
from tests.policy.test_gateway import chat, gateway

# $0.001 a token (test_gateway's prices); 400 text bytes ~ 100 tokens ~ $0.10.
CUT = KeyRecord("alice", digest(b"lg-alice"), budget_usd=0.5, period="day", cut_at_budget=True)


def chunk(text: str) -> bytes:
    doc = {"id": "c1", "object": "chat.completion.chunk", "model": "real-model",
           "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def anthropic_delta(text: str) -> bytes:
    doc = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    return b"event: content_block_delta\ndata: " + json.dumps(doc).encode() + b"\n\n"


ANTHROPIC_START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"m1","type":"message","role":"assistant",'
    b'"model":"real-model","content":[],"usage":{"input_tokens":10,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
)


class CutoffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw, self.ledger = gateway(CUT, KeyRecord("bob", digest(b"lg-bob"), budget_usd=0.5, period="day"))
        r = self.gw.resource
        self.cutoff = BudgetCutoff(self.gw.clock, r.active, lambda: r.keys.by_name, r.quotas, self.gw.accounting.in_flight_cost)

    def stream(self, secret: str, path: str = "/v1/chat/completions", model: str = "public-model") -> tuple[Any, FakeResponse]:
        t = chat(self.gw, secret, path=path, model=model, stream=True, max_tokens=50)
        resp = FakeResponse(200, SSE_HEADERS)
        self.gw.http.calls[-1]["deferred"].callback(resp)
        return t, resp

    def settle(self) -> None:
        for _ in range(3):
            self.gw.clock.advance(0)

    def test_openai_stream_cut(self) -> None:
        """Past the budget an OpenAI stream ends with an insufficient_quota error event, no [DONE]; recorded and charged."""
        t, resp = self.stream("lg-alice")
        resp.send(chunk("x" * 400))
        self.settle()
        self.cutoff.check()
        self.assertEqual(self.cutoff.cut, 0)  # ~$0.11 of $0.50
        resp.send(chunk("y" * 2000))
        self.settle()
        self.cutoff.check()
        self.assertEqual(self.cutoff.cut, 1)
        self.settle()
        _, _, body, complete = parse_response(t.value())
        self.assertNotIn(b"[DONE]", body)
        last = json.loads(body.rstrip().rsplit(b"\n\n", 1)[-1][len(b"data: "):])
        self.assertEqual((last["error"]["type"], last["error"]["code"]), ("insufficient_quota", "insufficient_quota"))
        self.assertIn("budget", last["error"]["message"])
        self.assertTrue(resp.transport.stopped)
        (rec,) = self.ledger.records
        self.assertEqual((rec.outcome, rec.phase), ("gateway_error", "body"))
        self.assertGreater(rec.output_tokens, 500)
        self.assertAlmostEqual(self.gw.resource.quotas.spent("alice", "day", self.gw.clock.seconds()), rec.cost_usd)

    def test_anthropic_stream_cut(self) -> None:
        """On /v1/messages the cut is an `event: error` of type rate_limit_error, with no message_stop."""
        t, resp = self.stream("lg-alice", path="/v1/messages", model="real-model")
        resp.send(ANTHROPIC_START + anthropic_delta("z" * 2400))
        self.settle()
        self.cutoff.check()
        self.settle()
        _, _, body, _ = parse_response(t.value())
        self.assertNotIn(b"message_stop", body)
        self.assertIn(b"event: error\n", body)
        last = json.loads(body.rstrip().rsplit(b"data: ", 1)[-1])
        self.assertEqual(last["error"]["type"], "rate_limit_error")

    def test_off_by_default(self) -> None:
        """A key without cut_at_budget streams on past its budget (the default)."""
        t, resp = self.stream("lg-bob")
        resp.send(chunk("y" * 4000))
        self.settle()
        self.cutoff.check()
        self.assertEqual(self.cutoff.cut, 0)
        self.assertFalse(resp.transport.stopped)
        resp.send(b"data: [DONE]\n\n")
        resp.end()
        self.settle()
        self.assertIn(b"[DONE]", parse_response(t.value())[2])

    def test_settled_spend_counts(self) -> None:
        """The settled spend of the period counts: a small stream of a key that already spent its budget is cut."""
        self.gw.resource.quotas.state.load_spend(self.gw.clock.seconds(), {"alice": {"day": 0.4, "month": 0.4, "total": 0.4}})
        t, resp = self.stream("lg-alice")
        self.cutoff.check()
        self.assertEqual(self.cutoff.cut, 0)  # $0.40 + the prompt's ~$0.03
        resp.send(chunk("x" * 400))
        self.settle()
        self.cutoff.check()
        self.assertEqual(self.cutoff.cut, 1)

    def test_shared_spend_read_before_the_check(self) -> None:
        """
        With shared state (Redis) the check first reads the key's spend
        from it (other workers' settles), then cuts by that: $0.45 settled
        elsewhere plus this stream's ~$0.11 is past the $0.50 budget.
        """
        from twisted.internet import defer

        quotas = self.gw.resource.quotas
        reads: list[tuple[list[str], defer.Deferred[None]]] = []

        def refresh_spend(keys: list[str]) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            reads.append((keys, d))
            return d

        quotas.state.refresh_spend = refresh_spend  # as RedisState has
        t, resp = self.stream("lg-alice")
        resp.send(chunk("x" * 400))
        self.settle()
        self.cutoff.check()
        [(keys, d)] = reads
        self.assertEqual(keys, ["alice"])
        self.assertEqual(self.cutoff.cut, 0)
        # What another worker settled, as the read brings it in.
        quotas.state._spend("alice", self.gw.clock.seconds()).add(0.45)
        d.callback(None)
        self.assertEqual(self.cutoff.cut, 1)

    def test_timer(self) -> None:
        """Started, it checks once a second, not per event."""
        calls = []
        self.patch(self.cutoff, "check", lambda: calls.append(1))
        self.cutoff.startService()
        self.gw.clock.advance(0.5)
        self.assertEqual(calls, [])
        self.gw.clock.advance(0.5)
        self.assertEqual(calls, [1])
        self.cutoff.stopService()


class KeyFileTests(SynchronousTestCase):
    def test_field(self) -> None:
        """cut_at_budget is read from the key file, false by default, and must be a boolean."""
        h = "sha256:" + "ab" * 32
        self.assertTrue(_record("a", {"hash": h, "cut_at_budget": True}).cut_at_budget)
        self.assertFalse(_record("a", {"hash": h}).cut_at_budget)
        from llmgate.policy.keys import KeyFileError

        self.assertRaises(KeyFileError, _record, "a", {"hash": h, "cut_at_budget": "yes"})

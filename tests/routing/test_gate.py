"""
The first-content gate and Anthropic error-first, through the in-memory
gateway: while another attempt could follow, a 200 stream's status line
and first events are held until its first content; an error (or a lost
connection) before that is a failure before the first byte.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from llmgate.relay.gate import MAX_HELD
from llmgate.relay.stream import GATED, STREAMING
from tests.fakes import parse_response
from tests.routing.helpers import CHAT, DONE, E1, USAGE, FixedRng, answer, host, routed_gateway

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
CLAUDE = {"claude": {"deployments": [{"provider": "ant", "upstream_model": "c1"}, {"provider": "ant", "upstream_model": "c2"}]}}
MSG = {"model": "claude", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def ev(name: str, doc: dict) -> bytes:  # type: ignore[type-arg]
    return f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode()


START = ev("message_start", {"type": "message_start", "message": {"id": "m", "model": "c", "usage": {"input_tokens": 9, "output_tokens": 1}}})
PING = ev("ping", {"type": "ping"})
ERROR = ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
BLOCK = ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
DELTA = ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}})
STOP = ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}) + ev("message_stop", {"type": "message_stop"})


def only_relay(gw):  # type: ignore[no-untyped-def]
    [relay] = gw.resource.active
    return relay


class GateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = routed_gateway()
        self.gw.resource.rng = FixedRng(0.1)

    def test_held_until_first_content(self) -> None:
        """Another deployment could still take over: no status line until the first content; then all of it at once."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        r = answer(gw, 0)
        gw.clock.advance(0)
        self.assertEqual(only_relay(gw).phase, GATED)
        r.send(ROLE)
        gw.clock.advance(0)
        self.assertEqual(transport.value(), b"")
        r.send(E1)
        gw.clock.advance(0)
        self.assertEqual(only_relay(gw).phase, STREAMING)
        status, headers, body, _ = parse_response(transport.value())
        self.assertEqual((status, body), (200, ROLE + E1))
        self.assertEqual(headers[b"cache-control"], [b"no-cache"])
        r.send(USAGE + DONE)
        r.end()
        gw.clock.advance(0)
        status, _, body, complete = parse_response(transport.value())
        self.assertEqual((body, complete), (ROLE + E1 + DONE, True))
        [rec] = gw.accounting.ledger.records
        self.assertEqual((rec.outcome, rec.output_tokens, rec.attempt), ("completed", 1, 1))
        self.assertIsNotNone(rec.ttft_ms)

    def test_no_gate_when_nothing_could_follow(self) -> None:
        """A model with one deployment (no other attempt possible): the status line goes out at the headers, as before."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", {**CHAT, "model": "small"})
        answer(gw, 0)
        gw.clock.advance(0)
        self.assertEqual(only_relay(gw).phase, STREAMING)
        self.assertEqual(parse_response(transport.value())[0], 200)

    def test_no_gate_on_last_attempt(self) -> None:
        """The attempt budget spent (max_attempts = 1): no gate."""
        gw = routed_gateway(routing={"max_attempts": 1})
        _, transport = gw.post("/v1/chat/completions", CHAT)
        answer(gw, 0)
        gw.clock.advance(0)
        self.assertEqual(parse_response(transport.value())[0], 200)

    def test_over_the_bound_commits(self) -> None:
        """More than MAX_HELD bytes of preamble: the attempt commits anyway and relays it all."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        r = answer(gw, 0)
        comment_event = b": " + b"x" * 1000 + b"\n" + ROLE
        n = MAX_HELD // len(comment_event) + 1
        for _ in range(n - 1):
            r.send(comment_event)
        gw.clock.advance(0)
        self.assertEqual(transport.value(), b"")
        r.send(comment_event)
        gw.clock.advance(0)
        status, _, body, _ = parse_response(transport.value())
        self.assertEqual((status, len(body)), (200, n * len(comment_event)))

    def test_lost_before_content_fails_over(self) -> None:
        """The connection lost after the role chunk, before content: b serves, the client sees b's stream only."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        r = answer(gw, 0)
        r.send(ROLE)
        r.fail()
        gw.clock.advance(0)
        self.assertEqual(host(gw.http.calls[1]), "b.test")
        r2 = answer(gw, 1)
        r2.send(E1 + USAGE + DONE)
        r2.end()
        gw.clock.advance(0)
        status, _, body, complete = parse_response(transport.value())
        self.assertEqual((status, body, complete), (200, E1 + DONE, True))
        recs = gw.accounting.ledger.records
        failed = [x for x in recs if x.parent_request_id]
        served = [x for x in recs if not x.parent_request_id]
        self.assertEqual([(x.attempt, x.outcome, x.phase, x.provider) for x in failed], [(1, "upstream_error", "body", "a")])
        self.assertEqual([(x.attempt, x.outcome, x.provider, x.output_tokens) for x in served], [(2, "completed", "b", 1)])
        self.assertEqual(gw.resource.active, set())


class ErrorFirstTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = routed_gateway(models=CLAUDE)
        self.gw.resource.rng = FixedRng(0.1)

    def test_error_event_before_content_fails_over(self) -> None:
        """message_start then an overloaded error: c2 serves; the client sees one clean stream, c1's connection is closed."""
        gw = self.gw
        _, transport = gw.post("/v1/messages", MSG)
        self.assertEqual(json.loads(gw.http.calls[0]["data"])["model"], "c1")
        r = answer(gw, 0)
        r.send(START + PING)
        gw.clock.advance(0)
        self.assertEqual(transport.value(), b"")
        r.send(ERROR)
        self.assertTrue(r.transport.stopped)
        self.assertEqual(json.loads(gw.http.calls[1]["data"])["model"], "c2")
        gw.clock.advance(0)
        r2 = answer(gw, 1)
        r2.send(START + BLOCK + DELTA + STOP)
        r2.end()
        gw.clock.advance(0)
        status, _, body, complete = parse_response(transport.value())
        self.assertEqual((status, complete), (200, True))
        self.assertEqual(body, START + BLOCK + DELTA + STOP)
        self.assertNotIn(b"overloaded", body)
        recs = gw.accounting.ledger.records
        [failed] = [x for x in recs if x.parent_request_id]
        [served] = [x for x in recs if not x.parent_request_id]
        self.assertEqual((failed.attempt, failed.upstream_model, failed.outcome, failed.phase), (1, "c1", "upstream_error", "body"))
        self.assertEqual((served.attempt, served.upstream_model, served.outcome, served.input_tokens), (2, "c2", "completed", 9))
        self.assertEqual(gw.resource.active, set())

    def test_error_first_counts_for_the_breaker(self) -> None:
        """An error-first attempt is a failure of its deployment (like a 529)."""
        gw = routed_gateway(models=CLAUDE, routing={"breaker_failures": 1})
        gw.resource.rng = FixedRng(0.1)
        gw.post("/v1/messages", MSG)
        answer(gw, 0).send(START + ERROR)
        self.assertTrue(gw.resource.breakers.is_open(("ant", "c1")))

    def test_error_first_on_last_attempt_relayed(self) -> None:
        """The last attempt's error-first stream is relayed as before: 200, message_start, the error event."""
        gw = self.gw
        _, transport = gw.post("/v1/messages", MSG)
        answer(gw, 0).send(START + ERROR)
        gw.clock.advance(0)
        r2 = answer(gw, 1)
        r2.send(START + ERROR)
        r2.end()
        gw.clock.advance(0)
        status, _, body, _ = parse_response(transport.value())
        self.assertEqual((status, body), (200, START + ERROR))
        self.assertEqual(len(gw.http.calls), 2)
        final = [x for x in gw.accounting.ledger.records if not x.parent_request_id]
        self.assertEqual([(x.attempt, x.outcome) for x in final], [(2, "upstream_error")])

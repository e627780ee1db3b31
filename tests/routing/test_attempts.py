"""
Retries and fallbacks before the first byte, through the in-memory gateway:
a failed attempt is recorded on its own and the client sees only the
attempt that served it; after the first byte nothing is retried.
"""

from __future__ import annotations

import json

from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import FakeResponse, parse_response
from tests.routing.helpers import CHAT, DONE, E1, USAGE, FixedRng, answer, host, routed_gateway

JSON = {b"content-type": [b"application/json"]}


class FailoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = routed_gateway()
        # The first draw picks a (weight 3 of 4).
        self.gw.resource.rng = FixedRng(0.1)

    def finish_stream(self, r: FakeResponse) -> None:
        r.send(E1)
        r.send(USAGE + DONE)
        r.end()
        self.gw.clock.advance(0)

    def test_retryable_status_fails_over(self) -> None:
        """A 500 before the first byte: its body is dropped, b serves, the client sees one clean stream."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        self.assertEqual(host(gw.http.calls[0]), "a.test")
        self.assertEqual(json.loads(gw.http.calls[0]["data"])["model"], "gpt-4o-a")
        bad = answer(gw, 0, 500, JSON)
        # The failed attempt's connection is closed, its body never read.
        self.assertTrue(bad.transport.stopped)
        self.assertEqual(len(gw.http.calls), 2)
        self.assertEqual(host(gw.http.calls[1]), "b.test")
        self.assertEqual(json.loads(gw.http.calls[1]["data"])["model"], "gpt-4o-b")
        # The retried call carries b's own credential and the same request id.
        self.assertEqual(
            gw.http.calls[1]["headers"].getRawHeaders(b"x-request-id"),
            gw.http.calls[0]["headers"].getRawHeaders(b"x-request-id"),
        )
        self.finish_stream(answer(gw, 1))
        status, _, body, complete = parse_response(transport.value())
        self.assertEqual(status, 200)
        self.assertTrue(complete)
        self.assertEqual(body, E1 + DONE)
        [final] = gw.accounting.exchanges
        self.assertEqual((final.status, final.outcome, final.attempt, final.provider.name, final.upstream_model), (200, "completed", 2, "b", "gpt-4o-b"))
        recs = gw.accounting.ledger.records
        self.assertEqual(len(recs), 2)
        failed = [r for r in recs if r.parent_request_id is not None][0]
        served = [r for r in recs if r.parent_request_id is None][0]
        self.assertEqual(failed.parent_request_id, served.request_id)
        self.assertEqual(failed.request_id, served.request_id + "-1")
        self.assertEqual((failed.attempt, failed.provider, failed.upstream_model, failed.outcome, failed.status, failed.phase), (1, "a", "gpt-4o-a", "upstream_error", 500, "headers"))
        self.assertEqual((served.attempt, served.provider, served.outcome, served.output_tokens), (2, "b", "completed", 1))
        self.assertEqual(gw.resource.active, set())

    def test_connect_failure_fails_over(self) -> None:
        """A refused connection is retried on the other deployment."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        gw.http.calls[0]["deferred"].errback(Failure(ConnectionRefusedError()))
        self.assertEqual(host(gw.http.calls[1]), "b.test")
        self.finish_stream(answer(gw, 1))
        self.assertEqual(parse_response(transport.value())[0], 200)
        [failed] = [r for r in gw.accounting.ledger.records if r.parent_request_id]
        self.assertEqual((failed.status, failed.phase), (502, "connect"))

    def test_headers_timeout_fails_over(self) -> None:
        """No headers within the headers timeout: the next deployment gets its own full timeout."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        t = gw.cfg.timeouts.headers
        gw.clock.advance(t + 1)
        self.assertTrue(gw.http.calls[0]["cancelled"])
        self.assertEqual(len(gw.http.calls), 2)
        # The second attempt is not cut by the first one's clock.
        gw.clock.advance(t - 2)
        self.assertFalse(gw.http.calls[1]["cancelled"])
        self.finish_stream(answer(gw, 1))
        self.assertEqual(parse_response(transport.value())[0], 200)
        [failed] = [r for r in gw.accounting.ledger.records if r.parent_request_id]
        self.assertEqual((failed.status, failed.phase), (504, "headers"))

    def test_deadline_stops_retries(self) -> None:
        """Past [routing] deadline no new attempt starts: the headers timeout's 504 is relayed."""
        gw = routed_gateway(routing={"deadline": 60})
        gw.resource.rng = FixedRng(0.1)
        _, transport = gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(gw.cfg.timeouts.headers + 1)
        gw.clock.advance(0)
        self.assertEqual(len(gw.http.calls), 1)
        self.assertEqual(parse_response(transport.value())[0], 504)
        self.assertEqual([r.parent_request_id for r in gw.accounting.ledger.records], [None])

    def test_body_let_go_once_answered(self) -> None:
        """Once an attempt commits (its first content) no retry can follow: the request body is not held for the rest of the stream."""
        gw = self.gw
        gw.post("/v1/chat/completions", CHAT)
        [relay] = gw.resource.active
        attempts = relay._attempts
        self.assertEqual(len(attempts._bodies), 1)
        r = answer(gw, 0)
        # Gated (another attempt could still follow): the body is kept.
        self.assertEqual(len(attempts._bodies), 1)
        r.send(E1)
        self.assertEqual(attempts._bodies, {})

    def test_no_retry_after_first_byte(self) -> None:
        """A failure after the first event reached the client ends the stream visibly; no second provider."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        r = answer(gw, 0)
        r.send(E1)
        gw.clock.advance(0)
        r.fail()
        gw.clock.advance(0)
        self.assertEqual(len(gw.http.calls), 1)
        status, _, body, _ = parse_response(transport.value())
        self.assertEqual(status, 200)
        self.assertIn(b"error", body.split(E1, 1)[1])
        self.assertNotIn(DONE, body)

    def test_non_retryable_status_relayed(self) -> None:
        """A 400 is the client's problem: relayed as is, never retried."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT)
        r = answer(gw, 0, 400, JSON)
        r.send(b'{"error":{"message":"bad"}}')
        r.end()
        gw.clock.advance(0)
        self.assertEqual(len(gw.http.calls), 1)
        self.assertEqual(parse_response(transport.value())[0], 400)

    def test_budget_and_last_error_relayed(self) -> None:
        """max_attempts bounds the attempts; the last attempt's error is relayed as before."""
        gw = routed_gateway(
            routing={"max_attempts": 2},
            models={
                "gpt-4o": {"provider": "a", "upstream_model": "m-a", "fallbacks": ["f1", "f2"]},
                "f1": {"provider": "b", "upstream_model": "m-b"},
                "f2": {"provider": "b", "upstream_model": "m-c"},
            },
        )
        _, transport = gw.post("/v1/chat/completions", CHAT)
        answer(gw, 0, 503, JSON)
        # The fallback model is tried next.
        self.assertEqual((host(gw.http.calls[1]), json.loads(gw.http.calls[1]["data"])["model"]), ("b.test", "m-b"))
        last = answer(gw, 1, 503, JSON)
        last.send(b'{"error":{"message":"overloaded"}}')
        last.end()
        gw.clock.advance(0)
        self.assertEqual(len(gw.http.calls), 2)
        status, _, body, _ = parse_response(transport.value())
        self.assertEqual(status, 503)
        self.assertIn(b"overloaded", body)
        final = [r for r in gw.accounting.ledger.records if r.parent_request_id is None]
        self.assertEqual([(r.attempt, r.upstream_model, r.outcome, r.model) for r in final], [(2, "m-b", "upstream_error", "gpt-4o")])

    def test_retry_after_skips_deployment(self) -> None:
        """A 429 with retry-after moves the request to b, and later requests skip a for that long (capped)."""
        gw = routed_gateway(routing={"retry_after_cap": 20})
        gw.resource.rng = FixedRng(0.1, 0.1, 0.1)
        gw.post("/v1/chat/completions", CHAT)
        answer(gw, 0, 429, {**JSON, b"retry-after": [b"3600"]})
        self.assertEqual(host(gw.http.calls[1]), "b.test")
        self.finish_stream(answer(gw, 1))
        gw.post("/v1/chat/completions", CHAT)
        self.assertEqual(host(gw.http.calls[2]), "b.test")
        self.finish_stream(answer(gw, 2))
        gw.clock.advance(20)
        gw.post("/v1/chat/completions", CHAT)
        self.assertEqual(host(gw.http.calls[3]), "a.test")

    def test_client_gone_before_retry(self) -> None:
        """A client that left is not retried for: one cancelled record, no second call."""
        gw = self.gw
        channel, _ = gw.post("/v1/chat/completions", CHAT)
        from tests.test_garbage import close

        close(channel)
        gw.clock.advance(0)
        self.assertEqual(len(gw.http.calls), 1)
        [ex] = gw.accounting.exchanges
        self.assertEqual(ex.outcome, "client_cancelled")


class BreakerTests(SynchronousTestCase):
    def test_last_attempt_counts_for_its_breaker(self) -> None:
        """With max_attempts = 1 every failure is the last attempt's, and still opens the breaker."""
        gw = routed_gateway(routing={"max_attempts": 1, "breaker_failures": 2})
        body = {**CHAT, "model": "small"}
        for i in range(2):
            gw.post("/v1/chat/completions", body)
            answer(gw, i, 502, JSON).end()
            gw.clock.advance(0)
        _, transport = gw.post("/v1/chat/completions", body)
        gw.clock.advance(0)
        self.assertEqual(len(gw.http.calls), 2)
        self.assertEqual(parse_response(transport.value())[0], 503)

    def test_reload_keeps_breaker_state(self) -> None:
        """A reload (SIGHUP) takes the new breaker settings and keeps each deployment's open breaker."""
        gw = routed_gateway(routing={"breaker_failures": 1})
        gw.resource.breakers.failed(("b", "small-b"))
        new = routed_gateway(routing={"breaker_failures": 9, "breaker_cooldown": 5}).cfg
        gw.resource.reconfigure(new)
        self.assertEqual((gw.resource.breakers.failures, gw.resource.breakers.cooldown), (9, 5.0))
        self.assertTrue(gw.resource.breakers.is_open(("b", "small-b")))

    def test_anthropic_529_fails_over(self) -> None:
        """An Anthropic 529 (overloaded) fails over too; the 503 of an all-open model is in the Anthropic shape."""
        gw = routed_gateway(
            models={"claude": {"deployments": [{"provider": "ant", "upstream_model": "c1"}, {"provider": "ant", "upstream_model": "c2"}]}}
        )
        gw.resource.rng = FixedRng(0.1)
        body = {"model": "claude", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        _, transport = gw.post("/v1/messages", body)
        answer(gw, 0, 529, JSON)
        self.assertEqual(json.loads(gw.http.calls[1]["data"])["model"], "c2")
        r = answer(gw, 1)
        r.send(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        r.end()
        gw.clock.advance(0)
        self.assertEqual(parse_response(transport.value())[0], 200)
        for _ in range(5):
            gw.resource.breakers.failed(("ant", "c1"))
            gw.resource.breakers.failed(("ant", "c2"))
        _, transport = gw.post("/v1/messages", body)
        gw.clock.advance(0)
        status, _, raw, _ = parse_response(transport.value())
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(raw)["type"], "error")

    def test_all_open_is_503_fast(self) -> None:
        """After 5 failures the only deployment's breaker opens: 503 in dialect with retry-after, no upstream call, a rejected record; a probe after the cool-down."""
        gw = routed_gateway(routing={"breaker_failures": 5, "breaker_cooldown": 30})
        body = {**CHAT, "model": "small"}
        for i in range(5):
            gw.post("/v1/chat/completions", body)
            gw.http.calls[i]["deferred"].errback(Failure(ConnectionRefusedError()))
            gw.clock.advance(0)
        _, transport = gw.post("/v1/chat/completions", body)
        gw.clock.advance(0)
        self.assertEqual(len(gw.http.calls), 5)
        status, headers, raw, _ = parse_response(transport.value())
        self.assertEqual(status, 503)
        self.assertEqual(headers[b"retry-after"], [b"30"])
        self.assertIn("small", json.loads(raw)["error"]["message"])
        last = gw.accounting.ledger.records[-1]
        self.assertEqual((last.outcome, last.status, last.model), ("rejected", 503, "small"))
        gw.clock.advance(30)
        gw.post("/v1/chat/completions", body)
        self.assertEqual(len(gw.http.calls), 6)

    def test_open_deployment_avoided(self) -> None:
        """With a's breaker open, gpt-4o goes to b even when the draw favours a."""
        gw = routed_gateway(routing={"breaker_failures": 2})
        gw.resource.rng = FixedRng(*([0.1] * 10))
        for i in range(2):
            gw.post("/v1/chat/completions", CHAT)
            self.assertEqual(host(gw.http.calls[-1]), "a.test")
            gw.http.calls[-1]["deferred"].errback(Failure(ConnectionRefusedError()))
            answer(gw, -1).end()
            gw.clock.advance(0)
        gw.post("/v1/chat/completions", CHAT)
        self.assertEqual(host(gw.http.calls[-1]), "b.test")


class ObservationTests(SynchronousTestCase):
    """What a request ends with feeds its deployment's observations (llmgate.routing.breaker)."""

    def test_served_attempt_ttft_observed(self) -> None:
        """The served attempt's TTFT, from its own start (not the failed attempt's), reaches its deployment's EWMA."""
        gw = routed_gateway()
        gw.resource.rng = FixedRng(0.1)
        gw.post("/v1/chat/completions", CHAT)
        gw.clock.advance(0.5)
        answer(gw, 0, 500, JSON)
        gw.clock.advance(0.25)
        r = answer(gw, 1)
        r.send(E1)
        gw.clock.advance(1.0)
        r.send(USAGE + DONE)
        r.end()
        gw.clock.advance(0)
        br = gw.resource.breakers
        self.assertAlmostEqual(br.ttft_ewma(("b", "gpt-4o-b")), 0.25)
        self.assertIsNone(br.ttft_ewma(("a", "gpt-4o-a")))
        self.assertEqual(br.error_ratio(("a", "gpt-4o-a")), 1.0)
        self.assertEqual(br.error_ratio(("b", "gpt-4o-b")), 0.0)

    def test_error_answer_is_no_sample(self) -> None:
        """A relayed 400 is no TTFT sample."""
        gw = routed_gateway()
        gw.post("/v1/chat/completions", {**CHAT, "model": "small"})
        gw.clock.advance(0.01)
        answer(gw, 0, 400, JSON).end()
        gw.clock.advance(0)
        self.assertEqual(len(gw.accounting.exchanges), 1)
        self.assertIsNone(gw.resource.breakers.ttft_ewma(("b", "small-b")))

    def test_ratio_settings_reach_breakers(self) -> None:
        """[routing] breaker_failure_ratio/window/min_requests configure the breakers, at start and on reload."""
        gw = routed_gateway(routing={"breaker_failure_ratio": 0.25, "breaker_window": 60, "breaker_min_requests": 4})
        br = gw.resource.breakers
        self.assertEqual((br.failure_ratio, br.window, br.min_requests), (0.25, 60.0, 4))
        self.assertIn(("a", "gpt-4o-a"), br.configured)
        gw.resource.reconfigure(routed_gateway(routing={"breaker_min_requests": 7}).cfg)
        self.assertEqual((br.failure_ratio, br.window, br.min_requests), (0.5, 30.0, 7))

    def test_failure_ratio_opens_through_the_gateway(self) -> None:
        """
        small's b answers ok, 502, ok, 502 (never two failures in a row):
        at 4 requests and 50% failed the ratio breaker opens and the next
        request is a 503 at once, without an upstream call.
        """
        gw = routed_gateway(
            routing={"max_attempts": 1, "breaker_failures": 3, "breaker_failure_ratio": 0.5, "breaker_min_requests": 4}
        )
        body = {**CHAT, "model": "small"}
        for i, code in enumerate((200, 502, 200, 502)):
            gw.post("/v1/chat/completions", body)
            r = answer(gw, i, code, None if code == 200 else JSON)
            if code == 200:
                r.send(E1 + USAGE + DONE)
            r.end()
            gw.clock.advance(0)
        self.assertEqual(gw.resource.breakers.error_ratio(("b", "small-b")), 0.5)
        _, transport = gw.post("/v1/chat/completions", body)
        gw.clock.advance(0)
        self.assertEqual(len(gw.http.calls), 4)
        status, headers, _, _ = parse_response(transport.value())
        self.assertEqual((status, headers[b"retry-after"]), (503, [b"30"]))

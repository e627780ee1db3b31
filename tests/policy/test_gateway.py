"""
Keys, limits and budgets through the gateway (L{GatewayResource} on a
Site, in memory): checked at header time, after the body is parsed, and
settled by each request's usage record.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmgate.policy.keys import KeyRecord, Limits, digest
from tests.fakes import FakeResponse, Gateway, make_config, parse_response

# USD per 1M tokens: 1000 -> $0.001 a token, easy to add up.
PRICES = {"real-model": {"input": 1000.0, "output": 1000.0}}
JSON = {b"content-type": [b"application/json"]}


class Ledger:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def record(self, rec: Any) -> None:
        self.records.append(rec)


def gateway(*records: KeyRecord, spend: bool = True, **doc: Any) -> tuple[Gateway, Ledger]:
    cfg = dataclasses.replace(make_config(prices=PRICES, **doc), key_records=tuple(records))
    gw = Gateway(cfg)
    gw.clock.advance(1893542400.0)
    ledger = Ledger()
    gw.accounting.ledger = ledger
    gw.accounting.prices = __import__("llmgate.accounting.prices", fromlist=["PriceTable"]).PriceTable.from_config(PRICES)
    if spend:
        gw.resource.quotas.load_spend({})
    return gw, ledger


def chat(gw: Gateway, secret: str, model: str = "public-model", path: str = "/v1/chat/completions", header: str = "authorization", **extra: Any) -> Any:
    value = f"Bearer {secret}" if header == "authorization" else secret
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, **extra}
    _, t = gw.post(path, body, headers={header: value})
    return t


def answer(gw: Gateway, call: dict[str, Any], tin: int, tout: int, headers: Optional[dict[bytes, list[bytes]]] = None) -> None:
    r = FakeResponse(200, {**JSON, **(headers or {})})
    call["deferred"].callback(r)
    r.send(json.dumps({
        "id": "c1", "object": "chat.completion", "model": "real-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout},
    }).encode())
    r.end()
    for _ in range(3):
        gw.clock.advance(0)


def response(t: Any) -> tuple[int, dict[bytes, list[bytes]], Any]:
    status, headers, body, _ = parse_response(t.value())
    return status, headers, json.loads(body) if body else None


ALICE = KeyRecord("alice", digest(b"lg-alice"))


class AuthTests(SynchronousTestCase):
    def test_key_file_key_both_headers(self) -> None:
        """A key file key is accepted as Bearer and as x-api-key, and the request is billed to its name."""
        gw, ledger = gateway(ALICE)
        chat(gw, "lg-alice")
        chat(gw, "lg-alice", header="x-api-key")
        self.assertEqual(len(gw.http.calls), 2)
        for call in gw.http.calls:
            answer(gw, call, 1, 1)
        self.assertEqual([r.key_name for r in ledger.records], ["alice", "alice"])

    def test_config_keys_still_work(self) -> None:
        """[keys.NAME] api_key_env keys keep working beside the key file."""
        gw, _ = gateway(ALICE, keys={"legacy": {"api_key_env": "GW_KEY"}})
        chat(gw, "gw-secret")
        self.assertEqual(len(gw.http.calls), 1)

    def test_wrong_key_401_before_body(self) -> None:
        """A wrong key is 401 invalid_api_key in the route's dialect, answered from the headers."""
        gw, _ = gateway(ALICE)
        t = chat(gw, "lg-bob")
        status, _, doc = response(t)
        self.assertEqual((status, doc["error"]["code"]), (401, "invalid_api_key"))
        t = chat(gw, "lg-bob", path="/v1/messages", header="x-api-key")
        status, _, doc = response(t)
        self.assertEqual((status, doc["error"]["type"]), (401, "authentication_error"))
        self.assertEqual(gw.http.calls, [])

    def test_expired_key(self) -> None:
        """An expired key is 401 with a message saying it expired (and when)."""
        gw, _ = gateway(dataclasses.replace(ALICE, expires=1893542400.0 - 1))
        status, _, doc = response(chat(gw, "lg-alice"))
        self.assertEqual(status, 401)
        self.assertIn("expired at 2030-01-01T23:59:59Z", doc["error"]["message"])
        self.assertEqual(gw.http.calls, [])

    def test_forbidden_model_403(self) -> None:
        """A model the key may not use is 403 permission_error in dialect, recorded, not sent upstream."""
        gw, ledger = gateway(dataclasses.replace(ALICE, models=("gpt-*",)))
        status, _, doc = response(chat(gw, "lg-alice"))
        self.assertEqual((status, doc["error"]["type"], doc["error"]["code"]), (403, "permission_error", "permission_error"))
        status, _, doc = response(chat(gw, "lg-alice", path="/v1/messages", model="claude-x"))
        self.assertEqual((status, doc["error"]["type"]), (403, "permission_error"))
        self.assertEqual(gw.http.calls, [])
        self.assertEqual([(r.status, r.outcome, r.key_name) for r in ledger.records], [(403, "rejected", "alice")] * 2)
        chat(gw, "lg-alice", model="gpt-4o")
        self.assertEqual(len(gw.http.calls), 1)

    def test_revoked_by_reload(self) -> None:
        """After a reload without the key, new requests are 401; the one in flight finishes and settles."""
        key = dataclasses.replace(ALICE, limits=Limits(concurrency=5))
        gw, ledger = gateway(key)
        t = chat(gw, "lg-alice")
        other = KeyRecord("other", digest(b"lg-other"))
        gw.resource.reconfigure(dataclasses.replace(gw.cfg, key_records=(other,)))
        self.assertEqual(response(chat(gw, "lg-alice"))[0], 401)
        answer(gw, gw.http.calls[0], 3, 4)
        self.assertEqual(response(t)[0], 200)
        self.assertEqual(gw.resource.quotas.held, 0)
        self.assertEqual(gw.resource.quotas.state.scopes["alice"].active, 0)


    def test_revoked_while_body_arrives(self) -> None:
        """A key revoked by a reload after its headers were checked is 401 once its body is in."""
        gw, ledger = gateway(ALICE)
        channel, t = gw.connect()
        body = json.dumps({"model": "public-model", "messages": []}).encode()
        channel.dataReceived(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer lg-alice\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5]
        )
        gw.resource.reconfigure(dataclasses.replace(gw.cfg, key_records=(KeyRecord("other", digest(b"lg-other")),)))
        channel.dataReceived(body[5:])
        gw.clock.advance(0)
        self.assertEqual(response(t)[0], 401)
        self.assertEqual(gw.http.calls, [])
        self.assertEqual([r.status for r in ledger.records], [401])

    def test_reload_keeps_spend(self) -> None:
        """A reload (the same key, new limits) keeps the key's spend and its rate state."""
        key = dataclasses.replace(ALICE, budget_usd=0.05, period="day", limits=Limits(rpm=10))
        gw, _ = gateway(key)
        chat(gw, "lg-alice")
        answer(gw, gw.http.calls[0], 10, 10)
        gw.resource.reconfigure(dataclasses.replace(gw.cfg, key_records=(dataclasses.replace(key, limits=Limits(rpm=20)),)))
        self.assertAlmostEqual(gw.resource.quotas.state.spend["alice"].spent["day"], 0.02)
        status, headers, _ = response(chat(gw, "lg-alice"))
        self.assertEqual(status, 429)  # 0.02 spent + ~0.033 estimated > 0.05
        self.assertEqual(headers[b"x-ratelimit-remaining-requests"], [b"19"])


class LimitTests(SynchronousTestCase):
    def test_rpm_429_openai_headers(self) -> None:
        """Over its rpm a key gets 429 rate_limit_exceeded with retry-after and the x-ratelimit-* headers."""
        gw, ledger = gateway(dataclasses.replace(ALICE, limits=Limits(rpm=1, tpm=10000)))
        ok = chat(gw, "lg-alice")
        status, headers, doc = response(chat(gw, "lg-alice"))
        self.assertEqual((status, doc["error"]["code"], doc["error"]["type"]), (429, "rate_limit_exceeded", "rate_limit_exceeded"))
        self.assertEqual(headers[b"retry-after"], [b"60"])
        self.assertEqual(headers[b"x-ratelimit-limit-requests"], [b"1"])
        self.assertEqual(headers[b"x-ratelimit-remaining-requests"], [b"0"])
        self.assertEqual(headers[b"x-ratelimit-reset-requests"], [b"1m0s"])
        self.assertEqual(headers[b"x-ratelimit-limit-tokens"], [b"10000"])
        self.assertNotIn(b"x-should-retry", headers)
        self.assertEqual(len(gw.http.calls), 1)
        self.assertEqual(ledger.records[-1].status, 429)
        # The admitted one carries its remaining quota, not the provider's headers.
        answer(gw, gw.http.calls[0], 5, 5, headers={b"x-ratelimit-remaining-requests": [b"4999"]})
        status, headers, _ = response(ok)
        self.assertEqual((status, headers[b"x-ratelimit-remaining-requests"]), (200, [b"0"]))

    def test_anthropic_429(self) -> None:
        """On /v1/messages the 429 is rate_limit_error with anthropic-ratelimit-* headers."""
        gw, _ = gateway(dataclasses.replace(ALICE, limits=Limits(rpm=1)))
        chat(gw, "lg-alice", path="/v1/messages", model="claude-x")
        status, headers, doc = response(chat(gw, "lg-alice", path="/v1/messages", model="claude-x"))
        self.assertEqual((status, doc["error"]["type"]), (429, "rate_limit_error"))
        self.assertEqual(headers[b"anthropic-ratelimit-requests-limit"], [b"1"])
        self.assertEqual(headers[b"anthropic-ratelimit-requests-remaining"], [b"0"])
        self.assertEqual(headers[b"anthropic-ratelimit-requests-reset"], [b"2030-01-02T00:01:00Z"])
        self.assertIn(b"retry-after", headers)

    def test_budget_exhausted_no_retry(self) -> None:
        """A spent budget is 429 insufficient_quota with x-should-retry: false."""
        gw, _ = gateway(dataclasses.replace(ALICE, budget_usd=0.01, period="day"))
        status, headers, doc = response(chat(gw, "lg-alice", max_tokens=100))
        self.assertEqual((status, doc["error"]["code"]), (429, "insufficient_quota"))
        self.assertEqual(headers[b"x-should-retry"], [b"false"])
        self.assertEqual(gw.http.calls, [])

    def test_settled_from_ledger_record(self) -> None:
        """The budget is charged the cost on the request's ledger record, not its estimate."""
        gw, ledger = gateway(dataclasses.replace(ALICE, budget_usd=5.0, period="month"))
        chat(gw, "lg-alice", max_tokens=1000)
        answer(gw, gw.http.calls[0], 7, 13)
        (rec,) = ledger.records
        self.assertAlmostEqual(rec.cost_usd, 0.02)
        spend = gw.resource.quotas.state.spend["alice"]
        self.assertAlmostEqual(spend.spent["month"], 0.02)
        self.assertAlmostEqual(spend.reserved, 0.0)

    def test_cancelled_request_settles(self) -> None:
        """A request whose client leaves is settled too: its slot is freed."""
        gw, _ = gateway(dataclasses.replace(ALICE, limits=Limits(concurrency=1)))
        channel, _ = gw.post("/v1/chat/completions", {"model": "public-model", "messages": []}, headers={"authorization": "Bearer lg-alice"})
        self.assertEqual(gw.resource.quotas.state.scopes["alice"].active, 1)
        channel.connectionLost(Failure(ConnectionDone()))
        for _ in range(5):
            gw.clock.advance(0)
        self.assertEqual(gw.resource.quotas.held, 0)
        self.assertEqual(gw.resource.quotas.state.scopes["alice"].active, 0)


class OvershootTests(SynchronousTestCase):
    """
    The bound: spend (tokens) can pass the budget (tpm) only by the
    estimate errors of the requests admitted concurrently.
    """

    N = 200
    ERROR = 5  # tokens each request uses beyond its estimate

    def run_burst(self, key: KeyRecord) -> tuple[Gateway, Ledger, list[Any]]:
        gw, ledger = gateway(key)
        # A model sent upstream as named: the body is relayed as it came.
        ts = [chat(gw, "lg-alice", model="real-model") for _ in range(self.N)]
        gw.clock.advance(0)
        body = json.dumps({"model": "real-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}).encode()
        est_in = -(-len(body) // 4)
        for call in list(gw.http.calls):
            # Every admitted request underestimated: ERROR more input tokens.
            answer(gw, call, est_in + self.ERROR, 10)
        return gw, ledger, ts

    def test_budget_overshoot_bound(self) -> None:
        """200 concurrent requests against a $0.5 budget: spend <= budget + admitted * error."""
        gw, ledger, ts = self.run_burst(dataclasses.replace(ALICE, budget_usd=0.5, period="total"))
        admitted = len(gw.http.calls)
        statuses = [response(t)[0] for t in ts]
        self.assertEqual(statuses.count(200), admitted)
        self.assertEqual(statuses.count(429), self.N - admitted)
        self.assertGreater(admitted, 1)
        spent = sum(r.cost_usd or 0 for r in ledger.records)
        self.assertAlmostEqual(spent, gw.resource.quotas.state.spend["alice"].spent["total"])
        per_request = spent / admitted
        self.assertLessEqual(spent, 0.5 + admitted * self.ERROR * 0.001 + 1e-9)
        # And the budget was used, not refused early: one more would not fit.
        self.assertGreater(spent + per_request, 0.5)

    def test_tpm_overshoot_bound(self) -> None:
        """200 concurrent requests against 1000 tpm (clock stopped): tokens <= tpm + admitted * error."""
        gw, ledger, ts = self.run_burst(dataclasses.replace(ALICE, limits=Limits(tpm=1000)))
        admitted = len(gw.http.calls)
        self.assertGreater(admitted, 1)
        used = sum(r.input_tokens + r.output_tokens for r in ledger.records if r.input_tokens is not None)
        self.assertLessEqual(used, 1000 + admitted * self.ERROR)
        self.assertGreater(used + used // admitted, 1000)
        self.assertEqual([response(t)[0] for t in ts].count(429), self.N - admitted)


class GarbageTests(SynchronousTestCase):
    """Keys, limits and budgets add no cyclic garbage per request."""

    def test_no_cycles(self) -> None:
        """Admitted and settled, refused 429 (rate and budget), refused 403: gc finds nothing to free."""
        from tests.test_garbage import close, cyclic_garbage

        limited = dataclasses.replace(ALICE, models=("public-*",), limits=Limits(rpm=1000, tpm=10**6, concurrency=3), budget_usd=1e6)
        broke = KeyRecord("broke", digest(b"lg-broke"), budget_usd=0.0)
        slow = KeyRecord("slow", digest(b"lg-slow"), limits=Limits(rpm=1))
        gw, ledger = gateway(limited, broke, slow)

        def scenario() -> None:
            for secret, model in (("lg-alice", "public-model"), ("lg-broke", "public-model"),
                                  ("lg-slow", "public-model"), ("lg-slow", "public-model"), ("lg-alice", "gpt-x")):
                channel, t = gw.post("/v1/chat/completions", {"model": model, "messages": [], "max_tokens": 5},
                                     headers={"authorization": f"Bearer {secret}"})
                for call in gw.http.calls:
                    answer(gw, call, 1, 1)
                gw.http.calls.clear()
                close(channel)
            for _ in range(3):
                gw.clock.advance(0)
            gw.accounting.exchanges.clear()
            ledger.records.clear()

        scenario()
        found = cyclic_garbage(scenario)
        self.assertEqual(found, {}, f"cyclic garbage: {dict(found)}")
        self.assertEqual(gw.resource.quotas.held, 0)


class ConfigTests(SynchronousTestCase):
    def test_keys_settings(self) -> None:
        """[keys] file and default_output_tokens are settings, not keys; the default is what a request without max_tokens reserves."""
        cfg = make_config(keys={"file": "k.json", "default_output_tokens": 100, "legacy": {"api_key_env": "GW_KEY"}})
        self.assertEqual((cfg.key_file, cfg.default_output_tokens, [k.name for k in cfg.keys]), ("k.json", 100, ["legacy"]))
        gw, _ = gateway(dataclasses.replace(ALICE, limits=Limits(tpm=1000)), keys={"default_output_tokens": 100})
        chat(gw, "lg-alice", max_tokens=None)
        (call,) = gw.http.calls
        size = len(call["data"]) if "data" in call else None
        remaining = gw.resource.quotas.state.scopes["alice"].tokens.level
        self.assertEqual(1000 - remaining, -(-size // 4) + 100)

    def test_bad_default_output(self) -> None:
        """A default_output_tokens that is not a positive integer is a config error."""
        from llmgate.config import ConfigError

        self.assertRaises(ConfigError, make_config, keys={"default_output_tokens": 0})


class DeferredState:
    """A shared state in memory that answers each reserve when the test says (as Redis would, later)."""

    def __init__(self) -> None:
        from llmgate.policy.limits import MemoryState

        self.mem = MemoryState()
        self.pending: list[tuple[Any, Any]] = []

    def reserve(self, *a: Any) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[Any] = Deferred()
        self.pending.append((d, a))
        return d

    def answer(self, unavailable: bool = False) -> None:
        from llmgate.policy.limits import Refusal

        d, a = self.pending.pop(0)
        d.callback((Refusal("unavailable", 1.0, "the gateway's limit store is unavailable; retry shortly"), None)
                   if unavailable else self.mem.reserve(*a))

    def settle(self, *a: Any) -> None:
        self.mem.settle(*a)

    def load_spend(self, *a: Any) -> None:
        self.mem.load_spend(*a)

    def quota(self, *a: Any) -> Any:
        return self.mem.quota(*a)


def shared_gateway(*records: KeyRecord) -> tuple[Gateway, Ledger, DeferredState]:
    from llmgate.policy.limits import Quotas

    gw, ledger = gateway(*records, spend=False)
    state = DeferredState()
    gw.resource.quotas = Quotas(gw.clock, state)
    gw.resource.accounting.on_settle = gw.resource.quotas.settle
    gw.resource.quotas.load_spend({})
    return gw, ledger, state


LIMITED = KeyRecord("lim", digest(b"lg-lim"), limits=Limits(rpm=5, concurrency=1))


class SharedStateTests(SynchronousTestCase):
    def test_waits_for_the_shared_state(self) -> None:
        """With a shared state the request goes upstream only once its reservation is answered, and its record settles it."""
        gw, ledger, state = shared_gateway(LIMITED)
        t = chat(gw, "lg-lim")
        gw.clock.advance(0)
        self.assertEqual(len(gw.http.calls), 0)
        state.answer()
        self.assertEqual(len(gw.http.calls), 1)
        answer(gw, gw.http.calls[0], 3, 4)
        status, headers, _ = response(t)
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"x-ratelimit-remaining-requests"], [b"4"])
        self.assertEqual(state.mem.scopes["lim"].active, 0)
        self.assertEqual([r.outcome for r in ledger.records if r.outcome != "open"], ["completed"])

    def test_unavailable_is_503_in_dialect(self) -> None:
        """A shared state that cannot answer (fail_closed) is 503 with retry-after, in the route's dialect, recorded once."""
        gw, ledger, state = shared_gateway(LIMITED)
        _, t = gw.post("/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": []},
                       headers={"x-api-key": "lg-lim"})
        state.answer(unavailable=True)
        gw.clock.advance(0)
        status, headers, body = response(t)
        self.assertEqual(status, 503)
        self.assertEqual(headers[b"retry-after"], [b"1"])
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "overloaded_error")
        self.assertIn("limit store is unavailable", body["error"]["message"])
        self.assertEqual(len(gw.http.calls), 0)
        self.assertEqual([(r.status, r.outcome) for r in ledger.records], [(503, "rejected")])

    def test_client_gone_before_answer_releases(self) -> None:
        """A client that leaves while the reservation is made: the reservation is given back, nothing goes upstream, one record."""
        gw, ledger, state = shared_gateway(LIMITED)
        channel, _ = gw.post("/v1/chat/completions", {"model": "public-model", "messages": [], "max_tokens": 10},
                             headers={"authorization": "Bearer lg-lim", "x-request-id": "client-trace-7"})
        channel.connectionLost(Failure(ConnectionDone()))
        state.answer()
        gw.clock.advance(0)
        self.assertEqual(len(gw.http.calls), 0)
        self.assertEqual(state.mem.scopes["lim"].active, 0)
        self.assertEqual([r.outcome for r in ledger.records], ["client_cancelled"])
        # The record names the request as every other record does.
        self.assertEqual(ledger.records[0].client_request_id, "client-trace-7")


class SharedGarbageTests(SynchronousTestCase):
    def test_no_cycles_with_a_shared_state(self) -> None:
        """Admission through a shared state's Deferred (admitted, refused 503, client gone meanwhile) leaves no cyclic garbage."""
        from tests.test_garbage import close, cyclic_garbage

        gw, ledger, state = shared_gateway(LIMITED)

        def scenario() -> None:
            for mode in ("ok", "unavailable", "gone"):
                channel, _ = gw.post("/v1/chat/completions", {"model": "public-model", "messages": [], "max_tokens": 5},
                                     headers={"authorization": "Bearer lg-lim"})
                if mode == "gone":
                    close(channel)
                state.answer(unavailable=mode == "unavailable")
                for call in gw.http.calls:
                    answer(gw, call, 1, 1)
                gw.http.calls.clear()
                close(channel)
            for _ in range(3):
                gw.clock.advance(0)
            gw.accounting.exchanges.clear()
            ledger.records.clear()

        scenario()
        found = cyclic_garbage(scenario)
        self.assertEqual(found, {}, f"cyclic garbage: {dict(found)}")
        self.assertEqual(gw.resource.quotas.held, 0)
        self.assertEqual(state.mem.scopes["lim"].active, 0)


def _sample(gw: Gateway, name: str, **labels: str) -> Optional[float]:
    return gw.accounting.metrics.registry.get_sample_value(name, labels)


def metered(*records: KeyRecord, **kw: Any) -> tuple[Gateway, Ledger]:
    """A gateway whose accounting has metrics, labelled by the records' names."""
    from llmgate.ops.metrics import Metrics

    gw, ledger = gateway(*records, **kw)
    gw.accounting.metrics = Metrics(keys=[r.name for r in records])
    return gw, ledger


class RejectionMetricTests(SynchronousTestCase):
    def test_invalid_and_expired(self) -> None:
        """A wrong key counts as key "none" reason invalid_key (never the secret); an expired one under its name."""
        gw, _ = metered(dataclasses.replace(ALICE, expires=1893542400.0 - 1))
        chat(gw, "lg-bob-secret")
        chat(gw, "lg-alice")
        self.assertEqual(_sample(gw, "llmgate_rejections_total", key="none", reason="invalid_key"), 1.0)
        self.assertEqual(_sample(gw, "llmgate_rejections_total", key="alice", reason="expired"), 1.0)
        exposed = __import__("prometheus_client").generate_latest(gw.accounting.metrics.registry)
        self.assertNotIn(b"lg-bob-secret", exposed)

    def test_model_not_allowed(self) -> None:
        """A model the key may not use counts as model_not_allowed under the key's name."""
        gw, _ = metered(dataclasses.replace(ALICE, models=("gpt-*",)))
        chat(gw, "lg-alice")
        self.assertEqual(_sample(gw, "llmgate_rejections_total", key="alice", reason="model_not_allowed"), 1.0)

    def test_rpm_tpm_concurrency_budget(self) -> None:
        """Each limit's refusal counts under its own reason."""
        gw, _ = metered(
            dataclasses.replace(ALICE, limits=Limits(rpm=1)),
            KeyRecord("bob", digest(b"lg-bob"), limits=Limits(tpm=50)),
            KeyRecord("carol", digest(b"lg-carol"), limits=Limits(concurrency=1)),
            KeyRecord("dave", digest(b"lg-dave"), budget_usd=0.01, period="day"),
        )
        chat(gw, "lg-alice")
        chat(gw, "lg-alice")
        chat(gw, "lg-bob", max_tokens=30)
        chat(gw, "lg-bob", max_tokens=30)
        chat(gw, "lg-carol")
        chat(gw, "lg-carol")
        chat(gw, "lg-dave", max_tokens=100)
        got = {k: _sample(gw, "llmgate_rejections_total", key=k, reason=r)
               for k, r in (("alice", "rpm"), ("bob", "tpm"), ("carol", "concurrency"), ("dave", "budget"))}
        self.assertEqual(got, {"alice": 1.0, "bob": 1.0, "carol": 1.0, "dave": 1.0})


class BudgetGaugeTests(SynchronousTestCase):
    def test_remaining_after_settle(self) -> None:
        """llmgate_budget_remaining_usd{key} is the budget less the period's settled spend, once a request settles."""
        gw, _ = metered(dataclasses.replace(ALICE, budget_usd=5.0, period="month"), KeyRecord("bob", digest(b"lg-bob")))
        gw.resource.quotas.state.load_spend(gw.clock.seconds(), {"alice": {"day": 0.5, "month": 1.0, "total": 3.0}})
        chat(gw, "lg-alice", max_tokens=1000)
        answer(gw, gw.http.calls[0], 7, 13)  # $0.02
        self.assertAlmostEqual(_sample(gw, "llmgate_budget_remaining_usd", key="alice"), 5.0 - 1.0 - 0.02)
        chat(gw, "lg-bob")
        answer(gw, gw.http.calls[1], 1, 1)
        self.assertIsNone(_sample(gw, "llmgate_budget_remaining_usd", key="bob"))

"""
Deployment tags: a request's C{x-llmgate-tags} header keeps only the
deployments carrying all its tags, its fallbacks' too; a bad header or no
deployment left is a 400 in the client's dialect, recorded once.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from llmgate.config import Deployment
from llmgate.routing import balance
from tests.fakes import FakeResponse, make_config, parse_response
from tests.routing.helpers import CHAT, FixedRng, host, routed_gateway

JSON = {b"content-type": [b"application/json"]}

MODELS = {
    "gpt-4o": {
        "deployments": [
            {"provider": "a", "upstream_model": "gpt-4o-a", "weight": 3, "tags": ["us", "cheap"]},
            {"provider": "b", "upstream_model": "gpt-4o-b", "tags": ["eu"]},
        ],
        "fallbacks": ["small"],
    },
    "small": {
        "deployments": [
            {"provider": "a", "upstream_model": "small-a"},
            {"provider": "b", "upstream_model": "small-b", "tags": ["eu", "cheap"]},
        ]
    },
    "claude": {"provider": "ant", "upstream_model": "c1", "tags": ["us"]},
}


class RequestTagsTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """Comma-separated, spaces trimmed, duplicates once, several header lines joined; none or empty: no tags."""
        self.assertEqual(balance.request_tags([b" eu , cheap,eu"]), ("eu", "cheap"))
        self.assertEqual(balance.request_tags([b"eu", b"cheap"]), ("eu", "cheap"))
        self.assertEqual(balance.request_tags(None), ())
        self.assertEqual(balance.request_tags([b"  "]), ())

    def test_bounds(self) -> None:
        """Too long, too many, an empty item, or a character outside the tag alphabet: ValueError naming the header."""
        for raw, message in [
            (b"a" * 257, "at most 256 bytes"),
            (b",".join(b"t%d" % i for i in range(9)), "at most 8 tags"),
            (b"eu,,cheap", "'' is not a tag"),
            (b"eu;cheap", "'eu;cheap' is not a tag"),
            (b"\xc3\xa9u", "is not a tag"),
            (b"e\x01u", "a tag with control characters is not a tag"),
        ]:
            with self.assertRaises(ValueError, msg=raw) as e:
                balance.request_tags([raw])
            self.assertIn(message, str(e.exception))
            self.assertTrue(str(e.exception).startswith("x-llmgate-tags: "))

    def test_plan_filters_every_group(self) -> None:
        """plan keeps, in the model's group and each fallback's, the deployments with all the tags; [] when none."""
        cfg = make_config(
            providers={"a": {"kind": "openai", "base_url": "http://a.test/v1"}, "b": {"kind": "openai", "base_url": "http://b.test/v1"},
                       "ant": {"kind": "anthropic", "base_url": "http://ant.test"}},
            models=MODELS,
        )
        self.assertEqual(
            balance.plan(cfg, "openai", "gpt-4o", ("eu",)),
            [(Deployment("b", "gpt-4o-b", 1.0, ("eu",)),), (Deployment("b", "small-b", 1.0, ("eu", "cheap")),)],
        )
        self.assertEqual(
            balance.plan(cfg, "openai", "gpt-4o", ("cheap", "us")), [(Deployment("a", "gpt-4o-a", 3.0, ("us", "cheap")),)]
        )
        self.assertEqual(balance.plan(cfg, "openai", "gpt-4o", ("eu", "us")), [])
        self.assertEqual(len(balance.plan(cfg, "openai", "gpt-4o", ())), 2)


class TaggedRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = routed_gateway(models=MODELS)

    def test_tag_steers_against_the_draw(self) -> None:
        """x-llmgate-tags: eu sends gpt-4o to b though the draw favours a; the header is not forwarded."""
        gw = self.gw
        gw.resource.rng = FixedRng(0.1)
        gw.post("/v1/chat/completions", CHAT, headers={"x-llmgate-tags": "eu"})
        self.assertEqual(host(gw.http.calls[0]), "b.test")
        self.assertIsNone(gw.http.calls[0]["headers"].getRawHeaders(b"x-llmgate-tags"))
        gw.resource.rng = FixedRng(0.1)
        gw.post("/v1/chat/completions", CHAT)
        self.assertEqual(host(gw.http.calls[1]), "a.test")

    def test_fallback_filtered_too(self) -> None:
        """With eu required, gpt-4o's eu deployment failing falls back to small's eu deployment, not its untagged one."""
        gw = self.gw
        gw.resource.rng = FixedRng(0.0, 0.0)
        gw.post("/v1/chat/completions", CHAT, headers={"x-llmgate-tags": "eu"})
        gw.http.calls[0]["deferred"].callback(FakeResponse(500, JSON))
        self.assertEqual(len(gw.http.calls), 2)
        self.assertEqual(host(gw.http.calls[1]), "b.test")
        self.assertEqual(json.loads(gw.http.calls[1]["data"])["model"], "small-b")

    def test_no_deployment_left_is_400(self) -> None:
        """Tags no deployment carries: 400 in the OpenAI shape naming the model and tags, no upstream call, one rejected record."""
        gw = self.gw
        _, transport = gw.post("/v1/chat/completions", CHAT, headers={"x-llmgate-tags": "eu,us"})
        gw.clock.advance(0)
        status, _, raw, _ = parse_response(transport.value())
        self.assertEqual(status, 400)
        err = json.loads(raw)["error"]
        self.assertEqual(err["type"], "invalid_request_error")
        self.assertIn("'gpt-4o'", err["message"])
        self.assertIn("eu, us", err["message"])
        self.assertEqual(gw.http.calls, [])
        [rec] = gw.accounting.ledger.records
        self.assertEqual((rec.outcome, rec.status, rec.model), ("rejected", 400, "gpt-4o"))

    def test_bad_header_is_400_in_dialect(self) -> None:
        """A malformed x-llmgate-tags on the Anthropic route: 400 in the Anthropic shape, recorded once."""
        gw = self.gw
        body = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        _, transport = gw.post("/v1/messages", body, headers={"x-llmgate-tags": ",".join(f"t{i}" for i in range(9))})
        gw.clock.advance(0)
        status, _, raw, _ = parse_response(transport.value())
        self.assertEqual(status, 400)
        doc = json.loads(raw)
        self.assertEqual((doc["type"], doc["error"]["type"]), ("error", "invalid_request_error"))
        self.assertIn("x-llmgate-tags: at most 8 tags", doc["error"]["message"])
        self.assertEqual(gw.http.calls, [])
        [rec] = gw.accounting.ledger.records
        self.assertEqual((rec.outcome, rec.status), ("rejected", 400))
        # A good header on the same route is served.
        gw.post("/v1/messages", body, headers={"x-llmgate-tags": "us"})
        self.assertEqual(host(gw.http.calls[0]), "ant.test")

    def test_default_provider_names_carry_no_tags(self) -> None:
        """A model name only a default provider serves has no tags: requiring one is a 400."""
        from tests.fakes import Gateway

        # routed_gateway's providers are no defaults; the stock config's are.
        gw = Gateway(make_config())
        _, transport = gw.post("/v1/chat/completions", {**CHAT, "model": "anything"}, headers={"x-llmgate-tags": "eu"})
        gw.clock.advance(0)
        self.assertEqual(parse_response(transport.value())[0], 400)
        self.assertEqual(gw.http.calls, [])

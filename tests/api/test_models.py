# -*- test-case-name: tests.api.test_models -*-
"""
C{GET /v1/models}: the configured models this caller can be served --
whose provider exists and which its gateway key may use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from llmgate.policy.keys import KeyRecord
from tests.fakes import Gateway, make_config, parse_response

MODELS = {
    "public-model": {"provider": "oai", "upstream_model": "real-model"},
    "gpt-4o-team": {"provider": "oai", "upstream_model": "gpt-4o"},
    "claude-team": {"provider": "ant", "upstream_model": "claude-sonnet-4-5"},
}


def _get(gw: Gateway, path: str = "/v1/models", key: Optional[str] = None) -> tuple[int, Any]:
    channel, transport = gw.connect()
    head = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
    if key is not None:
        head += f"Authorization: Bearer {key}\r\n"
    channel.dataReceived(head.encode() + b"\r\n")
    gw.clock.advance(0)
    status, _, body, _ = parse_response(transport.value())
    return status, json.loads(body)


class ModelsTests(SynchronousTestCase):
    def test_lists_configured_models(self) -> None:
        """Without keys, every configured model is listed, in the OpenAI list shape, with its provider."""
        gw = Gateway(make_config(models=MODELS))
        status, doc = _get(gw)
        self.assertEqual(status, 200)
        self.assertEqual(doc["object"], "list")
        self.assertEqual(
            [(m["id"], m["owned_by"], m["object"]) for m in doc["data"]],
            [("claude-team", "ant", "model"), ("gpt-4o-team", "oai", "model"), ("public-model", "oai", "model")],
        )

    def test_key_sees_only_its_models(self) -> None:
        """A key limited to some models (key file `models`) lists only those; another key sees all."""
        cfg = make_config(models=MODELS)
        records = (
            KeyRecord("alice", hashlib.sha256(b"alice-secret").digest(), models=("gpt-4o*",)),
            KeyRecord("bob", hashlib.sha256(b"bob-secret").digest()),
        )
        gw = Gateway(dataclasses.replace(cfg, key_records=records))
        status, doc = _get(gw, key="alice-secret")
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in doc["data"]], ["gpt-4o-team"])
        status, doc = _get(gw, key="bob-secret")
        self.assertEqual([m["id"] for m in doc["data"]], ["claude-team", "gpt-4o-team", "public-model"])
        status, doc = _get(gw, key="wrong")
        self.assertEqual(status, 401)

    def test_model_without_provider_not_listed(self) -> None:
        """A model whose provider is not configured (cannot be served) is left out."""
        cfg = make_config(models=MODELS)
        models = dict(cfg.models)
        # The config file's checks refuse this; a Config built in code may not.
        models["orphan"] = dataclasses.replace(models["public-model"], provider="gone")
        gw = Gateway(dataclasses.replace(cfg, models=models))
        _, doc = _get(gw)
        self.assertNotIn("orphan", [m["id"] for m in doc["data"]])
        self.assertEqual(len(doc["data"]), 3)

# -*- test-case-name: tests.e2e.test_accounting -*-
"""
End to end accounting: real twistd processes (gateway with a ledger, mock
provider) on 127.0.0.1, driven by the official openai SDK; the ledger file
is read back as C{llmgate usage} reads it.
"""

from __future__ import annotations

import time
from typing import Any

import openai
from twisted.trial.unittest import SynchronousTestCase

from llmgate.accounting.ledger import read_records
from tests.e2e.procs import MockStack, get_json, shared

UPSTREAM_KEY = "sk-e2e-accounting-secret"


def shared_stack() -> MockStack:
    """The module's mock provider and gateway with a ledger (see L{shared})."""
    return shared("accounting", lambda: MockStack("llmgate-e2e-acct-", UPSTREAM_KEY))


def final_records(path: str, model: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
    """The final records (not open rows) of C{model}, once there are C{count}."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            recs = [r for r in read_records(path) if r["model"] == model and r["outcome"] != "open"]
        except FileNotFoundError:
            recs = []
        if len(recs) >= count or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


class AccountingE2ETests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stack = shared_stack()
        self.oai = openai.OpenAI(base_url=self.stack.gw.url("/v1"), api_key="client-key", max_retries=0, timeout=20)

    def test_sdk_close_after_done_is_completed(self) -> None:
        """
        The openai SDK closes its connection once it read C{[DONE]}; the
        provider ends its body 300 ms later. Every run is recorded
        completed with the reported usage, and the mock saw each of its
        streams closed before its end (the race was run, not avoided).
        """
        runs = 6
        model = "linger-model"
        before = get_json(self.stack.mock.url("/mock/stats"))["streams_cancelled"]
        for _ in range(runs):
            stream = self.oai.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_headers={"x-mock-tokens": "7", "x-mock-linger-ms": "300"},
            )
            chunks = list(stream)
            # The usage the gateway asked for is not relayed.
            self.assertTrue(all(c.usage is None for c in chunks))
            self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")
        recs = final_records(self.stack.ledger, model, runs)
        self.assertEqual(
            [(r["outcome"], r["phase"], r["source"], r["output_tokens"]) for r in recs],
            [("completed", None, "reported", 7)] * runs,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            cancelled = get_json(self.stack.mock.url("/mock/stats"))["streams_cancelled"] - before
            if cancelled >= runs:
                break
            time.sleep(0.05)
        self.assertEqual(cancelled, runs)

    def test_served_model_recorded_and_logged(self) -> None:
        """
        A response naming another model than the one asked for (a router)
        records both, streamed or not, and the access log line shows both.
        """
        served = "gpt-4o-mini-2024-07-18"
        stream = self.oai.chat.completions.create(
            model="router-stream",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-mock-tokens": "3", "x-mock-served-model": served},
        )
        self.assertEqual({c.model for c in stream}, {served})
        reply = self.oai.chat.completions.create(
            model="router-json",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-tokens": "3", "x-mock-served-model": served},
        )
        self.assertEqual(reply.model, served)
        for model in ("router-stream", "router-json"):
            [rec] = final_records(self.stack.ledger, model)
            self.assertEqual((rec["model"], rec["upstream_model"], rec["served_model"]), (model, model, served))
            # Priced by the served model; the requested name has no price.
            self.assertIsNotNone(rec["cost_usd"])
            self.stack.gw.wait_for(rf"model={model} provider=mock served={served} ", timeout=5)

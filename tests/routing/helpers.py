"""Shared doubles for the routing tests: a gateway with two providers."""

from __future__ import annotations

from typing import Any

from tests.fakes import SSE_HEADERS, FakeResponse, Gateway, make_config

CHAT = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
E1 = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
DONE = b"data: [DONE]\n\n"


class FixedRng:
    """An RNG whose draws the test gives (then 0.0 forever)."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0) if self.values else 0.0


class FakeLedger:
    """Keeps the records the accounting hands it (final and per-attempt)."""

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.opened: list[Any] = []

    def open(self, rec: Any) -> None:
        self.opened.append(rec)

    def record(self, rec: Any) -> None:
        self.records.append(rec)


def routed_gateway(routing: Any = None, models: Any = None) -> Gateway:
    """
    Providers C{a} and C{b} (OpenAI dialect, hosts a.test and b.test);
    C{gpt-4o} served by a (weight 3) and b; C{small} by b alone.
    """
    providers = {
        "a": {"kind": "openai", "base_url": "http://a.test/v1", "api_key_env": "OAI_KEY"},
        "b": {"kind": "openai", "base_url": "http://b.test/v1", "api_key_env": "OAI_KEY"},
        "ant": {"kind": "anthropic", "base_url": "http://ant.test", "api_key_env": "ANT_KEY"},
    }
    doc: dict[str, Any] = {
        "providers": providers,
        "models": models
        or {
            "gpt-4o": {
                "deployments": [
                    {"provider": "a", "upstream_model": "gpt-4o-a", "weight": 3},
                    {"provider": "b", "upstream_model": "gpt-4o-b"},
                ]
            },
            "small": {"provider": "b", "upstream_model": "small-b"},
        },
    }
    if routing is not None:
        doc["routing"] = routing
    gw = Gateway(make_config(**doc))
    gw.accounting.ledger = FakeLedger()
    return gw


def host(call: dict[str, Any]) -> str:
    """The upstream host of a recorded call."""
    return call["url"].split("/")[2]


def answer(gw: Gateway, i: int, code: int = 200, headers: Any = None) -> FakeResponse:
    """Answer upstream call C{i} (-1: the latest) with C{code} and event-stream (or C{headers}) headers."""
    r = FakeResponse(code, SSE_HEADERS if headers is None else headers)
    gw.http.calls[i]["deferred"].callback(r)
    return r

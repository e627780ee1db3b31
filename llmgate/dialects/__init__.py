# -*- test-case-name: tests.relay.test_stream -*-
"""
What differs between the OpenAI and Anthropic APIs: the routes, how errors
look, how the provider key is sent and how a mid-stream error is signalled.

A client must always get errors in the dialect of the route it called, never
in the upstream's and never in a generic shape, so that its SDK raises the
right exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    """A POST route the gateway relays."""

    path: bytes
    kind: str  # "openai" | "anthropic": the dialect of the route
    api: str  # the usage accumulator to count it with
    streams: bool  # whether C{"stream": true} is meaningful on it


ENDPOINTS: dict[bytes, Endpoint] = {
    e.path: e
    for e in (
        Endpoint(b"/v1/chat/completions", "openai", "openai.chat", True),
        Endpoint(b"/v1/completions", "openai", "openai.completions", True),
        Endpoint(b"/v1/embeddings", "openai", "openai.embeddings", False),
        Endpoint(b"/v1/responses", "openai", "openai.responses", True),
        Endpoint(b"/v1/messages", "anthropic", "anthropic.messages", True),
        Endpoint(
            b"/v1/messages/count_tokens", "anthropic", "anthropic.count_tokens", False
        ),
    )
}

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    502: "upstream_error",
    503: "server_error",
    504: "timeout",
}

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def kind_for_path(path: bytes) -> str:
    """
    The dialect to answer in for a path, even one we do not serve: Anthropic
    for C{/v1/messages...}, OpenAI otherwise.
    """
    return "anthropic" if path.startswith(b"/v1/messages") else "openai"


def error_body(
    kind: str,
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    """
    An error body in the dialect C{kind}, as the official SDKs parse it.
    """
    if kind == "anthropic":
        return json.dumps(
            {
                "type": "error",
                "error": {
                    "type": _ANTHROPIC_TYPES.get(
                        status, "api_error" if status >= 500 else "invalid_request_error"
                    ),
                    "message": message,
                },
            }
        ).encode()
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(
                    status, "server_error" if status >= 500 else "invalid_request_error"
                ),
                "param": param,
                "code": code,
            }
        }
    ).encode()


def stream_error_event(kind: str, message: str, quota: bool = False) -> bytes:
    """
    An in-band SSE error event for a stream whose status line is already
    sent: the only way left to tell the client it was cut short.  With
    C{quota}: cut because the key's budget ran out (the types the 429 of a
    spent budget has).
    """
    if kind == "anthropic":
        payload = {
            "type": "error",
            "error": {"type": "rate_limit_error" if quota else "api_error", "message": message},
        }
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    payload2 = {
        "error": {
            "message": message,
            "type": "insufficient_quota" if quota else "upstream_error",
            "param": None,
            "code": "insufficient_quota" if quota else "stream_interrupted",
        }
    }
    return b"data: " + json.dumps(payload2).encode() + b"\n\n"


def upstream_url(kind: str, base_url: str, path: bytes) -> str:
    """
    The upstream URL for a route, given a base URL in the form the provider's
    official SDK takes it: OpenAI's includes C{/v1}, Anthropic's does not.
    """
    p = path.decode("ascii")
    if kind == "openai":
        return base_url + p[len("/v1"):]
    return base_url + p


def auth_headers(kind: str, api_key: str | None, anthropic_version: str) -> list[tuple[bytes, bytes]]:
    """
    The headers that carry the provider credential upstream.
    """
    out: list[tuple[bytes, bytes]] = []
    if kind == "anthropic":
        if api_key:
            out.append((b"x-api-key", api_key.encode()))
        out.append((b"anthropic-version", anthropic_version.encode()))
    elif api_key:
        out.append((b"authorization", b"Bearer " + api_key.encode()))
    return out

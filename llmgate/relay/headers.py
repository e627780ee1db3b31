# -*- test-case-name: tests.relay.test_stream -*-
"""
Header hygiene for both directions of the relay.

Hop-by-hop headers and the ones named in C{Connection} describe one TCP hop,
not the message, so they never cross the gateway; framing headers are
recomputed by each side; client credentials are replaced by the provider's.
"""

from __future__ import annotations

from typing import Iterable, Optional

from twisted.web.http_headers import Headers

from llmgate.relay.redact import Redactor

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Never forwarded upstream: framing (recomputed), the host (the upstream's),
# client credentials (replaced), encodings (the gateway asks for identity),
# and the provider account to bill: the gateway's key pays, so a client must
# not pick which of that key's organizations or projects is charged.
_REQUEST_DROP = HOP_BY_HOP | {
    b"content-length",
    b"host",
    b"authorization",
    b"x-api-key",
    b"accept-encoding",
    b"expect",
    b"openai-organization",
    b"openai-project",
    # The gateway's own routing header (llmgate.routing.balance).
    b"x-llmgate-tags",
}

# Never relayed downstream: framing and encoding are the gateway's own (the
# relay decodes or refuses any compressed body), cookies of the upstream
# belong to the gateway's upstream session, not to a client (and one pool
# serves every client), and the provider account behind the gateway is not
# the client's business.
_RESPONSE_DROP = HOP_BY_HOP | {
    b"content-length",
    b"content-encoding",
    b"set-cookie",
    b"server",
    b"date",
    b"openai-organization",
    b"openai-project",
    b"anthropic-organization-id",
    # URLs on the provider's host: a client following a redirect would
    # take its gateway key (and its prompt) there; the gateway follows none.
    b"location",
    b"content-location",
    # The provider's transport policy for its own host (alternative
    # endpoints, HSTS), not the gateway's.
    b"alt-svc",
    b"strict-transport-security",
}


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", ()):
        for t in value.split(b","):
            t = t.strip().lower()
            if t:
                tokens.add(t)
    return tokens


def _filtered(headers: Headers, drop: frozenset[bytes] | set[bytes]) -> Iterable[tuple[bytes, list[bytes]]]:
    named = _connection_tokens(headers)
    for name, values in headers.getAllRawHeaders():
        low = name.lower()
        if low in drop or low in named:
            continue
        yield low, values


def upstream_request_headers(
    client: Headers, credentials: list[tuple[bytes, bytes]]
) -> Headers:
    """
    The headers to send upstream: the client's, cleaned, plus the provider
    credential (which wins over anything of the same name).
    """
    out = Headers()
    cred_names = {n for n, _ in credentials}
    for name, values in _filtered(client, _REQUEST_DROP):
        if name in cred_names and name != b"anthropic-version":
            continue
        out.setRawHeaders(name, values)
    for name, value in credentials:
        if name == b"anthropic-version" and out.hasHeader(name):
            # The client's SDK knows which API version it speaks.
            continue
        out.setRawHeaders(name, [value])
    # With no Accept-Encoding an upstream may compress as it likes; say
    # identity so that event streams arrive as events (the relay still
    # decodes or refuses a body compressed anyway).
    out.setRawHeaders(b"accept-encoding", [b"identity"])
    return out


# Rate-limit headers the gateway sets itself for a key with limits.
_OWN_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")


def copy_response_headers(upstream: Headers, downstream: Headers, redact: Optional[Redactor] = None) -> None:
    """
    Copy the upstream response headers onto the client response, each
    value passed through C{redact} if given.

    C{setRawHeaders} replaces the C{Content-Type} that twisted.web presets.
    """
    items = list(_filtered(upstream, _RESPONSE_DROP))
    # One cheap look at all values: the usual response has nothing to redact.
    if redact is not None and redact.needed(b"\n".join(v for _, values in items for v in values)):
        items = [(name, [redact(v) for v in values]) for name, values in items]
    for name, values in items:
        if name.startswith(_OWN_PREFIXES) and downstream.hasHeader(name):
            # The gateway's quota for the client's key, not the provider
            # account's limits.
            continue
        if name == b"x-request-id":
            # The gateway answers with its own x-request-id (see
            # llmgate.edge.requestid); the provider's keeps its value
            # under another name.
            name = b"x-upstream-request-id"
        downstream.setRawHeaders(name, values)


def release(headers: Headers) -> None:
    """
    Empty C{headers} in place, once nothing will read them again (a head
    already written or copied). Each header name holds a list of values,
    and a Headers kept for a stream's whole life keeps them all where the
    cyclic collector walks them: at thousands of open streams, the lists
    of the four heads a stream has (client request and response, upstream
    request and response) were most of the objects each stream kept.
    Where the attribute that holds them is the gateway's to set, a fresh
    C{Headers()} is better still: an emptied dict stays tracked until a
    collection of its generation looks at it again, a new empty one is
    not tracked at all.
    """
    for name in [name for name, _ in headers.getAllRawHeaders()]:
        headers.removeHeader(name)

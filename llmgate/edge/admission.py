# -*- test-case-name: tests.edge.test_admission -*-
"""
Who may send a request body, decided when the headers arrive.

A body is only worth reading for a client that may use the gateway: with
gateway keys configured, one that presents a valid key; without keys, a
program on this machine. Checking after the body is read would let anyone
who reaches the port make the gateway buffer up to the body cap per
connection (50 unauthenticated 32 MiB uploads took it from 124 MiB to
1.7 GiB).

Without keys, any web page the user visits can reach a loopback port: a
cross-site C{text/plain} POST needs no CORS preflight, and DNS rebinding
makes a foreign name resolve to 127.0.0.1. So a keyless gateway answers only
requests that name a loopback host, come from no foreign page (C{Origin})
and carry C{application/json}, which a browser will not send cross-site
without a preflight (CORS stays off, so the preflight fails).
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, NamedTuple, Optional

from twisted.web.http_headers import Headers


class Refusal(NamedTuple):
    """An answer the edge gives instead of reading the body."""

    status: int
    message: str
    code: Optional[str] = None
    headers: tuple[tuple[bytes, bytes], ...] = ()


# Answered to anyone, key or not: liveness probes carry no key.
_OPEN = {(b"GET", b"/healthz"), (b"HEAD", b"/healthz")}


def admit(method: bytes, path: bytes, request: Any, gate: Any) -> Optional[Refusal]:
    """
    Whether the request whose headers just arrived may go on to send its
    body; a L{Refusal} if not.

    @param method: the request method.
    @param path: the request path without its query.
    @param request: the request, its headers complete.
    @param gate: the resource: C{keyed} (whether gateway keys are
        configured) and C{authenticate(request)} (the key's name or
        L{None}), read on every request so a reload takes effect at once.
    """
    if (method, path) in _OPEN:
        return None
    headers = request.requestHeaders
    for name in (b"authorization", b"x-api-key"):
        if len(headers.getRawHeaders(name, ())) > 1:
            # Which one would be checked, and which one would another
            # proxy in front of us have checked?
            return Refusal(400, f"more than one {name.decode()} header", "duplicate_credentials")
    if getattr(gate, "keyed", False):
        if gate.authenticate(request) is None:
            why = getattr(gate, "unauthenticated", None)
            message = why(request) if why is not None else "invalid or missing gateway key"
            return Refusal(401, message, "invalid_api_key")
        return None
    return keyless_refusal(method, headers)


def keyless_refusal(method: bytes, headers: Headers) -> Optional[Refusal]:
    """
    The checks that stand in for keys when none are configured: a loopback
    C{Host}, no foreign C{Origin}, and a JSON body.
    """
    hosts = headers.getRawHeaders(b"host", ())
    if len(hosts) != 1 or not loopback_authority(hosts[0]):
        return Refusal(
            421,
            "without gateway keys this gateway answers only requests addressed "
            "to localhost, 127.0.0.1 or [::1]; configure [keys] to serve other names",
            "host_not_allowed",
        )
    for origin in headers.getRawHeaders(b"origin", ()):
        if not loopback_origin(origin):
            return Refusal(
                403,
                "requests from web pages of other sites are refused without gateway keys",
                "origin_not_allowed",
            )
    if method not in (b"GET", b"HEAD"):
        types = headers.getRawHeaders(b"content-type", ())
        if len(types) != 1 or types[0].split(b";", 1)[0].strip().lower() != b"application/json":
            return Refusal(415, "the request body must be sent as content-type: application/json", "unsupported_media_type")
    return None


# Distinct Host (and Origin authority) values remembered: a keyless
# gateway sees one or two (localhost:PORT, 127.0.0.1:PORT); the bound keeps
# a client that sends a new value per request from growing it.
_AUTHORITY_CACHE = 256


@functools.lru_cache(maxsize=_AUTHORITY_CACHE)
def loopback_authority(authority: bytes) -> bool:
    """
    Whether a C{Host} value (name, optional port) names this machine's
    loopback: C{localhost}, an address in 127.0.0.0/8, or C{[::1]}.

    Remembered per value (bounded): parsing an address with C{ipaddress}
    per request was ~2% of a keyless gateway's CPU per request.
    """
    authority = authority.strip().lower()
    if authority.startswith(b"["):
        host, sep, rest = authority[1:].partition(b"]")
        if not sep or (rest and not _port(rest)):
            return False
        return _loopback_ip(host)
    host, sep, port = authority.partition(b":")
    if sep and not port.isdigit():
        return False
    if host in (b"localhost", b"localhost."):
        return True
    return _loopback_ip(host, v4_only=True)


def loopback_origin(origin: bytes) -> bool:
    """Whether an C{Origin} header names a page served from loopback."""
    scheme, sep, authority = origin.strip().partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https") or b"/" in authority:
        return False  # "null", file pages, anything odd
    return loopback_authority(authority)


def _port(rest: bytes) -> bool:
    return rest.startswith(b":") and rest[1:].isdigit()


def _loopback_ip(host: bytes, v4_only: bool = False) -> bool:
    try:
        ip = ipaddress.ip_address(host.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    if v4_only and ip.version != 4:
        return False
    return ip.is_loopback

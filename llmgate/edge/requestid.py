# -*- test-case-name: tests.edge.test_requestid -*-
"""
Request ids: the one a client or an upstream log can be matched by.

Every request gets the gateway's own id (128 random bits, hex): the
ledger's unique C{request_id}, so a client that repeats an id (a retry, a
bug) can never make one record replace another.  A client may send its
own C{x-request-id} (a tracing proxy in front, an SDK); when it is a
short token of printable ASCII it is kept as the I{client's} id
(C{client_request_id} in the ledger), otherwise it is ignored (an id of
arbitrary bytes would be a log-injection vector and an unbounded label).

The id the client sees, and the one sent upstream as C{x-request-id}, is
the client's if it gave a valid one, else the gateway's.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, Optional

HEADER = b"x-request-id"
# Longest client id kept: enough for a UUID, a W3C trace id with a span
# id, or an AWS X-Ray id; a bounded column and log field.
MAX_LEN = 128
# RFC 9110 token characters: no spaces, quotes, commas or controls, so
# the id is one word in a text log line and safe in a header.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1," + str(MAX_LEN).encode() + rb"}\Z")


# Random bytes drawn from the kernel 4 KB at a time (256 ids), not one
# getrandom call per request; a forked child drops the parent's rest, so
# two processes never hand out the same bytes.
_POOL_BYTES = 4096
_pool = b""
_at = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    global _pool, _at
    _pool, _at = b"", 0


os.register_at_fork(after_in_child=_forget_pool)


def new_id() -> str:
    """A fresh gateway id: 128 random bits (from C{os.urandom}) as hex."""
    global _pool, _at
    with _pool_lock:
        at = _at
        if at + 16 > len(_pool):
            _pool, at = os.urandom(_POOL_BYTES), 0
        _at = at + 16
        return _pool[at : at + 16].hex()


def valid_client_id(headers: Any) -> Optional[str]:
    """
    The client's C{x-request-id} if it sent exactly one valid one (at most
    L{MAX_LEN} token characters), else L{None}.
    """
    values = headers.getRawHeaders(HEADER)
    if not values or len(values) != 1:
        return None
    value = values[0].strip()
    if _TOKEN.match(value) is None:
        return None
    return value.decode("ascii")


class RequestIds:
    """
    The ids of one request.

    @ivar gateway: the gateway's own unique id (the ledger's C{request_id}).
    @ivar client: the client's valid C{x-request-id}, or L{None}.
    """

    __slots__ = ("gateway", "client")

    def __init__(self, gateway: str, client: Optional[str]) -> None:
        self.gateway = gateway
        self.client = client

    @property
    def visible(self) -> str:
        """The id the client is answered with and the upstream is sent."""
        return self.client or self.gateway


def ids_for(request: Any) -> RequestIds:
    """
    The ids of C{request}, made once (on the first call) and kept on it, so
    the edge, the resource and the relay all name the request alike.  The
    first call also sets the C{x-request-id} response header.
    """
    ids = getattr(request, "llmgate_ids", None)
    if ids is None:
        ids = RequestIds(new_id(), valid_client_id(request.requestHeaders))
        request.llmgate_ids = ids
        request.responseHeaders.setRawHeaders(HEADER, [ids.visible.encode("ascii")])
    return ids

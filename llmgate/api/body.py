# -*- test-case-name: tests.api.test_body -*-
"""
Parsing a client's JSON request body, strictly enough that the gateway and
the upstream cannot read two different requests from the same bytes.

The gateway routes, prices and rewrites a request by its top-level keys
(C{model}, C{stream}, C{stream_options}) and forwards the client's bytes.
C{json.loads} keeps the last of two equal keys; other parsers keep the
first. A body with C{"model"} twice could then be routed and billed as one
model and served as another, so a repeated top-level key (however it is
spelled: C{"mod\\u0065l"} is C{"model"}) is refused.

The top-level object is walked here, its values parsed by the C scanner of
the C{json} module: checking the keys costs nothing per nested object,
where an C{object_pairs_hook} costs a Python call on each (5x on a body of
many small objects).

Nesting is capped well below Python's recursion limit, so that nothing
that later walks the document (re-serialising it, estimating its tokens)
can hit a C{RecursionError}, on whichever thread it runs.
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring
from typing import Any

# Deeper documents are refused. Real requests (nested JSON schemas of tool
# definitions included) stay far below; Python's recursion limit is 1000.
MAX_DEPTH = 128

_WS = re.compile(r"[ \t\n\r]*")


class BodyError(ValueError):
    """The body is not a request the gateway can route; C{str()} says why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_body(body: bytes) -> dict[str, Any]:
    """
    The JSON object in C{body}.

    @raise BodyError: not JSON, not an object, a repeated top-level key, or
        nested deeper than L{MAX_DEPTH}.
    """
    # A body that opens its object with a non-NUL next byte is UTF-8 (what
    # json.detect_encoding says: no BOM starts with "{", and a NUL second
    # byte would be UTF-16/32), without that function's Python-level checks.
    encoding = "utf-8" if body[:1] == b"{" and body[1:2] != b"\x00" else json.detect_encoding(body)
    try:
        text = body.decode(encoding, "surrogatepass")
    except (UnicodeDecodeError, LookupError):
        raise BodyError("request body is not valid JSON") from None
    try:
        doc = _object(text)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError(f"request body is nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, StopIteration):
        raise BodyError("request body is not valid JSON") from None
    if not _shallow(doc, MAX_DEPTH, text):
        raise BodyError(f"request body is nested deeper than {MAX_DEPTH} levels")
    return doc


def _object(s: str) -> dict[str, Any]:
    """
    Parse C{s}, which must hold one JSON object, refusing repeated keys in
    that object. Raises ValueError/StopIteration on bad JSON, like the
    json module's own scanner.
    """
    ws = _WS.match
    i = ws(s, 0).end()
    if s[i:i + 1] != "{":
        json.loads(s)  # raises if it is not JSON at all
        raise BodyError("request body must be a JSON object")
    # A decoder per call: the C scanner keeps a per-scanner memo and parses
    # run on several threads.
    scan = json.JSONDecoder().scan_once
    doc: dict[str, Any] = {}
    i = ws(s, i + 1).end()
    if s[i:i + 1] == "}":
        i += 1
    else:
        while True:
            if s[i:i + 1] != '"':
                raise ValueError("expected a key")
            key, i = scanstring(s, i + 1)
            i = ws(s, i).end()
            if s[i:i + 1] != ":":
                raise ValueError("expected ':'")
            i = ws(s, i + 1).end()
            value, i = scan(s, i)
            if key in doc:
                raise BodyError(f"duplicate key {_quote(key)} in the request body", param=key[:64])
            doc[key] = value
            i = ws(s, i).end()
            c = s[i:i + 1]
            if c == ",":
                i = ws(s, i + 1).end()
            elif c == "}":
                i += 1
                break
            else:
                raise ValueError("expected ',' or '}'")
    if ws(s, i).end() != len(s):
        raise ValueError("extra data")
    return doc


def _quote(key: str) -> str:
    return json.dumps(key if len(key) <= 64 else key[:64] + "...")


def _shallow(doc: dict[str, Any], limit: int, text: str) -> bool:
    """
    Whether C{doc} nests at most C{limit} levels. A document with fewer
    brackets in its text than the limit cannot be deeper, which spares the
    walk for most bodies.
    """
    if text.count("[") + text.count("{") <= limit:
        return True
    level: list[Any] = [doc]
    depth = 1
    while level:
        if depth > limit:
            return False
        nxt: list[Any] = []
        push = nxt.append
        for v in level:
            for x in v.values() if type(v) is dict else v:
                t = type(x)
                if t is dict or t is list:
                    push(x)
        level = nxt
        depth += 1
    return True
